"""Files in and out of the upsampler (scripts/infer.py): finding inputs, naming outputs, refusing to
overwrite, writing, and one clear error line per bad file while the other files go on.

Safety rules: an input is never written to; an existing output is replaced only with `overwrite`;
every output is written to a temporary file beside it and moved into place whole, and without
`overwrite` the move is a hard link that fails if the name appeared meanwhile. Planning checks,
before any work, that every output folder can take new files, and removes the temporary files that
killed runs left there.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

from jat.atomic import TargetExistsError, remove_stale_temps, write_atomic
from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import AUDIO_EXTENSIONS, AudioError, audio_info, exists_error, read_samples, save_audio
from jat.infer.rates import output_rate
from jat.infer.upsampler import Progress, UpsampleError, Upsampler, UpsampleResult, check_signal

log = logging.getLogger(__name__)

SUFFIX = "_jat"  # output name: <input stem>_jat.<format>
EXTENSIONS = frozenset(AUDIO_EXTENSIONS) | {".au", ".caf", ".w64", ".rf64", ".aifc", ".snd", ".voc", ".sd2"}
FORMATS = ("wav", "flac")
PLOT_SECONDS = 30.0  # the spectrogram shows at most this much of the start
NOT_A_FOLDER = "is a file, not a folder"


@dataclass
class Task:
    """One input file and the files it will produce."""

    input: Path
    output: Path
    plot: Path | None = None


@dataclass
class Outcome:
    """What happened to one task: a result, or a one-line error naming the file."""

    task: Task
    result: UpsampleResult | None = None
    error: str | None = None
    subtype: str | None = None


def _is_audio(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") \
        and not p.stem.endswith(SUFFIX)


def expand_inputs(args: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """Command-line inputs -> ([(file, folder it was found in or None)], [error lines]).

    An argument is a file (used as given, whatever its extension), a folder (searched recursively for
    audio files) or a glob (`**` recurses). Found files skip hidden names and earlier outputs (`*_jat.*`).
    """
    found: list[tuple[Path, Path | None]] = []
    errors: list[str] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if _is_audio(f))
            if not files:
                errors.append(f"{p}: no audio files found in this folder")
            found += [(f, p) for f in files]
        elif p.exists():
            found.append((p, None))
        elif glob.has_magic(arg):
            files = sorted(Path(f) for f in glob.glob(arg, recursive=True) if _is_audio(Path(f)))
            if not files:
                errors.append(f"{arg}: no audio files match")
            found += [(f, None) for f in files]
        else:
            errors.append(f"{p}: audio file not found")
    seen: set[Path] = set()
    unique = []
    for f, root in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, root))
    return unique, errors


def output_path(path: Path, root: Path | None, output_dir: str | Path | None, fmt: str = "wav") -> Path:
    """name.ext -> name_jat.<fmt>: beside the input, or in output_dir (keeping the sub-folders below
    the folder argument `root` it was found in)."""
    name = f"{path.stem}{SUFFIX}.{fmt}"
    if output_dir is None:
        return path.parent / name
    sub = path.parent.relative_to(root) if root is not None else Path()
    return Path(output_dir) / sub / name


def folder_problem(folder: str | Path) -> str | None:
    """Why new files cannot be made in `folder` (created, with its parents, if missing), or None.

    Writability is probed by creating and removing a file there: os.access only reads permission
    bits, which root bypasses, and knows nothing of read-only mounts or immutable folders.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return NOT_A_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create this folder ({exc.strerror or exc})"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".jat-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write here ({exc.strerror or exc})"
    return None


