"""How fast the DAC codec runs against this machine's peak: the library's modules beside our fast form.

The model is DAC 44 kHz's real architecture (`dac.DAC()`) with random weights: time does not depend on
the weights. FLOPs are counted once by torch's `FlopCounterMode` on the library's own model, per latent
frame (every count is linear in the length: each convolution's output is), so both implementations are
rated on the same work. Each row: seconds for `seconds` of audio, FLOP/s, that over the measured fp32
and bf16 matmul peaks, real-time factor, speed-up over the library, and the relative error of the output
against the library's (decode: the audio; encode: the encoder's continuous output z_e, with the share of
quantizer codes that agree). On CUDA the same code runs on the GPU against that GPU's peak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from jat.codecs.base import SAMPLE_RATE, latent_frames
from jat.codecs.dac import DACCodec
from jat.evaluation.benchmark import best_time
from jat.runtime import tune_cpu_runtime

log = logging.getLogger(__name__)

IMPLS = {"dac": {}, "ours": {"fast": True}, "ours-bf16": {"fast": True, "dtype": "bf16"}}
COUNT_FRAMES = 87  # frames FLOPs are counted on (1 s), then scaled by the length


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`, as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def dac_flops_per_frame(model, device: torch.device) -> dict[str, float]:
    """FLOPs per latent frame of DAC's encode (encoder and quantizer) and decode, from the library's model."""
    hop, T = int(model.hop_length), COUNT_FRAMES
    audio = torch.zeros(1, 1, T * hop, device=device)  # [1, 1, T*hop]
    z = torch.zeros(1, int(model.latent_dim), T, device=device)  # [1, C, T]
    return {"encode": count_flops(lambda: model.encode(audio)) / T,
            "decode": count_flops(lambda: model.decode(z)) / T}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def codec_speed(seconds: float = 10.0, device: str | torch.device = "cpu", repeats: int = 1,
                impls: tuple[str, ...] = tuple(IMPLS), model=None) -> list[dict]:
    """Rows {impl, op, seconds, flops, flops_per_s, rtf, speedup, rel_err[, codes_agree]} for DAC encode
    and decode of `seconds` of audio, each implementation in `impls` (`IMPLS`) timed as `DACCodec` runs it
    (best of `repeats` after a short warm-up), the library's first. `model`: a `dac.DAC` (default: the
    44 kHz architecture, random weights)."""
    import dac

    device = torch.device(device)
    torch.manual_seed(0)
    model = (model if model is not None else dac.DAC()).eval().to(device)
    per_frame = dac_flops_per_frame(model, device)
    codecs = {name: DACCodec(model, **IMPLS[name]).to(device) for name in impls}
    if device.type == "cpu":
        tune_cpu_runtime()  # as the Upsampler does, once the models are built
    g = torch.Generator().manual_seed(0)
    L = round(seconds * SAMPLE_RATE)
    T = latent_frames(seconds)
    audio = (0.1 * torch.randn(1, 1, L, generator=g)).to(device)  # [1, 1, L]
    z = torch.randn(1, int(model.latent_dim), T, generator=g).to(device)  # [1, C, T]
    probe = audio[..., : min(L, SAMPLE_RATE)]  # 1 s on which encode errors are measured
    ref: dict[str, torch.Tensor] = {}
    rows, base = [], {}
    for op in ("encode", "decode"):
        flops = per_frame[op] * T
        for name, codec in codecs.items():
            if op == "encode":
                codec.encode(audio[..., : 8 * codec.hop])  # warm-up
                t = best_time(lambda c=codec: c.encode(audio), repeats, warmup=0, device=device)
                z_e = codec.model.encoder(probe)  # [1, C, T'] continuous encoder output
                codes = codec.encode_codes(probe)  # [1, Q, T']
                ref.setdefault("z_e", z_e)
                ref.setdefault("codes", codes)
                extra = {"rel_err": _rel(z_e, ref["z_e"]),
                         "codes_agree": float((codes == ref["codes"]).float().mean())}
            else:
                codec.decode(z[..., :8])  # warm-up
                t = best_time(lambda c=codec: c.decode(z, L), repeats, warmup=0, device=device)
                y = codec.decode(z, L)  # [1, 1, L]
                ref.setdefault("y", y)
                extra = {"rel_err": _rel(y, ref["y"])}
            base.setdefault(op, t)
            rows.append({"impl": name, "op": op, "seconds": t, "audio_seconds": seconds, "flops": flops,
                         "flops_per_s": flops / t, "rtf": t / seconds, "speedup": base[op] / t, **extra})
            log.info("%s %s: %.2f s", name, op, t)
    return rows


def format_codec_rows(rows: list[dict], peak: dict[str, float]) -> str:
    """`codec_speed`'s rows as a table, FLOP/s against the fp32 and bf16 peaks in `peak` (FLOP/s)."""
    lines = [f"{'impl':<10}{'op':<7}{'s':>8}{'GFLOP/s':>9}{'/fp32':>7}{'/bf16':>7}{'RTF':>7}{'speedup':>9}"
             f"{'rel err':>10}{'codes':>7}"]
    for r in rows:
        codes = f"{r['codes_agree']:>7.1%}" if "codes_agree" in r else f"{'':>7}"
        lines.append(f"{r['impl']:<10}{r['op']:<7}{r['seconds']:>8.2f}{r['flops_per_s'] / 1e9:>9.1f}"
                     f"{r['flops_per_s'] / peak['fp32']:>7.0%}{r['flops_per_s'] / peak['bf16']:>7.0%}"
                     f"{r['rtf']:>7.3f}{r['speedup']:>8.2f}x{r['rel_err']:>10.1e}{codes}")
    return "\n".join(lines)
