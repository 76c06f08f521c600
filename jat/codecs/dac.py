"""The descript-audio-codec (DAC) backend: continuous latents = the quantized `z` its decoder was trained on.

Framing. `dac.DAC.encode` needs a length that is a multiple of the hop (the library's own
`preprocess` right-pads with zeros); every strided layer then maps hop samples to one frame, so
T = ceil(L / hop) and frame t is centred on samples [t*hop, (t+1)*hop). `decode` returns exactly
T * hop samples, cropped to the requested length.

Chunking. Long audio is processed in chunks of `chunk_seconds`, each read with `context_frames`
extra frames on both sides (at least the network's one-sided receptive field, computed from its
convolutions) and trimmed back to its centre. With enough context every kept frame sees the same
input as in one pass, so chunked output equals one-shot output up to float rounding. (The library's
own `compress` instead turns off convolution padding and so differs from a one-shot `encode`.)

Speed. With `fast` (`codec.dac_fast`, the default for a codec built from its config) the encoder and
decoder run in the form `jat/codecs/dac_fast.py` builds (weight norm folded once, channels-last layout,
polyphase resampling, the high-rate stages tiled): the same function up to float rounding, 2.3x faster
on 2 CPU cores (docs/benchmarks.md "DAC codec"). `dtype` bf16 (`codec.dac_dtype`) runs its convolutions in
bf16, faster again where the CPU has AVX512-BF16 but about 1e-2 relative from fp32; fp32 is the default.

Codes. `encode_codes` gives the residual quantizer's codes [B, Q, T] (Q codebooks of `codebook_size`
entries) and `from_codes` turns them back into z; `encode` is the two in turn, so a cache of codes
(jat/data/precompute.py) rebuilds exactly the latents direct encoding gives, at 2 bytes per code.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodecConfig
from .base import Codec, CodecError, chunk_ranges
from .dac_fast import fast_dac

FAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # `codec.dac_dtype` -> the fast form's dtype

if TYPE_CHECKING:
    import dac

log = logging.getLogger(__name__)


def dac_cache_path(model_type: str = "44khz", model_bitrate: str = "8kbps") -> Path:
    """Where `dac.utils.download` caches the latest weights of this model type and bitrate."""
    import dac.utils

    tag = dac.utils.__MODEL_LATEST_TAGS__.get((model_type, model_bitrate), "latest")
    return Path.home() / ".cache" / "descript" / "dac" / f"weights_{model_type}_{model_bitrate}_{tag}.pth"


def load_dac_model(cfg: CodecConfig) -> dac.DAC:
    """Load pretrained DAC weights from `cfg.dac_weights` or the library's download cache.

    Raises:
        CodecError: the weights are in neither place (and could not be downloaded), naming both fixes.
    """
    import dac
    import dac.utils

    model_type, bitrate = cfg.dac_model_type, cfg.dac_model_bitrate
    cache = dac_cache_path(model_type, bitrate)
    key = (model_type, dac.utils.__MODEL_LATEST_TAGS__.get((model_type, bitrate)), bitrate)
    url = dac.utils.__MODEL_URLS__.get(key, "the descript-audio-codec GitHub releases")
    how = (
        f"Either (1) set codec.dac_weights to a local weights file (.pth, from {url}), or (2) run once "
        f"with internet access so descript-audio-codec downloads the {model_type} {bitrate} weights into "
        f"its cache at {cache} (e.g. `python -m dac download --model_type {model_type} "
        f"--model_bitrate {bitrate}`). The weight-free codec.name=mdct needs neither."
    )
    if cfg.dac_weights:
        path = Path(cfg.dac_weights).expanduser()
        if not path.is_file():
            raise CodecError(f"DAC weights not found: codec.dac_weights={cfg.dac_weights!r} is not a file. "
                             f"{how}")
    else:
        try:
            path = Path(dac.utils.download(model_type=model_type, model_bitrate=bitrate))
        except Exception as exc:  # no internet, bad response, unknown model type ...
            raise CodecError(
                f"DAC weights not found: codec.dac_weights is not set and the download cache has no "
                f"weights (download failed: {type(exc).__name__}: {exc}). {how}"
            ) from exc
    log.info("loading DAC weights from %s", path)
    try:
        return dac.DAC.load(str(path))
    except Exception as exc:
        raise CodecError(f"could not load DAC weights from {path}: {type(exc).__name__}: {exc}") from exc


def receptive_field_frames(model: dac.DAC) -> int:
    """A safe one-sided receptive field, in latent frames, of the DAC encoder and of its decoder.

    Each convolution of dilation d and kernel k, running at `step` frames per position, widens the
    field by (k - 1) * d * step; a transposed convolution of stride s reads ceil(k / s) inputs per
    output. The total width is used as the one-sided extent, which over-covers by about 2x.
    """
    hop = int(model.hop_length)
    step = 1.0 / hop  # encoder: frames per input sample, growing with each stride
    enc = 0.0
    for m in model.encoder.modules():
        if isinstance(m, nn.Conv1d):
            enc += (m.kernel_size[0] - 1) * m.dilation[0] * step
            step *= m.stride[0]
    step, dec = 1.0, 0.0  # decoder: starts at one frame per position, shrinking with each stride
    for m in model.decoder.modules():
        if isinstance(m, nn.ConvTranspose1d):
            dec += math.ceil(m.kernel_size[0] / m.stride[0]) * step
            step /= m.stride[0]
        elif isinstance(m, nn.Conv1d):
            dec += (m.kernel_size[0] - 1) * m.dilation[0] * step
    return math.ceil(max(enc, dec)) + 1


class DACCodec(Codec):
    """A frozen DAC model as a codec: audio [B, 1, L] <-> z [B, latent_dim, ceil(L / hop)].

    Args:
        model: a ready `dac.DAC` (e.g. a tiny randomly initialised one in tests), or a `CodecConfig`
            whose `dac_weights` / download cache provides pretrained weights (`load_dac_model`).
        chunk_seconds: audio per chunk for long signals; taken from the config when one is given.
        context_frames: frames of context read on each side of a chunk; default: the receptive field.
        fast: run the encoder and decoder in their fast form (`dac_fast.fast_dac`; a given model is left
            as it is); taken from `codec.dac_fast` when a config is given.
        dtype: the fast form's convolution precision, 'fp32' or 'bf16'; from `codec.dac_dtype` likewise.
    """

    def __init__(
        self,
        model: dac.DAC | CodecConfig,
        chunk_seconds: float = 30.0,
        context_frames: int | None = None,
        fast: bool = False,
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        if isinstance(model, CodecConfig):
            chunk_seconds, fast, dtype = model.chunk_seconds, model.dac_fast, model.dac_dtype
            model = load_dac_model(model)
        if dtype not in FAST_DTYPES:
            raise CodecError(f"unknown DAC precision '{dtype}' (choose {' or '.join(FAST_DTYPES)})")
        if getattr(model, "padding", True) is not True:
            model.padding = True  # chunk trimming assumes the padded ("same") convolutions
        model = model.eval().requires_grad_(False)
        self.context_frames = receptive_field_frames(model) if context_frames is None else context_frames
        self.fast, self.dtype = fast, dtype if fast else "fp32"
        if fast:
            model = fast_dac(model, FAST_DTYPES[dtype])
        self.model = model
        self.sample_rate = int(model.sample_rate)
        self.hop = int(model.hop_length)
        self.latent_dim = int(model.latent_dim)
        self.chunk_seconds = chunk_seconds

    def train(self, mode: bool = True) -> DACCodec:
        """The codec stays frozen in eval mode whatever its parent module does."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def _dtype(self) -> torch.dtype:
        """The dtype audio and latents are handed over in (the quantizer's; a fast form casts inside)."""
        return next(self.model.quantizer.parameters()).dtype

    @property
    def n_codebooks(self) -> int:
        """Residual codebooks Q of the quantizer (9 for the 44 kHz 8 kbps weights)."""
        return int(self.model.n_codebooks)

    @property
    def codebook_size(self) -> int:
        """Entries per codebook (1024 for the 44 kHz weights: 10 bits per code)."""
        return int(self.model.codebook_size)

    @torch.no_grad()
    def encode_codes(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 1, L] audio -> quantizer codes [B, Q, ceil(L / hop)] int64 (chunked like `encode`)."""
        self._check_audio(audio)
        hop, ctx = self.hop, self.context_frames
        total = self.num_frames(audio.shape[-1])
        x = F.pad(audio.to(self._dtype), (0, total * hop - audio.shape[-1]))  # [B, 1, T*hop]
        out = torch.empty(x.shape[0], self.n_codebooks, total, dtype=torch.long, device=x.device)  # [B, Q, T]
        for f0, f1 in chunk_ranges(total, self.chunk_frames):
            a, b = max(f0 - ctx, 0), min(f1 + ctx, total)  # chunk plus context, in frames
            codes = self.model.encode(x[..., a * hop : b * hop])[1]  # [B, Q, b - a]
            out[..., f0:f1] = codes[..., f0 - a : f1 - a]
        return out

    @torch.no_grad()
    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q, T] (any integer dtype) -> z [B, latent_dim, T]: the sum over codebooks of each
        chosen entry, projected out (`quantizer.from_codes`). Frames are independent: no chunking."""
        if codes.dim() != 3 or codes.shape[1] != self.n_codebooks:
            raise CodecError(f"DAC codes must be [B, {self.n_codebooks}, T], got {tuple(codes.shape)}")
        return self.model.quantizer.from_codes(codes.long())[0]  # [B, C, T]

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 1, L] audio -> quantized continuous latents z [B, latent_dim, ceil(L / hop)].

        z is rebuilt from the codes (`from_codes`), not taken from the quantizer's forward pass, whose
        straight-through form z_e + (z_q - z_e) equals the codebook entry only up to float rounding:
        so latents rebuilt from a codes cache are bit-identical to this encoding.
        """
        return self.from_codes(self.encode_codes(audio))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[B, latent_dim, T] latents -> [B, 1, length or T*hop] audio."""
        self._check_latents(latents, length)
        hop, ctx = self.hop, self.context_frames
        z = latents.to(self._dtype)
        total = z.shape[-1]
        out = z.new_empty(z.shape[0], 1, total * hop)  # [B, 1, T*hop]
        for f0, f1 in chunk_ranges(total, self.chunk_frames):
            a, b = max(f0 - ctx, 0), min(f1 + ctx, total)
            y = self.model.decode(z[..., a:b])  # [B, 1, (b - a) * hop]
            if y.shape[-1] != (b - a) * hop:
                raise CodecError(f"DAC decoder gave {y.shape[-1]} samples for {b - a} frames, not {hop} each")
            out[..., f0 * hop : f1 * hop] = y[..., (f0 - a) * hop : (f1 - a) * hop]
        return out if length is None else out[..., :length]
