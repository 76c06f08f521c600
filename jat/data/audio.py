"""Audio files in and out: loading with clear errors, atomic saving, resampling, file discovery.

Everything here works on float32 tensors shaped [C, L] (channels first). Files are read and
written with soundfile (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff, ...); torchaudio is
used only for resampling, with one high-quality Kaiser-windowed sinc preset shared by the whole
project (`resample`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from jat.atomic import TargetExistsError, write_atomic
from jat.codecs.base import SAMPLE_RATE

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")

# Kaiser-windowed sinc, 64 zero crossings per side, beta 8.6 (about 90 dB stopband). The pass band
# is flat to 0.95 of the lower Nyquist; at the lower Nyquist itself the response is below -70 dB.
# torchaudio's default (Hann, 6 zero crossings) is only -8 dB at Nyquist: too leaky for audio.
RESAMPLE_WIDTH = 64
RESAMPLE_ROLLOFF = 0.97
RESAMPLE_BETA = 8.6


# --- level ------------------------------------------------------------------------------------------

REF_RMS_DBFS = -20.0  # level normalisation: every channel is brought to this RMS ...
PEAK_MAX = 1.0  # ... unless that would push its peak above this (full scale)
SILENCE_PEAK = 2.0**-32  # a channel whose peak is below this counts as digital silence


def level_gain(audio: torch.Tensor) -> torch.Tensor:
    """Gain [...] per signal of audio [..., L] that brings its RMS to REF_RMS_DBFS, capped so that its
    peak stays at or below PEAK_MAX; 0 for digital silence (peak below SILENCE_PEAK).

    Why: the network and the codec's amplitude compression are not linear, so what the model adds
    depends on the input's level; a quiet or silent input is far from the levels it was trained on
    and comes back with generated noise at a typical level (digital silence gave noise at about
    -24 dBFS). Scaling every signal to one reference level before encoding and dividing the output
    by the same gain makes the result scale with the input: upsample(g * x) == g * upsample(x), bit
    for bit when g is a power of two (the gain is computed in float64 and every other step is linear
    or sees the same scaled signal). Training pairs are brought to the same level (`jat.data.datasets`,
    `jat.data.precompute`), so the model learns at the level it is used at. -20 dBFS RMS is a typical
    level of speech and music recordings; the peak cap keeps signals with a high crest factor within
    full scale, where the codec was trained. SILENCE_PEAK lies below the smallest step of 32-bit PCM
    (2^-31): no integer file can hold anything quieter, and a float file that does is numerical dust;
    it also keeps the gain finite in float32 (at most 2^32).
    """
    n, chunk = audio.shape[-1], 2**20  # float64 a chunk at a time: no float64 copy of a long signal
    squares = sum(audio[..., a : a + chunk].double().square().sum(-1) for a in range(0, n, chunk))
    return gain_from_stats(squares, n, audio.abs().amax(-1).double())


def gain_from_stats(squares: torch.Tensor, n: int, peak: torch.Tensor) -> torch.Tensor:
    """`level_gain` [...] from a signal's sums of squares [...] over n samples and its peaks [...]
    (float64), so a signal measured a block at a time gets the same gain as the whole of it at once."""
    rms = (squares / max(n, 1)).sqrt()  # [...]
    gain = torch.minimum(10 ** (REF_RMS_DBFS / 20) / rms, PEAK_MAX / peak)
    return torch.where(peak >= SILENCE_PEAK, gain, 0.0).float()


def restore_level(out: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """out [..., L] divided by `level_gain`'s gain [...]; exactly zero where the gain is 0 (silence)."""
    gain = gain.to(out.device)[..., None]
    return torch.where(gain > 0, out / gain, 0.0)


class AudioError(ValueError):
    """An audio file problem (missing, unreadable, empty, silent, non-finite); names the file."""


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Samples after `resample`: ceil(length * new_sr / orig_sr), the same duration."""
    return -(-length * new_sr // orig_sr)


def resample(
    audio: torch.Tensor, orig_sr: int, new_sr: int, rolloff: float = RESAMPLE_ROLLOFF
) -> torch.Tensor:
    """Resample `audio` [..., L] from `orig_sr` to `new_sr` (band-limited sinc, Kaiser window).

    Output length is `resampled_length(L, orig_sr, new_sr)`. `rolloff` places the anti-alias cutoff as a
    fraction of the lower Nyquist frequency. A no-op when the rates are equal.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return audio
    return AF.resample(
        audio, orig_sr, new_sr, lowpass_filter_width=RESAMPLE_WIDTH, rolloff=rolloff,
        resampling_method="sinc_interp_kaiser", beta=RESAMPLE_BETA,
    )  # [..., L']


