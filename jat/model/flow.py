"""Flow matching on latents: timestep sampling, the x-prediction velocity loss, guidance, samplers.

Time convention (everywhere in this project): t = 0 is noise, t = 1 is data.

    z_t = t·x + (1 - t)·ε,  ε ~ N(0, I)
    velocity  v = dz_t/dt = x - ε = (x - z_t) / (1 - t)

The network predicts x̂ (x-prediction); the loss compares velocities,
    v̂ = (x̂ - z_t) / max(1 - t, t_eps),  v = (x - z_t) / max(1 - t, t_eps),  loss = mean((v̂ - v)²),
and sampling integrates dz/dt = (x̂ - z)/(1 - t) from t = 0 to 1 (Euler or Heun, with a final Euler
step, which lands exactly on x̂).

Output parametrisation (`flow.precondition`, docs/design.md "Objective"). With "none" (V2's default)
the network output is x̂ itself. With "band", for band-split latents such as the mdct codec's, x̂ is
the posterior mean of a simple prior plus a learned correction, in the manner of EDM's
preconditioning: x = c + r, where the residual r is zero in the channels the condition carries and
N(0, σ_k²) in the channels it lacks, so that

    x̂ = c + s_k(t)·(z_t - t·c) + o_k(t)·F,   s_k = t σ_k² / (t² σ_k² + (1-t)²),
                                             o_k = (1-t) σ_k / sqrt(t² σ_k² + (1-t)²).

s_k·(z_t - t·c) is E[r | z_t] under that prior: it carries z_t through wherever it is informative
(the network cannot: its input bottleneck is far narrower than a token's 2·C·p values) and the
condition's own band passes untouched (σ_k -> 0). o_k scales F so that the velocity loss weights
every t about equally: F's weight in the loss, o_k² / (1-t)², is at most 1 + σ_k² at every t instead
of growing as 1 / (1-t)². σ_k = σ_min·(1 - absent_k) + absent_k·exp(level + e_k): absent_k (in
[0, 1]) from the condition's own RMS per channel over the segment (no cutoff needs to be known),
level the expected log-level of an empty channel (`band_prior`), e_k a per-frame log-envelope on
`model.envelope_bands` bands predicted from the condition alone (`jat.model.dit.EnvelopeHead`),
interpolated over the C channels and trained by a likelihood of the band power
(`envelope_error`): the level of what is generated is set there, in a handful of numbers per
frame, instead of by rescaling noise through the bottleneck.

A few-step student (`flow.band_skip: straight`) is trained on straight paths from its noise ε to its
teacher's sample, which in an empty channel is about c + σε (the prior's ODE carries ε to σε). On such a
line z_t - t·c = (tσ + 1 - t)·ε, so its end is c + σ (z_t - t·c) / (tσ + 1 - t): that is its skip, with
the same o_k. At t = 0 it is c + σε, where the posterior mean is c: a student with the posterior skip
must carry ε's 2·C·p values per token through the bottleneck to reproduce the sample's fine structure,
cannot, and returns a band that is the mean of many, far too quiet (docs/quality.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from jat.config import FlowConfig

ENV_LOG_RANGE = 7.0  # |predicted log-envelope| is clamped here: a factor of e^7 ≈ 1100 either way
# "lognormal": the spread channel s gives the standard deviation exp(s + SPREAD_OFFSET) of log σ; the offset
# starts a zero-initialised head at 0.5 (4.3 dB), the order of the frame-to-frame spread left open
SPREAD_OFFSET = math.log(0.5)
SPREAD_LOG_RANGE = (-5.0, 1.0)  # clamp of log std(log σ): e^-5 ≈ 0.04 dB-scale certainty .. e ≈ 24 dB


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor: ...


def u_shaped_cdf(t: torch.Tensor, a: float) -> torch.Tensor:
    """CDF of p(t) ∝ cosh(a(t - 1/2)) on [0, 1]: (sinh(a(t - 1/2)) + sinh(a/2)) / (2 sinh(a/2))."""
    return (torch.sinh(a * (t - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))


@dataclass
class FlowNoise:
    """The random draws of one loss evaluation: timesteps t [B], noise eps [B, C, T], dropped [B]."""

    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor

    @staticmethod
    def cat(parts: list[FlowNoise]) -> FlowNoise:
        return FlowNoise(*(torch.cat([getattr(p, k) for p in parts]) for k in ("t", "eps", "drop")))


SMOOTH_CHANNELS = 17  # flow.band_level smooth: running median of the channel std over 17 channels (~730 Hz)


class FlowMatching:
    """Owns the training loss and the sampler for an x-predicting network.

    `norm` (the latent statistics, a `LatentNorm`, kept by reference so a resumed run's loaded values are
    seen) is needed by flow.band_level smooth only."""

    def __init__(self, cfg: FlowConfig | None = None, norm=None):
        self.cfg = cfg or FlowConfig()
        self.norm = norm

    def smooth_level(self) -> torch.Tensor:
        """log(m_k / s_k) [C] for flow.band_level smooth: s_k the training set's std in channel k, m_k its
        running median over SMOOTH_CHANNELS neighbours. An empty channel generated at σ = exp(this) in
        normalised units comes out at m_k in the codec's: a spectrum smooth across channels, where a
        channel whose std a tone in a few training files raised (mdct's 15.6 kHz: 1.66 x its neighbours)
        would otherwise stand out as a line in every output."""
        if self.norm is None:
            raise ValueError("flow.band_level smooth needs the latent statistics (FlowMatching(cfg, norm))")
        std = self.norm.std.float()  # [C]
        half = SMOOTH_CHANNELS // 2
        padded = F.pad(std[None, None], (half, half), mode="replicate")[0, 0]  # [C + 2 half]
        median = padded.unfold(0, SMOOTH_CHANNELS, 1).median(dim=-1).values  # [C]
        return torch.log(median / std)

    # --- timesteps -------------------------------------------------------------------------------
    def sample_t(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training timesteps from the configured distribution, in [1e-5, 1 - 1e-5]."""
        kind, a = self.cfg.timesteps, self.cfg.u_shape_a
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        if kind == "uniform":
            t = u
        elif kind == "logit_normal":
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            t = torch.sigmoid(self.cfg.logit_normal_mean + self.cfg.logit_normal_std * z)
        else:  # u_shaped: cosh(a(t-1/2)) ∝ e^{a t} + e^{a(1-t)}, an even mix of s and 1 - s
            # where s has density ∝ e^{a s} on [0, 1], drawn exactly by inverse CDF
            s = torch.log1p(u * math.expm1(a)) / a
            flip = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < 0.5
            t = torch.where(flip, 1 - s, s)
        return t.clamp(1e-5, 1 - 1e-5).float()

    # --- training --------------------------------------------------------------------------------
    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None,
             evaluations: list[int] | None = None) -> FlowNoise:
        """Timesteps, noise and condition-dropout flags for a batch shaped like x [B, C, T].

        With `evaluations` (a few-step student's budgets, e.g. [1, 2, 4]) t is instead a point of one
        of their Euler grids: a budget K drawn uniformly, then one of its K points k / K (so t = 0,
        where every budget starts, is drawn most often)."""
        B = x.shape[0]
        t = self.sample_t(B, device=x.device, generator=generator)  # [B]
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)  # [B, C, T]
        drop = torch.rand(B, generator=generator, device=x.device) < self.cfg.cond_dropout  # [B]
        if evaluations:
            budgets = torch.tensor(evaluations, device=x.device, dtype=torch.float32)  # [n]
            pick = torch.randint(len(evaluations), (B,), generator=generator, device=x.device)
            K = budgets[pick]  # [B]
            k = torch.floor(torch.rand(B, generator=generator, device=x.device) * K).clamp_max(K - 1)
            t = k / K  # [B] a grid point of the student's Euler sampler
        return FlowNoise(t, eps, drop)

    def loss(self, model: Denoiser, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: FlowNoise | None = None,
             data: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity-space loss of an x-predicting model on clean latents x [B, C, T], condition c.

        mask [B, T] (bool) marks valid frames; padded frames do not count. Returns the scalar loss
        and per-example details (t, loss per example) for logging by timestep bucket. The random
        draws come from `noise` when given (the trainer draws them per example, so they do not
        depend on how a batch is split across processes), else from `generator`.

        In few-step distillation x is a teacher's sample from the same noise (jat/train/distill.py),
        so the path z_t runs straight from the noise to it; `data`, the real clean latent, is then what
        the envelope term fits (default: x).
        """
        noise = noise or self.draw(x, generator)
        t, eps, B = noise.t, noise.eps.to(x.dtype), x.shape[0]
        tb = t.view(B, 1, 1).to(x.dtype)
        z_t = tb * x + (1 - tb) * eps  # [B, C, T]
        c = torch.where(noise.drop.view(B, 1, 1), self.null_condition(c), c)

        # a full mask is passed as None: fused attention kernels need no mask, and a compiled model
        # sees no data-dependent branch
        model_mask = None if mask is None or bool(mask.all()) else mask
        trains_envelope = self.cfg.envelope_loss > 0
        x_hat, env = self.predict_x(model, z_t, t, c, model_mask, return_envelope=True,
                                    detach_envelope=trains_envelope, training=True)  # [B, C, T]
        denom = (1 - tb).clamp_min(self.cfg.t_eps)
        v = (x - z_t) / denom
        v_hat = (x_hat - z_t) / denom
        err = (v_hat - v).pow(2).mean(dim=1)  # [B, T]
        if env is not None and env.shape[1] > 0 and trains_envelope:
            err = err + self.cfg.envelope_loss * self.envelope_error(env, x if data is None else data, c,
                                                                     model_mask)
        if mask is None:
            per_example = err.mean(dim=1)  # [B]
            loss = per_example.mean()
        else:
            m = mask.to(err.dtype)
            per_example = (err * m).sum(1) / m.sum(1).clamp_min(1)
            loss = (err * m).sum() / m.sum().clamp_min(1)
        return loss, {"t": t.detach(), "loss_per_example": per_example.detach()}

    # --- the network's output as a clean-latent estimate -------------------------------------------
    def predict_x(self, model: Denoiser, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                  mask: torch.Tensor | None = None, return_envelope: bool = False,
                  detach_envelope: bool = False, training: bool = False):
        """x̂ [B, C, T] for z [B, C, T] at times t [B], through the configured output parametrisation
        (with return_envelope: also the predicted log-envelope [B, bands, T], or None); `training`: the
        loss's, whose envelope aim is flow.envelope_aim (sampling's is flow.sample_aim when set)."""
        out = model(z, t, c, mask).to(z.dtype)  # [B, C (+ bands), T]; bf16 under autocast -> z's dtype
        C = c.shape[1]
        if self.cfg.precondition == "none":
            return (out, None) if return_envelope else out
        F_, env = out[:, :C], out[:, C:]  # [B, C, T], [B, bands, T]
        aim = self.cfg.envelope_aim if training or self.cfg.sample_aim is None else self.cfg.sample_aim
        level = self.envelope_level(env.detach() if detach_envelope else env, aim)  # [B, bands, T]
        sigma = self.residual_scale(c, mask, level)  # [B, C, T]
        tb = t.view(-1, 1, 1).to(z.dtype)
        var = (tb * sigma).square() + (1 - tb).square()
        if self.cfg.band_skip == "straight":  # x = c + σε on the line z_t - tc = (tσ + 1 - t) ε
            skip = sigma / (tb * sigma + 1 - tb)
        else:  # E[x | z_t] under x = c + r, r ~ N(0, σ²)
            skip = tb * sigma.square() / var
        scale = (1 - tb) * sigma * var.rsqrt()
        x_hat = torch.addcmul(c + skip * (z - tb * c), scale, F_)
        return (x_hat, env) if return_envelope else x_hat

    def envelope_level(self, env: torch.Tensor, aim: float | None = None) -> torch.Tensor:
        """The log-envelope [B, E, T] at which the band is generated, from the head's output env.

        With `flow.envelope_target: lognormal` env [B, 2E, T] holds the mean μ of log σ and its log spread
        s: log σ ~ N(μ, v), v = exp(2(s + SPREAD_OFFSET)), so the band power σ² has typical level exp(2μ)
        and mean exp(2μ + 2v); the band is generated at μ + aim·v (`aim`, flow.envelope_aim by default:
        0 the typical level, 1 the mean power). Otherwise env is the log-envelope itself."""
        if self.cfg.envelope_target != "lognormal" or env.shape[1] == 0:
            return env
        mu, s = env.chunk(2, dim=1)  # [B, E, T] each
        v = torch.exp(2 * (s + SPREAD_OFFSET).clamp(*SPREAD_LOG_RANGE))
        return mu + (self.cfg.envelope_aim if aim is None else aim) * v

    def envelope_error(self, env: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """Gaussian negative log-likelihood [B, T] of the clean latent's band power m under the generated
        band's log-σ e = level + env (`band_prior`'s level, the predicted envelope env [B, E, T]), less
        its minimum, weighted by how absent each band is from the condition:
        e + m exp(-2e) / 2 - (log m + 1) / 2 >= 0, zero at e = log(m) / 2.

        The flow loss alone teaches the envelope slowly: near t = 1 any σ fits (x̂ -> z_t / t), and the
        U-shaped t distribution puts few examples where σ matters most; so the loss treats σ as given
        (`loss` detaches it) and this term trains it at every step. A likelihood, not a squared error
        of logs: under uncertainty it aims at the mean power, not the geometric mean below it, and an
        underestimated σ is what costs most near t = 1.

        With `flow.envelope_target: log` the term is instead (e - log(m) / 2)², with the same minimum
        (zero at e = log(m) / 2) and curvature: under uncertainty it aims at E[log m | c] / 2, the
        band's typical level, which sits below its mean power by the spread of what the condition
        leaves open (6-10 dB per frame on held-out audio, docs/quality.md "Envelope target").

        With `lognormal` (env [B, 2E, T]: μ and the log spread s, `envelope_level`) it is the Gaussian
        negative log-likelihood of log(m) / 2 under N(level + μ, v): (e - log(m) / 2)² / (2v) + log √v,
        v = exp(2(s + SPREAD_OFFSET)). μ still aims at the typical level; v learns how far the condition
        leaves it open, which is what lets sampling aim between the typical level and the mean power.
        It is not shifted to be >= 0 (its minimum over v depends on the error).
        """
        spread = None
        if self.cfg.envelope_target == "lognormal":
            env, spread = env.chunk(2, dim=1)  # [B, E, T] each
        E = env.shape[1]
        absent, level = self.band_prior(c, mask)  # [B, C, 1], [B, 1 (C: smooth), T]
        if level.shape[1] > 1:  # per channel (band_level smooth): its mean over each band
            level = F.adaptive_avg_pool1d(level.transpose(1, 2), E).transpose(1, 2)  # [B, E, T]
        e = (level + env).clamp(-ENV_LOG_RANGE, ENV_LOG_RANGE)  # [B, E, T] log σ of the generated band
        m = F.adaptive_avg_pool1d(x.square().transpose(1, 2), E).transpose(1, 2) + 1e-4  # [B, E, T]
        if spread is not None:  # Gaussian likelihood of log(m) / 2 with mean e and log std s + offset
            log_std = (spread + SPREAD_OFFSET).clamp(*SPREAD_LOG_RANGE)  # [B, E, T]
            nll = 0.5 * (e - 0.5 * torch.log(m)).square() * torch.exp(-2 * log_std) + log_std
        elif self.cfg.envelope_target == "log":  # (e - log(m) / 2)²: the minimiser is E[log m | c] / 2
            nll = (e - 0.5 * torch.log(m)).square()  # [B, E, T]
        else:
            nll = e + 0.5 * m * torch.exp(-2 * e) - 0.5 * (torch.log(m) + 1)  # [B, E, T]
        w = F.adaptive_avg_pool1d(absent.transpose(1, 2), E).transpose(1, 2)  # [B, E, 1]
        return (nll * w).sum(1) / w.sum(1).clamp_min(1e-3)  # [B, T]

    def band_prior(self, c: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the condition c [B, C, T] says of the band it lacks: absent [B, C, 1] in [0, 1] per
        channel, and the log-level [B, 1, T] per frame at which an empty channel is expected ([B, C, T]
        per channel with band_level smooth, `smooth_level`).

        absent: the channel's RMS over the segment, below τ = band_threshold absent, above 3τ carried,
        a linear ramp between (a resampler's stop-band leakage and the quietest carried channels
        overlap a little; docs/quality.md). Level: the RMS of the carried channels in the octave below
        the highest carried one, smoothed over 5 frames: in normalised units a band that continues
        the condition's top octave at the same distance from the training set's average spectrum
        (the noise fill's idea, in the latent domain; `flow.band_level: condition`), or 0, the
        training set's average level (`average`, the default: the condition's top octave can be far
        quieter than the band above it, as for a fricative above a 4 kHz cutoff, and an
        underestimated σ costs up to 1 / t_eps² near t = 1: that run was unstable, docs/quality.md).
        """
        B, C, T = c.shape
        c = c.to(torch.promote_types(c.dtype, torch.float32))
        if mask is None:
            m = c.new_ones(B, 1, T)
        else:
            m = mask[:, None].to(c.dtype)  # [B, 1, T]
        rms = ((c.square() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)).sqrt()
        tau = self.cfg.band_threshold
        absent = ((3 * tau - rms) / (2 * tau)).clamp(0, 1)  # [B, C, 1]
        k = torch.arange(C, device=c.device)  # [C]
        carried = absent[..., 0] < 0.5  # [B, C]
        edge = torch.where(carried, k, -1).amax(1)  # [B] highest carried channel (-1: none)
        top = carried & (k[None] >= (edge[:, None] + 1) // 2)  # [B, C] its octave
        power = (c.square() * top[..., None]).sum(1, keepdim=True) / top.sum(1).clamp_min(1)[:, None, None]
        power = F.avg_pool1d(power, 5, 1, 2, count_include_pad=False)  # [B, 1, T]
        level = torch.where(edge[:, None, None] >= 0, 0.5 * torch.log(power + 1e-6), 0.0)  # [B, 1, T]
        if self.cfg.band_level == "average":  # the training set's average level: log σ = 0
            level = torch.zeros_like(level)
        elif self.cfg.band_level == "smooth":  # that average, smooth across channels
            level = self.smooth_level().to(c.device, c.dtype)[None, :, None].expand(B, C, T)  # [B, C, T]
        return absent, level

    def residual_scale(self, c: torch.Tensor, mask: torch.Tensor | None, env: torch.Tensor) -> torch.Tensor:
        """σ [B, C, T] of the "band" prior: σ_min where the condition carries a channel; where it is
        empty, exp(level + e) with `band_prior`'s level and the predicted log-envelope env [B, bands, T]
        interpolated over the channels (e = 0 without bands)."""
        B, C, T = c.shape
        absent, level = self.band_prior(c, mask)  # [B, C, 1], [B, 1 (C: smooth), T]
        if env.shape[1]:
            e = F.interpolate(env.to(level.dtype).transpose(1, 2), size=C, mode="linear", align_corners=False)
            level = level + e.transpose(1, 2)  # [B, C, T]
        generated = level.clamp(-ENV_LOG_RANGE, ENV_LOG_RANGE).exp()  # [B, C or 1, T]
        return (self.cfg.sigma_min * (1 - absent) + absent * generated).expand(B, C, T)

    @staticmethod
    def null_condition(c: torch.Tensor) -> torch.Tensor:
        """The 'no condition' latent used for dropout and guidance: zeros (the normalised mean)."""
        return torch.zeros_like(c)

    # --- sampling --------------------------------------------------------------------------------
    def velocity(self, model: Denoiser, z: torch.Tensor, t: float, c: torch.Tensor,
                 mask: torch.Tensor | None = None, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """v̂(z, t | c), with classifier-free guidance w inside the t interval (w = 1 is off)."""
        if not 0.0 <= t < 1.0:
            raise ValueError(f"velocity is defined for t in [0, 1), got {t}")
        B = z.shape[0]
        tt = torch.full((B,), t, device=z.device, dtype=torch.float32)
        # The t_eps clamp stabilises the training loss; sampling never evaluates at t = 1, so it uses
        # the exact 1 - t (a clamped velocity would stop short on grids finer than 1 / t_eps steps).
        denom = 1.0 - t
        guided = cfg_scale != 1.0 and cfg_interval[0] <= t <= cfg_interval[1]
        if not guided:
            return (self.predict_x(model, z, tt, c, mask) - z) / denom
        m2 = None if mask is None else torch.cat([mask, mask])
        x_both = self.predict_x(model, torch.cat([z, z]), torch.cat([tt, tt]),
                                torch.cat([c, self.null_condition(c)]), m2)
        x_cond, x_uncond = x_both.chunk(2)
        x_hat = x_uncond + cfg_scale * (x_cond - x_uncond)
        return (x_hat - z) / denom

    @torch.no_grad()
    def sample(self, model: Denoiser, c: torch.Tensor, mask: torch.Tensor | None = None,
               steps: int | None = None, solver: str | None = None, cfg_scale: float | None = None,
               cfg_interval: tuple[float, float] | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate from noise (t = 0) to data (t = 1) on a uniform grid; returns x [B, C, T].

        Heun steps for all but the last interval, which is a plain Euler step (Heun would need the
        velocity at t = 1, where 1 - t vanishes).
        """
        steps = steps or self.cfg.steps
        solver = solver or self.cfg.solver
        w = self.cfg.cfg_scale if cfg_scale is None else cfg_scale
        interval = tuple(self.cfg.cfg_interval) if cfg_interval is None else cfg_interval
        if solver not in ("euler", "heun"):
            raise ValueError(f"unknown solver '{solver}' (euler or heun)")
        z = noise if noise is not None else torch.randn(c.shape, generator=generator, device=c.device)
        z = z.float()
        grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
        vel = lambda z_, t_: self.velocity(model, z_, t_, c, mask, w, interval)  # noqa: E731
        for i in range(steps):
            t0, t1 = grid[i], grid[i + 1]
            v0 = vel(z, t0)
            if solver == "euler" or i == steps - 1:
                z = z + (t1 - t0) * v0
            else:
                z_pred = z + (t1 - t0) * v0
                z = z + (t1 - t0) * 0.5 * (v0 + vel(z_pred, t1))
        return z