def plan(inputs: list[tuple[Path, Path | None]], output_dir: str | Path | None = None, fmt: str = "wav",
         overwrite: bool = False, plot: bool = False) -> tuple[list[Task], list[str]]:
    """Tasks for the inputs, and an error line for every input whose outputs cannot be written safely.

    Every output folder is checked (`folder_problem`) and cleared of killed runs' temporary files
    (`jat.atomic.remove_stale_temps`) here, before any work. An unusable `output_dir` is an AudioError:
    no file could be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format '{fmt}' ({', '.join(FORMATS)})")
    folders: dict[Path, str | None] = {}  # output folder -> its problem, checked once
    if output_dir is not None:
        why = folders[Path(output_dir)] = folder_problem(output_dir)
        if why:
            raise AudioError(f"{Path(output_dir)}/: {'--output-dir ' if why == NOT_A_FOLDER else ''}{why}")
    protected = {p.resolve() for p, _ in inputs}
    claimed: dict[Path, Path] = {}
    tasks, errors = [], []
    for path, root in inputs:
        out = output_path(path, root, output_dir, fmt)
        task = Task(path, out, out.with_suffix(".png") if plot else None)
        if out.parent not in folders:
            folders[out.parent] = folder_problem(out.parent)
        if folders[out.parent]:
            hint = "" if output_dir is not None else "; pass --output-dir to write elsewhere"
            errors.append(f"{path}: output folder {out.parent}/: {folders[out.parent]}{hint}")
            continue
        problem = None
        for target in filter(None, (task.output, task.plot)):
            for leftover in remove_stale_temps(target):
                log.info("%s: removed a killed run's temporary file", leftover)
            r = target.resolve()
            if r in protected:
                problem = f"{path}: output {target} is an input file; refusing to overwrite it"
            elif r in claimed:
                problem = f"{path}: output {target} is also the output of {claimed[r]}; rename one of them"
            elif target.exists() and not overwrite:
                problem = f"{path}: output {target} exists (pass --overwrite to replace it)"
            if problem:
                break
        if problem:
            errors.append(problem)
            continue
        for target in filter(None, (task.output, task.plot)):
            claimed[target.resolve()] = path
        tasks.append(task)
    return tasks, errors


def read_input(path: Path) -> tuple[torch.Tensor, int, str]:
    """(audio [C, L] float32 at the file's own rate, rate, soundfile subtype); AudioError naming the file.

    The signal is checked here (`check_signal`, naming the file); the upsampler checks it again."""
    audio, sr = read_samples(path)  # [C, L]; silence is allowed (the upsampler passes it through)
    check_signal(audio, sr, path)
    return audio, sr, sf.info(str(path)).subtype  # the header again, once: only for the subtype


def output_subtype(fmt: str, input_subtype: str | None) -> str:
    """Keep the input's resolution: float stays float (wav) or 24-bit (flac), 24/32-bit stay 24/32-bit
    (flac: 24), everything else (8/16-bit, compressed) becomes 16-bit."""
    s = (input_subtype or "").upper()
    if s in ("FLOAT", "DOUBLE"):
        return "FLOAT" if fmt == "wav" else "PCM_24"
    if s in ("PCM_24", "PCM_32"):
        return s if fmt == "wav" else "PCM_24"
    return "PCM_16"


def _clip(path: Path, audio: torch.Tensor, subtype: str) -> tuple[torch.Tensor, int]:
    """(audio clipped to [-1, 1] for integer formats, how many samples were clipped)."""
    if not subtype.startswith("PCM"):
        return audio, 0
    return audio.clamp(-1.0, 1.0), int((audio.abs() > 1).sum())


def write_output(path: Path, audio: torch.Tensor, subtype: str, overwrite: bool = False,
                 sr: int = SAMPLE_RATE) -> Path:
    """Write audio [C, L] at `sr`, clipped to [-1, 1] for integer formats, without ever leaving a
    partial file; without `overwrite` an existing file is left alone (AudioError)."""
    audio, clipped = _clip(path, audio, subtype)
    if clipped:
        log.warning("%s: %d samples above full scale clipped", path, clipped)
    return save_audio(path, audio, sr, subtype=subtype, overwrite=overwrite)


def write_plot(path: Path, result: UpsampleResult, overwrite: bool = False,
               seconds: float = PLOT_SECONDS) -> Path:
    """Spectrogram PNG of input (at the output rate) and output, side by side, of at most `seconds`."""
    from jat.evaluation.plots import spectrogram_figure

    n = round(seconds * result.sample_rate)
    clips = {"input": result.input[:, :n], "output": result.audio[:, :n]}
    fig = spectrogram_figure(clips, result.sample_rate)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite)
    except TargetExistsError:
        raise exists_error(path) from None


def stream_task(up: Upsampler, task: Task, *, fmt: str = "wav", overwrite: bool = False,
                progress: Progress | None = None, **kwargs) -> Outcome:
    """Upsample one file, streaming (`jat.infer.stream.upsample_file`: memory flat in its length), into
    its output (a temporary file moved into place whole) and plot. kwargs: cutoff, lfr, steps, solver,
    cfg_scale, seed, rate. An unusable input, a non-finite result or a failed write give an Outcome
    with the error, and nothing is left behind."""
    from jat.infer.stream import upsample_file

    tic = time.perf_counter()
    try:
        try:
            info = sf.info(str(task.input))
        except Exception:  # missing or unreadable: audio_info names the cause
            audio_info(task.input)
            raise
    except AudioError as exc:
        return Outcome(task, error=str(exc))
    subtype = output_subtype(fmt, info.subtype)
    box: list[UpsampleResult] = []
    clipped = [0]

    def write(tmp: Path) -> None:
        with sf.SoundFile(str(tmp), "w", samplerate=output_rate(kwargs.get("rate"), info.samplerate),
                          channels=info.channels, subtype=subtype, format=fmt.upper()) as f:
            def block(y: torch.Tensor) -> None:
                if not bool(torch.isfinite(y).all()):
                    raise UpsampleError(up.nonfinite_cause())
                y, n = _clip(task.output, y, subtype)
                clipped[0] += n
                f.write(y.T.numpy())  # [m, C]

            box.append(upsample_file(up, task.input, block, key=task, progress=progress,
                                     preview=PLOT_SECONDS if task.plot is not None else 0.0, **kwargs))

    try:
        write_atomic(task.output, write, overwrite)
        if clipped[0]:
            log.warning("%s: %d samples above full scale clipped", task.output, clipped[0])
        if task.plot is not None:
            write_plot(task.plot, box[0], overwrite)
    except AudioError as exc:
        return Outcome(task, error=str(exc))
    except UpsampleError as exc:  # the input was checked on reading: the cause is the model's
        return Outcome(task, error=f"{task.input}: {exc}")
    except TargetExistsError:
        return Outcome(task, error=str(exists_error(task.output)))
    except OSError as exc:
        return Outcome(task, error=f"{task.output}: {exc}")
    result = box[0]
    result.other_s = time.perf_counter() - tic - result.network_s - result.codec_s
    return Outcome(task, result, subtype=subtype)


def upsample_files(up: Upsampler, tasks: list[Task], *, fmt: str = "wav", overwrite: bool = False,
                   progress: Progress | None = None, **kwargs) -> Iterator[Outcome]:
    """Run the tasks one file at a time, streaming (`stream_task`), yielding one Outcome per task.

    A file that cannot be read or written, or whose result is not finite, gives an Outcome with its
    error and the others go on. kwargs: cutoff, lfr, steps, solver, cfg_scale, seed, rate. Reading and
    writing time count as 'other' in the result's timings.
    """
    for task in tasks:
        yield stream_task(up, task, fmt=fmt, overwrite=overwrite, progress=progress, **kwargs)
