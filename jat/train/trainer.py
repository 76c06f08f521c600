"""The training loop: a thin layer over accelerate.

The trainer takes what it trains (`jat.train.tuning`), the data in its latent space
(`jat.train.data.TrainingData`) and an optional validator, and only trains: steps, EMA, logging,
checkpoints and resume.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples on each process. Data order,
segment crops, degradations and the flow's noise are functions of (seed, step, example index) alone,
so a resumed run, or a run split over more processes with the same global batch, sees exactly the
same numbers. A distillation (`distill.teacher`) trains on a teacher's samples from that same noise
(jat/train/distill.py), so it resumes as exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed

from jat.checkpoint import store as ckpt
from jat.config import Config, TrainConfig
from jat.model.dit import JaT
from jat.model.flow import FlowMatching, FlowNoise
from jat.model.lora import format_lora_report, lora_report
from jat.runtime import release_at_exit, tune_cpu_runtime
from jat.train import sharding, tracking
from jat.train.data import Batch, StepBatches, TrainingData
from jat.train.distill import Teacher
from jat.train.optim import EMA, build_optimizer, lr_lambda
from jat.train.runlock import RunLock
from jat.train.tuning import tuning

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (for example: too many consecutive non-finite steps, or weights that
    became non-finite)."""


# --- pieces ------------------------------------------------------------------------------------


def make_accelerator(t: TrainConfig) -> Accelerator:
    """An Accelerator with `t`'s precision and trackers (jat/train/tracking.py); in a single process, a
    second trainer may use another precision than the first (accelerate keeps one global state and would
    refuse the change)."""
    state = AcceleratorState._shared_state
    if (state and state.get("_mixed_precision") not in (None, t.mixed_precision)
            and PartialState().num_processes == 1):
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=t.mixed_precision, log_with=list(t.log_with) or None,
                      project_dir=t.output_dir)
    release_at_exit()  # a launched process exits cleanly (jat/runtime.py)
    return acc


