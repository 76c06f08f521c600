"""Sample rates around the model (docs/design.md section 7): the model runs at 44.1 kHz; the output is
written at 44.1 kHz, 48 kHz or the input's own rate where that is higher, and resampled to it in blocks.

Output length at rate R for L input samples at rate sr: ceil(L * R / sr), the input's duration rounded
up to a whole sample (`rate_length`). At R = 44.1 kHz this is `band.output_length`.
"""

from __future__ import annotations

import math

import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import RESAMPLE_ROLLOFF, RESAMPLE_WIDTH, resample, resampled_length
from jat.infer.blocks import Local

OUTPUT_RATES = ("44100", "48000", "input")  # what --output-rate offers


def output_rate(spec: int | str | None, sr: int) -> int:
    """The output rate for an input at `sr`: an int (at least 44.1 kHz: the model's band is not cut), or
    'input' (the input's rate where it is above 44.1 kHz, else 44.1 kHz); None means 44.1 kHz."""
    if spec is None:
        return SAMPLE_RATE
    if spec == "input":
        return max(int(sr), SAMPLE_RATE)
    try:
        rate = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"output rate must be a rate in Hz or 'input', got {spec!r}") from None
    if rate < SAMPLE_RATE:
        raise ValueError(f"output rate must be at least {SAMPLE_RATE} Hz (the model's rate), got {rate}")
    return rate


def rate_length(length: int, sr: int, rate: int) -> int:
    """Samples at `rate` for `length` samples at `sr`: ceil(length * rate / sr)."""
    return resampled_length(length, sr, rate)


def resampler(orig: int, new: int, total_in: int, block_seconds: float = 30.0,
              total_out: int | None = None) -> Local:
    """A streaming `jat.data.audio.resample` from `orig` to `new` Hz for a `total_in`-sample signal.

    Blocks start on the polyphase period (`orig / gcd` input samples give exactly `new / gcd` outputs).
    The sinc kernel reaches RESAMPLE_WIDTH zero crossings of its low-pass (at RESAMPLE_ROLLOFF of the
    lower Nyquist) either side: RESAMPLE_WIDTH / RESAMPLE_ROLLOFF * max(1, orig / new) input samples;
    the context is twice that plus one period. `total_out` crops (default: `rate_length`).
    """
    g = math.gcd(int(orig), int(new))
    period, new_period = orig // g, new // g
    reach = RESAMPLE_WIDTH / RESAMPLE_ROLLOFF * max(1.0, orig / new)  # input samples
    context = math.ceil((2 * reach + period) / period)
    block = max(1, round(block_seconds * orig / period))
    out = rate_length(total_in, orig, new) if total_out is None else total_out
    if orig == new:
        return Local(lambda x: x, total_in, out, 1, 1, 0, max(1, round(block_seconds * orig)))
    return Local(lambda x: resample(x, orig, new), total_in, out, period, new_period, context, block)


def resample_blocks(audio: torch.Tensor, orig: int, new: int, length: int | None = None,
                    block_seconds: float = 30.0) -> torch.Tensor:
    """audio [C, L] at `orig` -> [C, length or rate_length(L)] at `new`, in blocks of about
    `block_seconds` that join exactly: `resample(audio, orig, new)` up to float rounding."""
    if orig == new and length in (None, audio.shape[-1]):
        return audio
    return resampler(orig, new, audio.shape[-1], block_seconds, total_out=length).run(audio)
