"""Few-step distillation: the teacher whose samples a student learns to reach in 1, 2 or 4 steps
(docs/design.md "Few-step distillation").

The teacher samples each training example from the example's own noise ε with its full sampler
(`distill.teacher_steps` steps of `distill.teacher_solver`), giving a pair (ε, x_T). The student is
trained by the ordinary flow loss on the straight path between them, z_t = t·x_T + (1 - t)·ε, at the
points of its Euler grids (`FlowMatching.draw(evaluations=...)`), with target x_T: an x-predicting
network that returns x_T at every point of that path makes each Euler step land on it again, so K
steps reproduce the teacher's sample for any K (the coupling "reflow" straightens; here the teacher's
ODE gives it directly). The envelope term keeps fitting the real clean latent.

The teacher is any checkpoint the project loads (plain, merged, base plus adapter; `load_model`), in
its own latent space: the condition is mapped into it and its sample back, so a teacher trained on
other statistics, or a larger teacher of a smaller student, works unchanged. Its samples depend on
nothing but the example's draws, so a resumed run sees the same targets.
"""

from __future__ import annotations

import logging

import torch

from jat.checkpoint.load import latent_norm, load_model
from jat.codecs import LatentNorm
from jat.config import Config, ConfigError
from jat.model.flow import FlowMatching, FlowNoise

log = logging.getLogger(__name__)


class Teacher:
    """A frozen network and its flow settings, sampling targets for a student.

    Args:
        cfg: the student's run config (`cfg.distill.teacher` names the checkpoint).
        norm: the student's latent normalisation (the run's data statistics).
        device: where the teacher runs.
    """

    def __init__(self, cfg: Config, norm: LatentNorm, device: torch.device):
        d = cfg.distill
        self.model, self.cfg, base = load_model(d.teacher, device=device)  # as train.init_from reads it
        self.model.requires_grad_(False)
        if self.cfg.codec.name != cfg.codec.name or self.cfg.model.in_channels != cfg.model.in_channels:
            raise ConfigError(f"distill.teacher={d.teacher}: the teacher works on '{self.cfg.codec.name}' "
                              f"latents ({self.cfg.model.in_channels} channels), the student on "
                              f"'{cfg.codec.name}' ({cfg.model.in_channels})")
        self.steps, self.solver = d.teacher_steps, d.teacher_solver
        teacher_norm = latent_norm(base, self.cfg.model.in_channels).to(device)
        self.flow = FlowMatching(self.cfg.flow, teacher_norm)
        norm = norm.to(device)
        same = (torch.allclose(teacher_norm.mean, norm.mean) and torch.allclose(teacher_norm.std, norm.std))
        self._norms = None if same else (norm, teacher_norm)  # (student's, teacher's) when they differ
        log.info("distillation teacher %s: %d %s steps%s", d.teacher, self.steps, self.solver,
                 "" if same else " (its own latent statistics)")

    def _to_teacher(self, z: torch.Tensor) -> torch.Tensor:
        if self._norms is None:
            return z
        student, teacher = self._norms
        return teacher.normalize(student.denormalize(z))

    def _to_student(self, z: torch.Tensor) -> torch.Tensor:
        if self._norms is None:
            return z
        student, teacher = self._norms
        return student.normalize(teacher.denormalize(z))

    @torch.no_grad()
    def sample(self, c: torch.Tensor, mask: torch.Tensor | None, noise: FlowNoise) -> torch.Tensor:
        """The teacher's sample x_T [B, C, T] (student's latent space) from each example's noise ε and
        its condition c [B, C, T], dropped to the null condition where the student's is (noise.drop)."""
        B = c.shape[0]
        c_teacher = self._to_teacher(c)  # and the teacher's own null condition where the student's is dropped
        c_teacher = torch.where(noise.drop.view(B, 1, 1), FlowMatching.null_condition(c_teacher), c_teacher)
        model_mask = None if mask is None or bool(mask.all()) else mask
        x = self.flow.sample(self.model, c_teacher, model_mask, steps=self.steps, solver=self.solver,
                             noise=noise.eps)  # [B, C, T]; ε is standard normal in either space
        return self._to_student(x).to(c.dtype)
