"""Which layers to adapt: the signal-to-noise ratio of a weight's singular values (docs/design.md section 6).

After Spectrum (Hartford et al. 2024), with the noise level of Gavish & Donoho (2014). A weight W [m, n]
(the shorter side m' = min(m, n), the longer n' = max(m, n), beta = m' / n') is read as signal plus
i.i.d. noise of standard deviation sigma. The singular values of such noise fill a bulk up to the
Marchenko-Pastur edge

    edge = sigma (sqrt(m) + sqrt(n))

and their median is sigma sqrt(n' mu_beta), mu_beta the median of the Marchenko-Pastur law of ratio
beta. So sigma is estimated robustly from the median singular value s_med (robust as long as the signal
has rank below m' / 2), without knowing the signal:

    sigma = s_med / sqrt(n' mu_beta)

and the layer's signal-to-noise ratio is the energy of its singular values above the edge over the
energy of those below:

    SNR = sum_{s_i > edge} s_i² / sum_{s_i <= edge} s_i²      (inf when nothing lies below the edge)

Pure noise has SNR about 0 (its largest singular value sits at the edge, up to Tracy-Widom
fluctuations of order n'^(-2/3)); a layer that learnt structure has singular values far outside.

Selection, as Spectrum does it, is per kind of layer (`attn.q`, `mlp.fc1`, ...: the name without its
`blocks.<i>.` prefix), since SNRs of different roles and shapes are not comparable: of each kind's n
layers the ceil(fraction · n) with the highest SNR are kept (at least one per kind; fraction 0.5 of
an even count is exactly half). Ties go to the earlier layer.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn


@functools.cache
def mp_median(beta: float) -> float:
    """The median of the Marchenko-Pastur law of ratio beta in (0, 1]: the limit law of the eigenvalues
    of Z Z^T / n for Z [m, n] with i.i.d. N(0, 1) entries, beta = m / n; support [(1 - √β)², (1 + √β)²]."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    if not 0 < beta <= 1:
        raise ValueError(f"Marchenko-Pastur ratio must be in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def cdf(x: float) -> float:  # the density sqrt((hi - x)(x - lo)) / (2 pi beta x), integrated from lo
        return quad(lambda t: math.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * math.pi * beta * t), lo, x,
                    limit=200)[0]

    return brentq(lambda x: cdf(x) - 0.5, lo + 1e-12, hi, xtol=1e-12)


@dataclass(frozen=True)
class LayerSNR:
    """One weight's spectrum summary."""

    name: str
    kind: str  # the name without its block prefix: what selection compares it with
    shape: tuple[int, int]
    sigma: float  # the estimated noise standard deviation per entry
    edge: float  # the Marchenko-Pastur edge sigma (sqrt(m) + sqrt(n))
    above: int  # singular values above the edge (the signal's estimated rank)
    top: float  # the largest singular value
    snr: float  # energy above the edge / energy below


def layer_kind(name: str) -> str:
    """`blocks.3.attn.q` -> `attn.q`."""
    return re.sub(r"^(.*\.)?blocks\.\d+\.", "", name)


def weight_snr(weight: torch.Tensor) -> tuple[float, float, int, float, float]:
    """(sigma, edge, singular values above the edge, largest singular value, SNR) of a matrix [m, n];
    singular values in float64."""
    if weight.dim() != 2 or min(weight.shape) < 1:
        raise ValueError(f"need a matrix, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    s = torch.linalg.svdvals(weight.detach().double())  # descending, min(m, n) of them
    short, long = min(m, n), max(m, n)
    sigma = torch.quantile(s, 0.5).item() / math.sqrt(long * mp_median(short / long))
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    energy = s.square()
    signal, noise = energy[s > edge].sum().item(), energy[s <= edge].sum().item()
    snr = signal / noise if noise > 0 else math.inf
    return sigma, edge, int((s > edge).sum()), s[0].item(), snr


def rank_layers(linears: dict[str, nn.Module]) -> list[LayerSNR]:
    """The SNR of every linear's weight (plain full-precision linears: rank before quantizing), highest
    first."""
    out = []
    for name, linear in linears.items():
        sigma, edge, above, top, snr = weight_snr(linear.weight)
        out.append(LayerSNR(name, layer_kind(name), tuple(linear.weight.shape), sigma, edge, above, top, snr))
    order = {name: i for i, name in enumerate(linears)}
    return sorted(out, key=lambda r: (-r.snr, order[r.name]))


def select_layers(ranked: list[LayerSNR], fraction: float) -> list[str]:
    """The names of the ceil(fraction · n) highest-SNR layers of each kind (n: the layers of that kind),
    in the order `ranked` came from rank_layers in (highest SNR first)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    kinds: dict[str, list[LayerSNR]] = {}
    for r in ranked:
        kinds.setdefault(r.kind, []).append(r)
    # round first: 0.3 * 10 is 3.0000000000000004, whose ceiling would be 4
    keep = {r.name for rows in kinds.values() for r in rows[:math.ceil(round(fraction * len(rows), 9))]}
    return [r.name for r in ranked if r.name in keep]


def format_snr_table(ranked: list[LayerSNR], chosen: list[str] | None = None) -> str:
    """A printable table, grouped by kind (first-seen order), highest SNR first within each; `*` marks
    the chosen layers."""
    chosen_set = set(chosen or ())
    kinds: dict[str, list[LayerSNR]] = {}
    for r in ranked:
        kinds.setdefault(r.kind, []).append(r)
    width = max([len(r.name) for r in ranked] + [5])
    lines = [f"{'layer':<{width}}  rank  {'shape':>11}  {'sigma':>9}  {'edge':>9}  {'top':>9}  above  "
             f"{'SNR':>9}  chosen"]
    for rows in kinds.values():
        for i, r in enumerate(rows, 1):
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {f'{i}/{len(rows)}':>4}  {shape:>11}  {r.sigma:9.3g}  "
                         f"{r.edge:9.3g}  {r.top:9.3g}  {r.above:5d}  {r.snr:9.3g}  "
                         f"{'*' if r.name in chosen_set else ''}")
    return "\n".join(lines)
