"""Faults: SIGKILL at random points (also mid-checkpoint), then `--resume auto`, until the run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    CHILD_ENV,
    DDP_ENV,
    ROOT,
    TESTS,
    WORKER,
    ddp_launch,
    flip_byte,
    make_checkpoint,
    tiny_trainer,
)
from safetensors.torch import load_file

from jat.checkpoint import store as ckpt
from jat.cli import infer

STEPS = 24
ARGS = ["2", str(STEPS), "train.ckpt_every=2", "train.keep_last=2"]


def assert_all_complete(out: Path) -> None:
    """Every ckpt-* directory is whole: weights, optimizer, state and RNG load."""
    for path in ckpt.list_checkpoints(out):
        assert ckpt.read_config(path).train.max_steps == STEPS
        assert ckpt.load_weights(path, "ema") and ckpt.load_weights(path, "model")
        rest = ckpt.load_training_state(path, 0)
        assert rest["state"]["step"] == int(path.name.split("-")[1]) and rest["rng"] is not None


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(WORKER), str(ref), *ARGS], check=True, env=CHILD_ENV, cwd=ROOT,
                   capture_output=True, timeout=600)

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills, mid_write, resumed_from = 0, 0, []
    for attempt in range(40):
        before = ckpt.latest_checkpoint(out)
        proc = subprocess.Popen([sys.executable, str(WORKER), str(out), *ARGS, "--resume", "auto",
                                 "--slow-save", "0.15"], env=CHILD_ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # half the kills wait for a checkpoint write in progress, the others land anywhere
        during_write = attempt % 2 == 0
        deadline = time.monotonic() + 120
        target = rng.uniform(0.0, 0.6)
        armed_at = None
        while proc.poll() is None and time.monotonic() < deadline:
            latest = ckpt.latest_checkpoint(out)
            progressed = latest is not None and latest != before
            writing = any(out.glob(".tmp-ckpt-*")) if out.exists() else False
            if (during_write and writing and progressed) or (not during_write and progressed):
                armed_at = armed_at or time.monotonic()
                if time.monotonic() - armed_at >= (0.05 if during_write else target):
                    mid_write += any(out.glob(".tmp-ckpt-*"))
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        assert_all_complete(out)
        resumed_from.append(ckpt.latest_checkpoint(out).name)
    assert proc.returncode == 0, "the run never finished"
    print(f"survived {kills} SIGKILLs, {mid_write} of them during a checkpoint write")
    assert kills >= 5 and mid_write >= 2, (kills, mid_write)
    # each restart continued from the newest complete checkpoint: progress never went backwards
    steps = [int(n.split("-")[1]) for n in resumed_from]
    assert steps == sorted(steps)
    assert_all_complete(out)
    final, expected = load_file(str(out / "final-0.safetensors")), load_file(str(ref / "final-0.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    tail = json.loads((out / "losses-0.json").read_text())
    assert tail == json.loads((ref / "losses-0.json").read_text())[STEPS - len(tail):]


def test_disk_full_during_checkpoint_keeps_previous_ones(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = tiny_trainer(out)
    trainer.fit(until=3)
    good = load_file(str(out / "ckpt-00000003" / "weights.safetensors"))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match="step 6 .No space left on device.; earlier checkpoints"):
        trainer.fit()
    assert [p.name for p in out.iterdir() if "ckpt" in p.name] == ["ckpt-00000003"]
    again = load_file(str(out / "ckpt-00000003" / "weights.safetensors"))
    assert all(torch.equal(good[k], again[k]) for k in good)


@pytest.mark.slow
def test_one_rank_failing_stops_both_without_hanging(tmp_path):
    launch = ddp_launch(29519, tmp_path / "ddp", 2, 50, "--fail-rank", 1)
    tic = time.monotonic()
    proc = subprocess.run(launch, env=DDP_ENV, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.monotonic() - tic < 120  # stopped, not waiting out the collective timeout
    assert not (tmp_path / "ddp" / "final-0.safetensors").exists()  # rank 0 did not finish alone


# --- property-based: the audio loader on odd and broken files ---------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def odd_audio_files(draw):
    """A real audio file with unusual parameters, possibly truncated afterwards."""
    import numpy as np

    rate = draw(st.sampled_from([1000, 4000, 8000, 11025, 22050, 44100, 48000, 96000, 192000, 384000]))
    channels = draw(st.integers(1, 6))
    frames = draw(st.sampled_from([0, 1, 2, 31, 1000, 4410]))
    subtype = draw(st.sampled_from(["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"]))
    fmt = draw(st.sampled_from(["WAV", "FLAC"])) if subtype in ("PCM_16", "PCM_24") else "WAV"
    kind = draw(st.sampled_from(["noise", "silence", "extreme", "nan", "inf"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.standard_normal((frames, channels)) * 0.3
    if kind == "silence":
        data[:] = 0
    elif kind == "extreme":
        data *= 1e6 if subtype in ("FLOAT", "DOUBLE") else 10
    elif kind in ("nan", "inf") and frames and subtype in ("FLOAT", "DOUBLE"):  # only floats hold NaN
        data.flat[rng.integers(data.size)] = np.nan if kind == "nan" else np.inf
    cut = draw(st.one_of(st.none(), st.integers(0, 400)))
    return rate, channels, frames, subtype, fmt, kind, data, cut


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(odd_audio_files())
def test_audio_loader_never_crashes_on_odd_files(tmp_path_factory, case):
    import numpy as np
    import soundfile as sf

    from jat.data.audio import AudioError, load_audio

    rate, channels, frames, subtype, fmt, kind, data, cut = case
    path = tmp_path_factory.mktemp("odd") / f"x.{fmt.lower()}"
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    if cut is not None:
        raw = path.read_bytes()
        path.write_bytes(raw[: max(0, len(raw) - cut)])
    try:
        audio = load_audio(path, 44100)
    except AudioError as exc:
        assert str(path) in str(exc)
        return
    assert audio.dtype == torch.float32 and audio.shape[0] == channels and audio.shape[1] > 0
    assert bool(torch.isfinite(audio).all()) and bool(audio.abs().amax() > 0)
    # never more samples than the file held (after resampling to 44.1 kHz)
    assert audio.shape[1] <= np.ceil(frames * 44100 / rate) + 1
    if cut is None:
        assert audio.shape[1] >= np.floor(frames * 44100 / rate) - 1


def test_disk_full_during_inference_keeps_existing_output(tmp_path, capsys, monkeypatch):
    import numpy as np
    import soundfile as sf

    from jat.data.synth import demo_clip

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    sf.write(tmp_path / "a.wav", demo_clip(0.5, 16000, seed=1), 16000)
    sf.write(tmp_path / "b.wav", demo_clip(0.5, 16000, seed=2), 16000)
    old = np.full(100, 0.25, dtype=np.float32)
    sf.write(tmp_path / "a_jat.wav", old, 44100, subtype="FLOAT")

    class FullForA(sf.SoundFile):  # the streaming writer's blocks to a_jat's temporary file hit a full disk
        def write(self, data):
            if "a_jat" in Path(self.name).name:
                raise OSError(28, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(sf, "SoundFile", FullForA)
    rc = infer.main([str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--checkpoint",
                                    str(checkpoint), "--overwrite", "--steps", "2", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if "a_jat.wav" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0]
    assert np.array_equal(sf.read(tmp_path / "a_jat.wav", dtype="float32")[0], old)  # untouched
    assert (tmp_path / "b_jat.wav").is_file()  # the other file was still written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial files left


# --- one run per output folder: the run lock ----------------------------------------------------

HOLD_LOCK = """
import sys, time
from jat.train.runlock import RunLock
lock = RunLock(sys.argv[1])  # kept referenced: a RunLock that is garbage collected releases its lock
lock.acquire()
print("locked", flush=True)
time.sleep(300)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s run lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], env=CHILD_ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_second_run_into_a_locked_folder_stops_naming_the_holder_and_writes_nothing(tmp_path, monkeypatch):
    import jat.train.trainer
    from jat.train.runlock import RunLockedError

    out = tmp_path / "run"
    tiny_trainer(out).fit(until=3)  # a folder with a checkpoint and logs, as a real run leaves it
    holder = hold_lock(out)
    try:
        before = snapshot(out)

        def no_model(*args, **kwargs):
            raise AssertionError("the model was built before the lock was taken")

        monkeypatch.setattr(jat.train.trainer, "JaT", no_model)
        with pytest.raises(RunLockedError) as err:
            tiny_trainer(out, resume="auto")
        msg = str(err.value)
        assert msg.startswith(f"{out} is in use by pid {holder.pid} on host ")
        assert " since 20" in msg and "choose another train.output_dir" in msg
        assert isinstance(err.value, ckpt.CheckpointError)  # scripts/train.py prints it as one line
        assert snapshot(out) == before  # nothing written, nothing deleted
    finally:
        holder.kill()
        holder.wait()


