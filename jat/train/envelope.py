"""Re-fit a trained checkpoint's envelope head alone, with another envelope target (`flow.envelope_target`).

The `EnvelopeHead` sees only the condition, and with `flow.envelope_loss` > 0 the flow loss does not
train it (σ is detached there): its one loss is `FlowMatching.envelope_error`, which needs no pass
through the DiT. So it can be fitted again on a trained checkpoint in minutes on one CPU thread, the
DiT left as it is; docs/quality.md "Envelope target" has the evidence (re-fitting keep-2000's head on
the log target beat 300 steps of fine-tuning the whole network on it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from jat.atomic import write_atomic
from jat.checkpoint import load
from jat.checkpoint import store as ckpt
from jat.codecs import latent_frames
from jat.config import validate
from jat.data.datasets import LatentShardDataset
from jat.model.dit import EnvelopeHead
from jat.model.flow import FlowMatching


def _carry_head(old: EnvelopeHead, new: EnvelopeHead) -> None:
    """Copy `old`'s weights into `new`, a head of the same shape but for the spread channels: the log-level
    outputs (the first E) and every hidden layer are kept; spread outputs start at zero."""
    E = old.bands
    with torch.no_grad():
        for w_new, w_old in zip(new.net.state_dict().values(), old.net.state_dict().values(), strict=True):
            if w_new.shape == w_old.shape:
                w_new.copy_(w_old)
            else:  # the 1x1 output convolution: [E or 2E, hidden, 1] / [E or 2E]
                w_new.zero_()
                w_new[:E].copy_(w_old[:E])


def fit_envelope(checkpoint: str | Path, latents: str | Path, out: str | Path, *, target: str = "log",
                 steps: int = 1500, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                 hidden: int | None = None, dilations: Sequence[int] | None = None,
                 aligned: int | None = None, aim: float | None = None,
                 progress: Callable[[int, float], None] | None = None) -> Path:
    """Fit `checkpoint`'s envelope head on the pre-encoded pairs in `latents` with envelope target
    `target` ('power', 'log' or 'lognormal', sampled at flow.envelope_aim = `aim` when given); write
    `out/weights.safetensors` (EMA and raw weights both carry the new head; everything else, the latent
    statistics included, is copied) with flow.envelope_target set. Switching to or from 'lognormal' keeps
    the trained head and adds (or drops) its spread outputs.

    `hidden` / `dilations` / `aligned` (model.envelope_hidden / _dilations / _aligned): when one differs from
    the checkpoint's, the head is replaced by a new one of that shape (initialised from `seed`, output
    zero) instead of continuing from the trained head; the written config records the new shape.

    Adam at `lr`, cosine-decayed to lr / 10 over `steps` batches of `batch_size` random pairs (LR
    version and crop drawn per (seed, step, index)). progress(step, loss) every 100 steps.
    """
    cfg = ckpt.read_config(checkpoint)
    if cfg.flow.precondition != "band" or not cfg.model.envelope_bands:
        raise ValueError(f"{checkpoint}: no envelope head "
                         "(needs flow.precondition band and model.envelope_bands > 0)")
    if cfg.lora.mode != "none":
        raise ValueError(f"{checkpoint}: a LoRA checkpoint; merge it first (scripts/merge_lora.py)")
    if target not in ("power", "log", "lognormal"):
        raise ValueError(f"unknown envelope target '{target}' (power, log or lognormal)")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    model, cfg, base = load.load_model(checkpoint, ema=True)
    space = load.latent_space(base, cfg)
    cfg.flow.envelope_target = target
    if aim is not None:
        cfg.flow.envelope_aim = float(aim)
    flow = FlowMatching(cfg.flow, space.norm)
    trained = dict(envelope_hidden=cfg.model.envelope_hidden, envelope_dilations=cfg.model.envelope_dilations,
                   envelope_aligned=cfg.model.envelope_aligned)
    shape = dict(envelope_hidden=trained["envelope_hidden"] if hidden is None else int(hidden),
                 envelope_dilations=list(trained["envelope_dilations"] if dilations is None else dilations),
                 envelope_aligned=trained["envelope_aligned"] if aligned is None else int(aligned))
    spread = target == "lognormal"
    if shape != trained or spread != cfg.model.envelope_spread:
        old = model.envelope
        cfg.model = dataclasses.replace(cfg.model, **shape, envelope_spread=spread)
        validate(cfg, f"{checkpoint}: envelope head")
        torch.manual_seed(seed)
        model.envelope = EnvelopeHead(old.channels, cfg.model.envelope_bands, cfg.model.envelope_hidden,
                                      cfg.model.envelope_dilations, spread, cfg.model.envelope_aligned)
        if shape == trained:  # the same head with spread channels added or dropped: keep what it learned
            _carry_head(old, model.envelope)
    head = model.envelope.train()
    data = LatentShardDataset(latents, segment_frames=latent_frames(cfg.data.segment_seconds), seed=seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        data.set_epoch(step)
        items = [data[i] for i in torch.randint(len(data), (batch_size,), generator=gen).tolist()]
        x = space.normalize(torch.stack([it["x"] for it in items]))  # [B, C, T]
        c = space.normalize(torch.stack([it["c"] for it in items]))
        mask = torch.stack([it["mask"] for it in items])  # [B, T]
        m = None if bool(mask.all()) else mask
        err = flow.envelope_error(head(c, m), x, c, m)  # [B, T]
        w = mask.to(err.dtype)
        loss = (err * w).sum() / w.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps):
            progress(step, float(loss.detach()))
    new = {f"envelope.{k}": v.detach().float().contiguous().clone() for k, v in head.state_dict().items()}
    def keep(weights: dict) -> dict:  # the DiT's weights; the envelope head's are all new
        return {k: v for k, v in weights.items() if not k.startswith("envelope.")}

    ema = {**keep(ckpt.load_weights(base, "ema")), **new}
    raw = {**keep(ckpt.load_weights(base, "model")), **{k: v.clone() for k, v in new.items()}}
    norm = ckpt.load_weights(base, "norm")
    step0 = int(ckpt.read_metadata(base).get("step", 0))
    meta = {"envelope_refit": json.dumps({"base": str(base), "target": target, "steps": steps,
                                          "batch_size": batch_size, "lr": lr, "seed": seed, **shape,
                                          "aim": cfg.flow.envelope_aim,
                                          "latents": str(latents)})}
    out = Path(out)
    write_atomic(out / "weights.safetensors",
                 lambda tmp: ckpt.write_weights(tmp, cfg=cfg, step=step0, ema=ema, model=raw, norm=norm,
                                                extra_meta=meta))
    return out


__all__ = ["fit_envelope"]