def load_audio(
    path: str | Path, target_sr: int | None = SAMPLE_RATE, mono: bool = False, allow_silent: bool = False
) -> torch.Tensor:
    """Read an audio file as float32 [C, L] at `target_sr` (None: keep the file's rate).

    Raises AudioError naming the file when it is missing, not readable as audio, empty, all
    zeros (unless `allow_silent`) or holds NaN/Inf samples. `mono` averages the channels to [1, L].
    """
    audio, sr = read_samples(path)
    if mono:
        audio = audio.mean(dim=0, keepdim=True)  # [1, L]
    if not allow_silent and not bool(audio.abs().amax() > 0):
        raise AudioError(f"{path}: audio is silent (all samples are zero)")
    if target_sr is not None and sr != target_sr:
        audio = resample(audio, sr, target_sr)  # [C, L']
    return audio.contiguous()


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample rate, channels, frames) of an audio file without reading its samples."""
    path = _existing_file(path)
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile raises several types for malformed files
        raise _unreadable(path, exc) from None
    return int(info.samplerate), int(info.channels), int(info.frames)


def _existing_file(path: str | Path) -> Path:
    """`path` if it is a file this process can open, else an AudioError naming it and the cause."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    try:  # opened here first: libsndfile reports a file it may not open only as "System error."
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return path


def _unreadable(path: Path, exc: Exception) -> AudioError:
    """The error for a file that opens but that soundfile cannot decode, with libsndfile's reason."""
    reason = getattr(exc, "error_string", None) or f"{type(exc).__name__}: {exc}"  # without the path again
    return AudioError(f"{path}: not a readable audio file (soundfile: {reason})")


def read_samples(path: str | Path, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, int]:
    """The file's samples [start, stop) as float32 [C, L] and its rate; every failure is an AudioError."""
    path = _existing_file(path)
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)  # [L, C]
    except Exception as exc:  # LibsndfileError, RuntimeError, ValueError, ... for malformed input
        raise _unreadable(path, exc) from None
    if sr <= 0:
        raise AudioError(f"{path}: invalid sample rate {sr}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(f"{path}: {bad} NaN/Inf samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)  # [C, L]


def save_audio(
    path: str | Path, audio: torch.Tensor | np.ndarray, sr: int, format: str | None = None,
    subtype: str | None = None, overwrite: bool = True,
) -> Path:
    """Write `audio` [C, L] (or [L]) atomically (`jat.atomic.write_atomic`: a temporary file beside
    `path`, then moved into place).

    On failure the previous file at `path` (if any) is untouched, the temporary file is removed
    and an AudioError naming `path` is raised; without `overwrite` an existing `path` is an error
    too, even one that appears while writing. `format`/`subtype` are soundfile's (default: from
    the extension; PCM_16 for wav/flac). Missing parent folders are created. A writer killed
    mid-write leaves its temporary file, which `jat.atomic.remove_stale_temps` recognises by its dead pid.
    """
    path = Path(path)
    data = audio.detach().cpu().float().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if data.ndim == 1:
        data = data[None]  # [1, L]
    if data.ndim != 2 or data.shape[1] == 0:
        raise AudioError(f"{path}: expected audio shaped [C, L] with L > 0, got {tuple(data.shape)}")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: refusing to write NaN/Inf samples")
    peak = float(np.abs(data).max())
    if peak > 1.0:
        log.warning("%s: peak %.3f exceeds 1.0; integer formats will clip", path, peak)
    try:
        write_atomic(path, lambda tmp: sf.write(str(tmp), data.T, int(sr), format=format, subtype=subtype),
                     overwrite)  # [L, C]
    except TargetExistsError:
        raise exists_error(path) from None
    except Exception as exc:
        raise AudioError(f"{path}: could not write audio ({type(exc).__name__}: {exc})") from exc
    return path


def exists_error(path: Path) -> AudioError:
    """The error for an output that exists when it may not be replaced."""
    return AudioError(f"{path}: exists (pass --overwrite to replace it)")


def list_audio_files(source: str | Path) -> list[Path]:
    """Audio files named by `source`: a folder (recursive, sorted), a manifest or a single file.

    A manifest is a .txt file with one path per line, relative to the manifest's folder; blank
    lines and lines starting with '#' are skipped. Hidden files (names starting with '.') in a
    folder are ignored. Raises AudioError if the source is missing or yields no audio files.
    """
    source = Path(source)
    if not source.exists():
        raise AudioError(f"{source}: audio source not found")
    if source.is_dir():
        files = sorted(
            p for p in source.rglob("*")
            if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise AudioError(f"{source}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
        return files
    if source.suffix.lower() == ".txt":
        return _read_manifest(source)
    if source.suffix.lower() in AUDIO_EXTENSIONS:
        return [source]
    known = ", ".join(AUDIO_EXTENSIONS)
    raise AudioError(f"{source}: not a folder, a .txt manifest or an audio file ({known})")


def _read_manifest(manifest: Path) -> list[Path]:
    files = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else manifest.parent / entry
        if not path.is_file():
            raise AudioError(f"{manifest}:{number}: listed audio file {path} not found")
        files.append(path)
    if not files:
        raise AudioError(f"{manifest}: manifest lists no audio files")
    return files
