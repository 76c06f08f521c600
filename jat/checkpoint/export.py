"""An inference folder: what a user needs to upsample, and nothing else, ready to push to the Hub as is.

    OUT/weights.safetensors   the EMA weights only (optionally bf16) and the latent statistics, with
                              the config in its metadata: it loads like any checkpoint (ema=True)
    OUT/README.md             a model card: model, codec, training data and steps, scores, usage
    OUT/export.json           where it came from (checkpoint, step, dtype, bytes before and after)

A training checkpoint holds the raw weights, their EMA, optimizer moments and RNG state (the raw and
EMA weights twice over, and the moments twice again); an export keeps the EMA alone. A LoRA training
checkpoint, or a base with `adapter`, is merged first (jat.checkpoint.load.merge_checkpoint's path).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from jat.atomic import write_atomic
from jat.checkpoint import load
from jat.checkpoint import store as ckpt
from jat.config import Config
from jat.model.dit import parameter_breakdown

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _checkpoint_bytes(path: Path) -> int:
    folder = path if path.is_dir() else path.parent
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def export_inference(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32",
                     adapter: str | Path | None = None, force: bool = False) -> dict:
    """Write the inference folder of `checkpoint` (plus `adapter`) into `out`; returns its record."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype '{dtype}' ({', '.join(DTYPES)})")
    model, cfg, base = load.load_model(checkpoint, adapter, ema=True, force=force)
    if cfg.lora.mode != "none":  # an adapted model: fold the adapters in, as merge_checkpoint does
        load.fold_adapters(model, cfg)
    state = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    norm = ckpt.load_weights(base, "norm")
    step = int(ckpt.read_metadata(checkpoint).get("step", 0))
    out = Path(out)
    source = {"checkpoint": str(checkpoint), "adapter": str(adapter) if adapter else None, "step": step,
              "dtype": dtype}
    weights = write_atomic(out / "weights.safetensors", lambda tmp: ckpt.write_weights(
        tmp, cfg=cfg, step=step, model={}, ema=state, norm=norm, extra_meta={"export": json.dumps(source)}))
    record = {**source, "bytes": weights.stat().st_size,
              "checkpoint_bytes": _checkpoint_bytes(ckpt.weights_file(checkpoint)),
              "parameters": parameter_breakdown(model)["total"]}
    metrics = _metrics(Path(checkpoint))
    write_atomic(out / "README.md", lambda tmp: tmp.write_text(model_card(cfg, record, metrics)))
    write_atomic(out / "export.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def _metrics(checkpoint: Path) -> dict:
    """The checkpoint's last validation figures (state.json) and, beside its run, eval.json's aggregate."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    found: dict = {}
    state = folder / "state.json"
    if state.is_file():
        found["validation"] = json.loads(state.read_text()).get("metric") or {}
    for candidate in (folder / "eval.json", folder.parent / "eval.json"):
        if candidate.is_file():
            found["evaluation"] = json.loads(candidate.read_text()).get("aggregate", {}).get("all", {})
            break
    return {k: v for k, v in found.items() if v}


CARD = """---
library_name: jat-audiosr
tags: [audio, audio-super-resolution, diffusion-transformer]
---

# JaT-AudioSR model

Audio super-resolution with a Diffusion Transformer on codec latents (flow matching, x-prediction):
band-limited audio at any rate in, 44.1 kHz out.

| | |
|---|---|
| model | {preset}: depth {m.depth}, width {m.hidden_size}, {m.num_heads}/{m.num_kv_heads} query/KV heads |
| parameters | {parameters:,} |
| codec | {codec} ({m.in_channels} latent channels) |
| objective | flow matching, precondition `{f.precondition}`, {f.steps} sampler steps |
| training data | `{data}`, {d.segment_seconds:g} s segments, cutoffs {d.cutoff_min:g}-{d.cutoff_max:g} Hz |
| trained | {step} steps, batch {t.batch_size} x {t.grad_accum} |
| weights | EMA, {dtype}, {mib:.1f} MiB (the training checkpoint: {ckpt_mib:.1f} MiB) |
{scores}
## Use

```
pip install jat-audiosr
jat-infer input.wav --checkpoint hf://ORG/NAME     # or a local copy of this folder
```

```python
from jat.infer.upsampler import Upsampler
up = Upsampler.from_pretrained("ORG/NAME")
result = up.upsample(audio, sample_rate)  # audio [C, L]; result.audio [C, L'] at 44.1 kHz
```

## Configuration

```json
{config}
```
"""


def model_card(cfg: Config, record: dict, metrics: dict) -> str:
    """The Hub model card (markdown): the model, its training data, its scores, how to use it."""
    scores = ""
    for name, figures in metrics.items():
        shown = sorted((k, v) for k, v in figures.items() if isinstance(v, float))[:12]
        scores += f"\n{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown) + "\n"
    d = cfg.data
    return CARD.format(m=cfg.model, f=cfg.flow, d=d, t=cfg.train, preset=cfg.model.preset or "custom",
                       parameters=record["parameters"], codec=cfg.codec.name,
                       data=d.latents or d.train or "-",
                       step=record["step"], dtype=record["dtype"], mib=record["bytes"] / 2**20,
                       ckpt_mib=record["checkpoint_bytes"] / 2**20, scores=scores,
                       config=json.dumps(dataclasses.asdict(cfg), indent=1))
