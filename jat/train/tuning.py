"""What a run trains, and therefore what its checkpoints hold (docs/design.md section 6).

The trainer holds one of these and never asks which:

* `FullTuning`: every weight trains; checkpoints hold the whole model and its EMA. Training from
  scratch, or a full fine-tune of `train.init_from`.
* `AdapterTuning` (lora.mode lora or qlora): the base (`train.init_from`) is frozen, 4-bit in qlora,
  and only the adapters train (jat/model/lora.py); checkpoints hold the adapters and their EMA, and
  an adapter file (jat/checkpoint/adapters.py) that records the base's identity.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from jat.checkpoint import store as ckpt
from jat.checkpoint.adapters import save_adapter
from jat.config import Config, ConfigError
from jat.model.dit import JaT
from jat.model.lora import adapter_state_dict, apply_lora, load_adapter
from jat.train.optim import EMA
from jat.train.sharding import gathered


class FullTuning:
    """Every weight trains."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.base_sha256 = None  # the identity of train.init_from, when there is one
        if cfg.train.init_from:
            self.base_sha256 = ckpt.weights_sha256(cfg.train.init_from)

    def build(self, device: torch.device) -> JaT:
        """The network to train: a new JaT, with the base's EMA weights when fine-tuning."""
        model = JaT(self.cfg.model)
        base = self.cfg.train.init_from
        if base:
            ckpt.load_checked(model, ckpt.load_weights(base, "ema"), f"{base}: base weights",
                              against="this run's model config")
        return model

    def weights(self, model: JaT) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's `model.*` group holds."""
        return model.state_dict()

    def ema_weights(self, ema: EMA, model: JaT) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's `ema.*` group holds."""
        return ema.state_dict(model)

    def load(self, model: JaT, weights: dict[str, torch.Tensor], what: str) -> None:
        """Put a checkpoint's `model.*` group back into the model (resume)."""
        ckpt.load_checked(model, weights, what)

    def ema_model(self, model: JaT, ema: EMA) -> JaT:
        """A separate copy of the network with the averaged weights, for sampling."""
        averaged = JaT(self.cfg.model).to(next(model.parameters()).device)
        averaged.load_state_dict(gathered(ema.state_dict(model)))  # whole tensors when sharded
        return averaged.eval()

    def metadata(self) -> dict[str, str] | None:
        """Extra checkpoint metadata."""
        return None

    def write_extra(self, folder: Path, model: JaT, ema_weights: dict[str, torch.Tensor]) -> None:
        """Files besides the weights in a checkpoint folder (none)."""


class AdapterTuning(FullTuning):
    """A frozen (4-bit in qlora) base and trainable adapters."""

    def __init__(self, cfg: Config):
        if not cfg.train.init_from:
            raise ConfigError(f"lora.mode={cfg.lora.mode}: train.init_from must name the base checkpoint")
        super().__init__(cfg)

    def build(self, device: torch.device) -> JaT:
        # quantized on the training device: bitsandbytes packs 4-bit weights where they will run
        return apply_lora(super().build(device).to(device), self.cfg.lora)

    def weights(self, model: JaT) -> dict[str, torch.Tensor]:
        return adapter_state_dict(model)

    def ema_weights(self, ema: EMA, model: JaT) -> dict[str, torch.Tensor]:
        return ema.state_dict(model, full=False)

    def load(self, model: JaT, weights: dict[str, torch.Tensor], what: str) -> None:
        load_adapter(model, weights)  # the base was rebuilt from train.init_from

    def ema_model(self, model: JaT, ema: EMA) -> JaT:
        averaged = copy.deepcopy(model)
        load_adapter(averaged, ema.state_dict(model, full=False))
        return averaged.eval()

    def metadata(self) -> dict[str, str] | None:
        return {"base_sha256": self.base_sha256} if self.base_sha256 else None

    def write_extra(self, folder: Path, model: JaT, ema_weights: dict[str, torch.Tensor]) -> None:
        # the shareable artefact: the EMA adapter, its config and its base
        save_adapter(folder / "adapter.safetensors", model, self.cfg.lora, self.cfg.train.init_from,
                     ema_weights, base_sha256=self.base_sha256)


def tuning(cfg: Config) -> FullTuning:
    """The tuning a Config asks for."""
    return FullTuning(cfg) if cfg.lora.mode == "none" else AdapterTuning(cfg)
