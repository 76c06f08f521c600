"""Benchmark training and inference against this machine's yardsticks and a plain reference.

    python scripts/benchmark.py [--configs small v2] [--batches 2 8] [--memory-minutes 1 10 60] [--json OUT]
    python scripts/benchmark.py --sections codec rtf [--codec-seconds 10] [--rtf-seconds 10 60]
        [--rtf-evals 1 2 4 8 32] [--rtf-long-evals 1 2] [--no-dac]

Prints a table and writes JSON (flat keys such as `train.v2.bf16.b8.mfu`). Everything is measured
in one run: MFU is achieved FLOP/s over the matmul peak measured at the start, the optimizer step
is compared with its bandwidth bound (bytes moved / measured copy bandwidth), and ours is compared
with a plain reference implementation (explicit attention with repeated K/V, default AdamW). The last
section streams 1, 10 and 60 minutes of stereo 48 kHz audio (1 step) and prints each run's peak memory
(about 4 minutes; `--no-memory` skips it).

The codec section times DAC encode and decode (the 44 kHz architecture, random weights) as the library
runs them and in our fast form (fp32 and bf16), as FLOP/s over the fp32 and bf16 matmul peaks of the device
it runs on (CUDA when available). The rtf section streams 10 s and 60 s files through the inference path
for each config at 1-32 network evaluations and splits the real-time factor into read, encode, network,
decode, low-frequency replacement and write (`jat.evaluation.rtf`). `--sections` picks what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

from jat.codecs import latent_frames
from jat.evaluation.benchmark import (
    build,
    copy_bandwidth,
    matmul_peak,
    measure_inference,
    named_config,
)
from jat.evaluation.memory import format_rows, max_over_min, streaming_peak_memory

SECTIONS = ("train", "ablation", "infer", "finetune", "memory", "codec", "rtf")


def run_case(*args, env: dict[str, str] | None = None) -> dict:
    """A measurement of jat.evaluation.benchmark in a fresh process (own peak memory, no order effects)."""
    proc = subprocess.run([sys.executable, "-m", "jat.evaluation.benchmark", *map(str, args)],
                          capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of_rounds(cases: dict[str, tuple], rounds: int,
                   env: dict[str, dict] | None = None) -> dict[str, dict]:
    """Run each case `rounds` times, alternating between them (A B A B ...), each in a fresh process;
    keep each case's fastest run. Alternating makes slow phases of a shared machine hit both sides."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, args in cases.items():
            r = run_case(*args, env=(env or {}).get(name))
            if name not in best or r["step_s"] < best[name]["step_s"]:
                best[name] = r
    return best


def memory_section(minutes: list[float], out: dict) -> None:
    """Peak memory of streaming inference (`streaming_peak_memory`: stereo 48 kHz, 1 step, a fresh
    process per length, each reporting its own high-water mark), printed as a table and added to `out`
    as `memory.stream.m<minutes>.*` rows and `memory.stream.max_over_min`, the flatness ratio of the peaks."""
    rows = streaming_peak_memory(minutes)
    print("\nstreaming inference memory, stereo 48 kHz, 1 step (tiny model, MDCT codec), one process each")
    print(format_rows(rows))
    for r in rows:
        out.update({f"memory.stream.m{r['minutes']:g}.{k}": r[k] for k in ("peak_mb", "seconds", "rtf")})
    out["memory.stream.max_over_min"] = max_over_min(rows)


def codec_section(seconds: float, device: torch.device, peak: dict[str, float], out: dict) -> None:
    """DAC encode and decode, the library's modules beside ours (`codec_speed`), against `peak`."""
    from jat.evaluation.codec_speed import codec_speed, format_codec_rows

    print(f"\nDAC 44 kHz codec (real architecture, random weights), {seconds:g} s of audio, batch 1, "
          f"{device}")
    rows = codec_speed(seconds, device)
    print(format_codec_rows(rows, peak))
    for r in rows:
        key = f"codec.dac.{r['impl']}.{r['op']}"
        fields = ("seconds", "flops", "flops_per_s", "rtf", "speedup", "rel_err")
        out.update({f"{key}.{k}": r[k] for k in fields})
        out.update({f"{key}.frac_peak_{d}": r["flops_per_s"] / peak[d] for d in ("fp32", "bf16")})
        if "codes_agree" in r:
            out[f"{key}.codes_agree"] = r["codes_agree"]