# --- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Trains `cfg`'s model on `data` (`jat.train.data.prepare`) and runs `fit()`.

    `validator(model, latents, flow, writer, step) -> metrics` (jat/train/validation.py) runs every
    `train.val_every` steps on the EMA weights, on every process (`Validator` spreads its clips over
    them). What trains and what checkpoints hold follows `lora.mode` (`jat.train.tuning`). With
    `train.distributed=fsdp` and several processes the network, its gradients, the optimizer state and
    the EMA are sharded (jat/train/sharding.py); checkpoints hold the same whole tensors either way.

    The output folder is locked (jat/train/runlock.py) before anything is built: a second run into it
    stops with RunLockedError. `fit` releases the lock when it ends (and takes it again when called
    again); `close()` releases it for a Trainer that is not fitted.

    Scalars go to the trackers `train.log_with` names (jat/train/tracking.py); an `accelerator` passed
    in brings its own (`Accelerator(log_with=..., project_dir=...)`, custom GeneralTrackers included).
    """

    def __init__(self, cfg: Config, data: TrainingData, validator: Any = None, resume: str | None = None,
                 accelerator: Accelerator | None = None):
        self.cfg = cfg
        if accelerator is None:
            tracking.require_installed(cfg.train.log_with)  # before any work
        self.acc = accelerator or make_accelerator(cfg.train)
        self.out = Path(cfg.train.output_dir)
        self.writer = None
        self._run_lock = RunLock(self.out)
        self._lock_output()
        try:
            self._build(cfg, data, validator, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, data: TrainingData, validator: Any, resume: str | None) -> None:
        """Model, optimizer and resumed state: the work done once the output folder is locked."""
        t = cfg.train
        set_seed(t.seed)
        self.data = data
        self.latents = data.latents.to(self.acc.device)
        self.flow = FlowMatching(cfg.flow, self.latents.norm)
        self.validator = validator
        self.tuning = tuning(cfg)
        # few-step distillation: a frozen teacher samples each example's target (jat/train/distill.py)
        self.teacher = Teacher(cfg, self.latents.norm, self.acc.device) if cfg.distill.teacher else None
        model = self.tuning.build(self.acc.device)
        self.sharded = sharding.wanted(cfg, self.acc.num_processes)
        if self.sharded:
            sharding.shard(model, self.acc.device)
        self.model_plain = model  # the bare network (state dicts, EMA); self.model may be compiled/wrapped
        self.ema = EMA(model, t.ema_decay)  # built after sharding: then it averages the local shards
        self.optimizer = build_optimizer(model, cfg, self.acc.device.type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        compiled = torch.compile(model) if t.compile else model
        if self.sharded:  # FSDP does its own reductions: accelerate must not wrap the model in DDP
            self.model, self.optimizer = compiled, self.acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(compiled, self.optimizer)
        self.sampler = StepBatches(len(data.dataset), t.batch_size, self.acc.process_index,
                                   self.acc.num_processes, t.seed)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.best: dict[str, Any] = {}
        self.history: list[float] = []
        if resume:
            self._resume(resume)

    # --- set-up helpers -------------------------------------------------------------------------
    def _lock_output(self) -> None:
        """Take the output folder's run lock on the main process; every rank stops if it is taken.

        The main process alone locks; its outcome goes to the other ranks in one broadcast, the first
        collective of the run, so all raise together instead of waiting on one another."""
        error = None
        if self.acc.is_main_process:
            try:
                self._run_lock.acquire()
            except Exception as exc:  # RunLockedError, or an output folder that cannot be created
                error = exc
        if self.acc.num_processes > 1:
            [error] = broadcast_object_list([error])
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the trackers and release the output folder's run lock (fit does it when it ends)."""
        tracking.close_trackers(self.acc)
        self.writer = None
        self._run_lock.release()

    def _to_batch(self, raw: dict[str, Any]) -> Batch:
        dtype = torch.promote_types(next(self.model_plain.parameters()).dtype, torch.float32)
        return self.data.to_batch(raw, self.acc.device, dtype)

    def _noise(self, batch: Batch, micro: int) -> FlowNoise:
        """Per-example draws keyed by (seed, micro-batch, global example index)."""
        B = batch.x.shape[0]
        first = self.acc.process_index * B
        parts = []
        for i in range(B):
            seed = int(np.random.SeedSequence([self.cfg.train.seed, micro, first + i]).generate_state(1)[0])
            g = torch.Generator(device=batch.x.device).manual_seed(seed)
            parts.append(self.flow.draw(batch.x[i:i + 1], g, self._evaluations))
        return FlowNoise.cat(parts)

    @property
    def _evaluations(self) -> list[int] | None:
        """A student's evaluation budgets, whose Euler grids give its timesteps (None: not distilling)."""
        return self.cfg.distill.evaluations if self.teacher is not None else None

    # --- the loop -------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps` (or stop early after step `until`, as if interrupted there);
        returns the last logged metrics. Holds the output folder's run lock until it returns or raises."""
        self._lock_output()
        data = self.data.batches(self.sampler, self.step * self.cfg.train.grad_accum)
        try:
            return self._fit(until, data)
        finally:
            data.close()  # stops DataLoader workers now (forked ones share the lock's descriptor)
            self.close()

    def _fit(self, until: int | None, data: Iterator[dict[str, Any]]) -> dict[str, Any]:
        t, acc = self.cfg.train, self.acc
        stop = min(until, t.max_steps) if until is not None else t.max_steps
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = tracking.open_trackers(self.acc, self.cfg)  # TensorBoard's, for media, or None
            self._log_parameters()
        tokens_per_example = None
        bar = None
        if acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        last: dict[str, Any] = {}
        if acc.device.type == "cpu":  # set up: from here on, keep freed memory (see jat/runtime.py)
            tune_cpu_runtime()
        tic = time.perf_counter()
        self.model.train()
        while self.step < stop:
            losses, ts, per_ex = [], [], []
            for micro_i in range(t.grad_accum):
                micro = self.step * t.grad_accum + micro_i
                batch = self._to_batch(next(data))
                if tokens_per_example is None:
                    tokens_per_example = math.ceil(batch.x.shape[-1] / self.cfg.model.patch_size)
                sync = micro_i == t.grad_accum - 1
                if sync:
                    ctx = contextlib.nullcontext()
                else:
                    ctx = sharding.no_sync(self.model_plain) if self.sharded else acc.no_sync(self.model)
                noise = self._noise(batch, micro)
                with ctx, acc.autocast():
                    x = batch.x if self.teacher is None else self.teacher.sample(batch.c, batch.mask, noise)
                    loss, info = self.flow.loss(self.model, x, batch.c, batch.mask, noise=noise,
                                                data=batch.x)
                acc.backward(loss / t.grad_accum)
                losses.append(loss.detach())
                ts.append(info["t"])
                per_ex.append(info["loss_per_example"])
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            loss_value = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()  # one device sync
            grad_value = float(grad_norm)
            finite = math.isfinite(grad_value) and math.isfinite(loss_value)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update(self.model_plain, self.step - self.skipped_steps)
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped",
                            self.step, loss_value, grad_value)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.history.append(loss_value)

            window.setdefault("loss", []).append(loss_value)
            window.setdefault("grad_norm", []).append(grad_value)
            for tt, le in zip(torch.cat(ts).tolist(), torch.cat(per_ex).tolist(), strict=True):
                window.setdefault(f"loss_t/{min(int(tt * 4), 3) / 4:.2f}", []).append(le)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")

            if self.bad_steps >= t.max_bad_steps:
                self.save()
                raise TrainingError(f"{self.bad_steps} consecutive non-finite steps at step {self.step}: "
                                    f"stopping; last good weights saved in {self.out}")
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - tic
                examples = len(window["loss"]) * t.batch_size * t.grad_accum * acc.num_processes
                last = {k: float(np.mean(v)) for k, v in window.items()}
                last.update(lr=self.scheduler.get_last_lr()[0], examples_per_s=examples / elapsed,
                            tokens_per_s=examples * tokens_per_example / elapsed,
                            skipped_steps=self.skipped_steps)
                self._log(last)
                window, tic = {}, time.perf_counter()
            metric = None
            if self.validator is not None and (self.step % t.val_every == 0 or self.step == t.max_steps):
                metric = self.validate()
                last.update(metric)
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.save(metric)
        if bar is not None:
            bar.close()
        acc.wait_for_everyone()
        return last

    # --- validation -----------------------------------------------------------------------------
    def ema_model(self) -> JaT:
        """The network with the averaged weights, for sampling."""
        return self.tuning.ema_model(self.model_plain, self.ema)

    def validate(self) -> dict[str, float]:
        """Sample the validation clips with the EMA weights on every process (the Validator shares the
        clips out and gathers the scores); the main process logs them."""
        metrics = self.validator(self.ema_model(), self.latents, self.flow, self.writer, self.step)
        if self.acc.is_main_process:
            self._log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        return metrics

    # --- logging --------------------------------------------------------------------------------
    def _log(self, values: dict[str, float]) -> None:
        """Scalars to every tracker (main process), under train/NAME unless NAME has a group."""
        self.acc.log({k if "/" in k else f"train/{k}": v for k, v in values.items()}, step=self.step)
        log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def _log_parameters(self) -> None:
        log.info("%s", format_lora_report(lora_report(self.model_plain)))

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, metric: dict[str, float] | None = None) -> Path | None:
        """Write a checkpoint atomically; keep the newest `keep_last` and the best by validation LSD.

        Weights that became non-finite are never saved: TrainingError naming the newest intact
        checkpoint. A failed write (disk full, file too large, ...) removes its temporary folder and
        raises CheckpointError; the earlier checkpoints stay as they were."""
        acc, model = self.acc, self.model_plain
        if self.sharded:  # whole tensors gathered onto the main process (collectives: every rank)
            weights = sharding.model_state(model)
            ema = sharding.gathered(self.tuning.ema_weights(self.ema, model), main_only=True)
            optimizer = sharding.optimizer_state(model, self.optimizer.optimizer)
            error = self._non_finite(weights, ema) if acc.is_main_process else None
            [error] = broadcast_object_list([error])  # the main process's verdict, for all to act on
        else:  # replicated: every rank reaches the same verdict without a collective
            weights = self.tuning.weights(model)
            ema = self.tuning.ema_weights(self.ema, model)
            optimizer = self.optimizer.state_dict()
            error = self._non_finite(weights, ema)
        if error is not None:
            raise TrainingError(error)
        tmp = ckpt.tmp_dir(self.out, self.step)
        if metric and "lsd" in metric and (not self.best or metric["lsd"] < self.best["lsd"]):
            self.best = {"lsd": metric["lsd"], "name": ckpt.checkpoint_name(self.step), "step": self.step}
        if acc.is_main_process:
            with self._writing(tmp):
                ckpt.begin_save(self.out, self.step)
        acc.wait_for_everyone()
        with self._writing(tmp):
            if acc.is_main_process:
                state = {"scheduler": self.scheduler.state_dict(), "bad_steps": self.bad_steps,
                         "skipped_steps": self.skipped_steps, "best": self.best, "metric": metric or {},
                         "losses": self.history[-1000:]}
                ckpt.write_main(tmp, cfg=self.cfg, step=self.step, model=weights, ema=ema,
                                norm=self.latents.norm.state_dict(), optimizer=optimizer,
                                state=state, extra_meta=self.tuning.metadata())
                self.tuning.write_extra(tmp, model, ema)
            ckpt.write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            with self._writing(tmp):
                final = ckpt.finish_save(tmp)
                ckpt.prune(self.out, self.cfg.train.keep_last, {self.best["name"]} if self.best else set())
        acc.wait_for_everyone()
        return final

    def _non_finite(self, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> str | None:
        """The TrainingError message if a model or EMA tensor holds NaN or inf (e.g. after a too large
        learning rate), else None."""
        for prefix, tensors in (("model", model), ("ema", ema)):
            bad = ckpt.non_finite(tensors)
            if bad is not None:
                latest = ckpt.latest_checkpoint(self.out)
                last = (f"the newest intact checkpoint is {latest}" if latest is not None
                        else f"there is no intact checkpoint in {self.out}")
                return (f"step {self.step}: the weights became non-finite (tensor {prefix}.{bad} "
                        f"holds NaN or inf): nothing saved; {last}")
        return None

    @contextlib.contextmanager
    def _writing(self, tmp: Path) -> Iterator[None]:
        """Any failure while writing checkpoint files -> one CheckpointError, the temporary folder removed."""
        try:
            yield
        except Exception as exc:  # OSError, but also safetensors' own SafetensorError (disk full, EFBIG, ...)
            shutil.rmtree(tmp, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or repr(exc)
            raise ckpt.CheckpointError(f"{self.out}: could not write the checkpoint of step {self.step} "
                                       f"({reason}); earlier checkpoints are intact") from exc

    def _resume(self, resume: str) -> None:
        path = ckpt.latest_checkpoint(self.out) if resume == "auto" else Path(resume)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", self.out)
            return
        if not (path / "weights.safetensors").is_file():
            raise ckpt.CheckpointError(f"{path}: not a complete checkpoint")
        diffs = ckpt.architecture_diff(ckpt.read_config(path), self.cfg)
        if diffs:  # say which settings changed rather than which of thousands of tensors do not fit
            raise ckpt.CheckpointError(f"{path} was trained with a different architecture: "
                                       f"{'; '.join(diffs)} (resume with its settings, or choose another "
                                       "train.output_dir)")
        model = self.model_plain
        try:  # every process reads the whole tensors (a shared filesystem); sharded runs keep their shards
            weights, what = ckpt.load_weights(path, "model"), f"{path}: model weights"
            if self.sharded:
                sharding.load_model_state(model, weights, what)
            else:
                self.tuning.load(model, weights, what)
            self.ema.load_state_dict(ckpt.load_weights(path, "ema"))
            self.latents.norm.load_state_dict(ckpt.load_weights(path, "norm"))
            rest = ckpt.load_training_state(path, self.acc.process_index)
            if self.sharded:
                sharding.load_optimizer_state(model, self.optimizer.optimizer, rest["optimizer"])
            else:
                self.optimizer.load_state_dict(rest["optimizer"])
        except ckpt.CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError) as exc:  # same config, yet tensors that do not fit
            raise ckpt.CheckpointError(f"{path}: does not fit this run ({exc})") from None
        state = rest["state"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.best = state.get("best", {})
        if rest["rng"] is not None:
            ckpt.set_rng_state(rest["rng"])
        log.info("resumed from %s at step %d", path, self.step)

