"""Spectrogram pictures: side-by-side figures for reports and RGB arrays for TensorBoard.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never open a window

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from jat.atomic import write_atomic  # noqa: E402

DYNAMIC_RANGE_DB = 80.0  # colour scale spans this far below the loudest bin


def log_spectrogram(audio: np.ndarray | torch.Tensor, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """Log power (dB) [F, frames] of mono audio [L] (channels, if any, are averaged in power)."""
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not isinstance(audio, torch.Tensor) else audio)
    x = x.detach().float().cpu().reshape(-1, x.shape[-1])  # [C, L]
    if x.shape[-1] < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)  # [C, F, N]
    power = spec.abs().pow(2).mean(dim=0)  # [F, N]
    return (10 * torch.log10(power + 1e-12)).numpy()


def spectrogram_figure(
    signals: dict[str, np.ndarray | torch.Tensor], sr: int, path: str | Path | None = None,
    n_fft: int = 2048, hop: int = 512,
) -> Figure:
    """One log-power spectrogram panel per named signal, side by side, sharing the colour scale.

    Saved as PNG at `path` when given (atomically, `jat.atomic.write_atomic`; parent folders created).
    Returns the Figure.
    """
    if not signals:
        raise ValueError("no signals to plot")
    specs = {name: log_spectrogram(x, n_fft, hop) for name, x in signals.items()}
    vmax = max(float(s.max()) for s in specs.values())
    fig = Figure(figsize=(4.0 * len(specs), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(specs), sharey=True, squeeze=False)[0]
    image = None
    for ax, (name, spec) in zip(axes, specs.items(), strict=True):
        seconds = spec.shape[1] * hop / sr
        image = ax.imshow(
            spec, origin="lower", aspect="auto", cmap="magma", vmin=vmax - DYNAMIC_RANGE_DB, vmax=vmax,
            extent=(0.0, seconds, 0.0, sr / 2000),
        )
        ax.set_title(name)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("frequency (kHz)")
    fig.colorbar(image, ax=list(axes), label="dB")
    if path is not None:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


def spectrogram_image(
    audio: np.ndarray | torch.Tensor, sr: int, n_fft: int = 2048, hop: int = 512
) -> np.ndarray:
    """Spectrogram of `audio` as an RGB image [H = n_fft / 2 + 1, W = frames, 3] uint8.

    Low frequencies at the bottom row, colour map magma over the top 80 dB; ready for
    TensorBoard's add_image(..., dataformats="HWC"). `sr` is accepted for symmetry with the figure.
    """
    del sr  # the image has no axes; kept in the signature so callers need not special-case it
    spec = log_spectrogram(audio, n_fft, hop)  # [F, N]
    top = float(spec.max())
    norm = np.clip((spec - (top - DYNAMIC_RANGE_DB)) / DYNAMIC_RANGE_DB, 0.0, 1.0)  # [F, N]
    rgba = colormaps["magma"](norm[::-1])  # [F, N, 4] row 0 = highest frequency
    return (rgba[..., :3] * 255).round().astype(np.uint8)