def rtf_section(args, device: torch.device, out: dict) -> None:
    """End-to-end real-time factor of the streaming inference path, by stage (`jat.evaluation.rtf`)."""
    import tempfile
    from pathlib import Path

    from jat.evaluation.rtf import format_rtf_rows, rtf_rows

    codec = "mdct" if args.no_dac else None
    print(f"\nend-to-end real-time factor (streaming inference, Euler, mono 44.1 kHz input, {device}): "
          "seconds per stage")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for r in rtf_rows(args.rtf_configs, args.rtf_seconds, args.rtf_evals, Path(work), args.rtf_long_evals,
                          codec, str(device), args.dac_dtype):
            rows.append(r)
            table = format_rtf_rows([r])
            print(table if len(rows) == 1 else table.splitlines()[-1], flush=True)  # the header once
            key = f"rtf.{r['config']}.{r['codec']}.s{r['audio_seconds']:g}.e{r['evaluations']}"
            out.update({f"{key}.{k}": v for k, v in r.items()
                        if isinstance(v, float) and k != "audio_seconds"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "v2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--seconds", type=float, default=6.0, help="training clip length")
    ap.add_argument("--infer-seconds", type=float, default=10.0)
    ap.add_argument("--infer-steps", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per process (the best counts)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh processes per training case, alternating ours and the reference")
    ap.add_argument("--no-reference", action="store_true", help="skip the plain reference")
    ap.add_argument("--no-ablation", action="store_true",
                    help="skip the runtime ablation (ours without, the reference with jat/runtime.py; "
                         "--no-reference skips it too)")
    ap.add_argument("--no-dac", action="store_true",
                    help="skip the DAC codec section (the rtf rows then run on the mdct codec)")
    ap.add_argument("--no-finetune", action="store_true", help="skip the full/LoRA/QLoRA comparison")
    ap.add_argument("--finetune-config", default="v2", help="model preset for the fine-tuning comparison")
    ap.add_argument("--no-memory", action="store_true", help="skip the streaming memory section")
    ap.add_argument("--memory-minutes", nargs="+", type=float, default=[1, 10, 60],
                    help="input lengths for the streaming memory section")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="what to run (default: all)")
    ap.add_argument("--device", default="auto",
                    help="device of the codec and rtf sections (auto: CUDA if there is one)")
    ap.add_argument("--codec-seconds", type=float, default=10.0, help="audio per codec measurement")
    ap.add_argument("--rtf-configs", nargs="+", default=["small", "v2"])
    ap.add_argument("--rtf-seconds", nargs="+", type=float, default=[10.0, 60.0], help="input lengths")
    ap.add_argument("--rtf-evals", nargs="+", type=int, default=[1, 2, 4, 8, 32],
                    help="network evaluations (Euler steps) per row")
    ap.add_argument("--rtf-long-evals", nargs="+", type=int, default=None,
                    help="evaluations for inputs longer than the shortest (default: --rtf-evals)")
    ap.add_argument("--dac-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the fast DAC's precision in the rtf section (codec.dac_dtype)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    run = set(args.sections)
    if args.no_memory:
        run.discard("memory")
    if args.no_finetune:
        run.discard("finetune")
    if args.no_dac:
        run.discard("codec")
    from jat.infer.upsampler import pick_device

    device = pick_device(args.device)

    out: dict[str, float | str] = {"machine": platform.processor() or platform.machine(),
                                   "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    bw = copy_bandwidth()
    out.update({"peak.fp32.gflops": peak["fp32"] / 1e9, "peak.bf16.gflops": peak["bf16"] / 1e9,
                "copy_bandwidth.gbps": bw / 1e9})
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")

    if "train" in run:
        train_section(args, peak, bw, out)
    if "ablation" in run and not (args.no_reference or args.no_ablation):
        ablation_section(args, out)
    if "infer" in run:
        infer_section(args, peak, out)
    if "finetune" in run:
        finetune_section(args, out)
    if "memory" in run:
        memory_section(args.memory_minutes, out)
    if "codec" in run or "rtf" in run:
        dev_peak = peak if device.type == "cpu" else {
            "fp32": matmul_peak(torch.float32, (4096, 8192), device=device),
            "bf16": matmul_peak(torch.bfloat16, (4096, 8192), device=device)}
        if device.type != "cpu":
            out.update({f"peak.{device.type}.{d}.gflops": v / 1e9 for d, v in dev_peak.items()})
            print(f"{device} matmul peak: fp32 {dev_peak['fp32'] / 1e9:.0f} GFLOP/s, "
                  f"bf16 {dev_peak['bf16'] / 1e9:.0f} GFLOP/s")
        if "codec" in run:
            codec_section(args.codec_seconds, device, dev_peak, out)
        if "rtf" in run:
            rtf_section(args, device, out)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
        print(f"\nwrote {args.json}")
    return 0


def train_section(args, peak: dict[str, float], bw: float, out: dict) -> None:
    """Training step of each config, dtype and batch: ours beside the plain reference."""
    frames = latent_frames(args.seconds)
    print(f"\ntraining step, {args.seconds:g} s clips ({frames} frames)")
    print(f"{'config':<7}{'impl':<6}{'dtype':<6}{'batch':>5}{'fwd+bwd s':>11}{'MFU':>7}{'opt s':>8}"
          f"{'opt/bound':>10}{'step s':>8}{'tokens/s':>10}{'peak MB':>9}")
    kinds = ["ours"] + ([] if args.no_reference else ["ref"])
    for name in args.configs:
        for dtype in args.dtypes:
            for b in args.batches:
                cases = {kind: ("train", name, kind, dtype, b, args.seconds, args.repeats) for kind in kinds}
                for kind, r in best_of_rounds(cases, args.rounds).items():
                    mfu = r["fwd_bwd_flops_per_s"] / peak[dtype]
                    bound = r["optimizer_bytes"] / bw
                    key = f"train.{name}.{dtype}.b{b}" + ("" if kind == "ours" else ".ref")
                    out.update({f"{key}.{k}": v for k, v in r.items()})
                    out[f"{key}.mfu"] = mfu
                    out[f"{key}.opt_vs_bound"] = r["opt_s"] / bound
                    print(f"{name:<7}{kind:<6}{dtype:<6}{b:>5}{r['fwd_bwd_s']:>11.3f}{mfu:>7.1%}{r['opt_s']:>8.3f}"
                          f"{r['opt_s'] / bound:>10.2f}{r['step_s']:>8.3f}{r['tokens_per_s']:>10.0f}"
                          f"{r['peak_mem_mb']:>9.0f}")
                if "ref" in kinds:
                    k = f"train.{name}.{dtype}.b{b}"
                    out[f"{k}.speedup_vs_ref"] = out[f"{k}.ref.step_s"] / out[f"{k}.step_s"]
                    # the most any implementation could gain: every matmul at the measured peak, no
                    # other work in forward+backward, and our optimizer step
                    floor = out[f"{k}.flops"] / peak[dtype] + out[f"{k}.opt_s"]
                    out[f"{k}.speedup_ceiling"] = out[f"{k}.ref.step_s"] / floor
                    print(f"{'':<7}whole step {out[f'{k}.speedup_vs_ref']:.2f}x the reference's "
                          f"(at 100 % MFU it would be {out[f'{k}.speedup_ceiling']:.2f}x)")


def ablation_section(args, out: dict) -> None:
    """What jat/runtime.py alone is worth: ours untuned, the reference tuned."""
    name, dtype, b = args.configs[-1], args.dtypes[-1], max(args.batches)
    print(f"\nruntime ablation, {name} {dtype} batch {b}: step s (fwd+bwd s + opt s)")
    key = f"train.{name}.{dtype}.b{b}"
    labels = {"ours_untuned": "ours, untuned runtime", "ref_tuned": "ref, jat's runtime settings"}
    cases = {"ours_untuned": ("train", name, "ours", dtype, b, args.seconds, args.repeats),
             "ref_tuned": ("train", name, "ref+tuned", dtype, b, args.seconds, args.repeats)}
    best = best_of_rounds(cases, args.rounds, env={"ours_untuned": {"JAT_CPU_TUNING": "0"}})
    for tag, r in best.items():
        out.update({f"{key}.{tag}.{k}": v for k, v in r.items()})
        print(f"  {labels[tag]:<29}{r['step_s']:>7.3f} ({r['fwd_bwd_s']:.3f} + {r['opt_s']:.3f})")
    out[f"{key}.speedup_vs_ref_tuned"] = out[f"{key}.ref_tuned.step_s"] / out[f"{key}.step_s"]
    print(f"  ours against the reference with the same runtime settings: "
          f"{out[f'{key}.speedup_vs_ref_tuned']:.2f}x")


def infer_section(args, peak: dict[str, float], out: dict) -> None:
    """Network sampling time of each config (Heun) and its MFU; the codec and the end-to-end real-time
    factor are the codec and rtf sections' rows."""
    print(f"\ninference network, {args.infer_seconds:g} s clip, batch 1, Heun (end to end: the rtf section)")
    print(f"{'config':<7}{'dtype':<6}{'steps':>6}{'network s':>11}{'MFU':>7}{'network RTF':>13}")
    for name in args.configs:
        cfg = named_config(name).model
        model, _ = build("ours", cfg)
        for dtype in ("bf16",):
            for steps in args.infer_steps:
                r = measure_inference(model, cfg, args.infer_seconds, steps, "heun", dtype)
                mfu = r["flops_per_s"] / peak[dtype]
                key = f"infer.{name}.{dtype}.s{steps}"
                out.update({f"{key}.{k}": v for k, v in r.items()})
                out[f"{key}.mfu"] = mfu
                print(f"{name:<7}{dtype:<6}{steps:>6}{r['network_s']:>11.2f}{mfu:>7.1%}{r['network_rtf']:>13.3f}")
        del model


def finetune_section(args, out: dict) -> None:
    """Full fine-tuning, LoRA and QLoRA steps, one process each."""
    print(f"\nfine-tuning modes, {args.finetune_config}, batch 2 of {args.seconds:g} s, fp32,"
          " one process each")
    print(f"{'mode':<7}{'trainable':>12}{'frozen MB':>11}{'step s':>8}{'peak MB':>9}")
    for mode in ("full", "lora", "qlora"):
        r = run_case("finetune", mode, args.finetune_config)
        out.update({f"finetune.{args.finetune_config}.{mode}.{k}": v for k, v in r.items()})
        print(f"{mode:<7}{r['trainable']:>12,}{r['frozen_mb']:>11.0f}{r['step_s']:>8.2f}{r['peak_mem_mb']:>9.0f}")


if __name__ == "__main__":
    sys.exit(main())