def test_run_lock_of_a_killed_run_is_free_at_once(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".lock").is_file()  # the killed holder's file is still there, its lock is not
    trainer = tiny_trainer(out)
    info = json.loads((out / ".lock").read_text())
    assert info["pid"] == os.getpid()
    trainer.fit(until=1)


def test_fit_releases_the_lock_and_a_later_trainer_in_the_process_takes_it(tmp_path):
    out = tmp_path / "run"
    take = "import sys; from jat.train.runlock import RunLock; RunLock(sys.argv[1]).acquire()"
    probe = [sys.executable, "-c", take, str(out)]
    trainer = tiny_trainer(out)
    taken = subprocess.run(probe, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert taken.returncode != 0 and f"is in use by pid {os.getpid()}" in taken.stderr  # held from __init__
    trainer.fit(until=3)
    resumed = tiny_trainer(out, resume="auto")  # the same process, the finished one still referenced
    resumed.fit()
    assert resumed.step == 6 and trainer.step == 3
    free = subprocess.run(probe, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr[-2000:]  # released when fit ended

    import gc

    abandoned = tiny_trainer(tmp_path / "other")  # never fitted nor closed, then dropped
    del abandoned
    gc.collect()
    free = subprocess.run(probe[:-1] + [str(tmp_path / "other")], env=CHILD_ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr[-2000:]


@pytest.mark.slow
def test_locked_folder_stops_every_ddp_rank_without_hanging(tmp_path):
    out = tmp_path / "ddp"
    holder = hold_lock(out)
    launch = ddp_launch(29521, out, 2, 4)
    try:
        tic = time.monotonic()
        proc = subprocess.run(launch, env=DDP_ENV, cwd=ROOT, timeout=300, capture_output=True, text=True)
        assert time.monotonic() - tic < 120  # stopped together, not waiting out the collective timeout
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    # both ranks raise the main process's error (rank 1 learns it in the broadcast)
    assert proc.stderr.count(f"is in use by pid {holder.pid}") >= 2, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# --- checksums -----------------------------------------------------------------------------------


def test_flipped_byte_in_ema_weights_is_refused_naming_the_file(tmp_path):
    from jat.checkpoint.load import load_model

    out = tmp_path / "run"
    tiny_trainer(out).fit(until=3)
    path = out / "ckpt-00000003"
    weights = path / "weights.safetensors"
    key = next(k for k in load_file(str(weights)) if k.startswith("ema.") and k.endswith(".bias"))
    flip_byte(weights, key)
    pattern = f"{weights}: checksum mismatch: the file is corrupt .ema tensors: stored sha256 [0-9a-f]+"
    with pytest.raises(ckpt.CheckpointError, match=pattern + r"\.\.\., computed [0-9a-f]+"):
        ckpt.load_weights(path, "ema")
    assert ckpt.load_weights(path, "model")  # each prefix has its own checksum: the raw weights are fine
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        load_model(path)
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        tiny_trainer(out, resume="auto")


def test_flipped_byte_in_optimizer_state_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    tiny_trainer(out).fit(until=3)
    opt = out / "ckpt-00000003" / "optimizer.safetensors"
    flip_byte(opt, sorted(load_file(str(opt)))[0])
    with pytest.raises(ckpt.CheckpointError, match=f"{opt}: checksum mismatch: the file is corrupt"):
        tiny_trainer(out, resume="auto")


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    tiny_trainer(out).fit(until=3)
    path = out / "ckpt-00000003"
    for name in ("weights.safetensors", "optimizer.safetensors"):  # as written before checksums existed
        with safe_open(str(path / name), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if not k.startswith("sha256")}
        save_file(load_file(str(path / name)), str(path / name), metadata=meta)
    caplog.set_level("WARNING")
    resumed = tiny_trainer(out, resume="auto")
    assert resumed.step == 3
    assert f"{path / 'weights.safetensors'}: no checksum stored" in caplog.text
    assert f"{path / 'optimizer.safetensors'}: no checksum stored" in caplog.text


# --- a real write failure: the file size limit (EFBIG) ------------------------------------------

FILE_TOO_LARGE = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
from helpers import tiny_trainer
from jat.checkpoint.store import CheckpointError

trainer = tiny_trainer(sys.argv[1])
trainer.fit(until=3)
# from here on no file may grow past 64 KiB: writes fail with EFBIG instead of killing the process
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    trainer.fit()
except CheckpointError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def test_checkpoint_write_failing_with_file_too_large_keeps_earlier_ones(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FILE_TOO_LARGE, str(out), str(TESTS)], env=CHILD_ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: {out}: could not write the checkpoint of step 6 (" in proc.stderr
            and "File too large" in proc.stderr and "); earlier checkpoints are intact" in proc.stderr)
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000003"]
    path = out / "ckpt-00000003"
    assert ckpt.load_weights(path, "ema") and ckpt.load_weights(path, "model")  # verified checksums
    assert ckpt.load_training_state(path, 0)["state"]["step"] == 3
