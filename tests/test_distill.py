"""Few-step distillation: grid timesteps, straight paths that Euler steps retrace, the teacher's samples
in any latent statistics, training that brings a student's one-step sample to its teacher's, exact resume,
LoRA students, and checkpoints that sample with the budget they were trained for."""

import pytest
import torch
from helpers import ROOT, C, RandomLatents, T, make_checkpoint, tiny_trainer

from jat.checkpoint import store as ckpt
from jat.checkpoint.load import load_model
from jat.codecs import LatentNorm
from jat.config import Config, ConfigError, FlowConfig
from jat.model.flow import FlowMatching, FlowNoise
from jat.train.distill import Teacher

STUDENT = {"flow.solver": "euler", "flow.steps": 2}  # as command-line overrides
STUDENT_FLOW = {"solver": "euler", "steps": 2}  # as a config section


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("teacher"))


def test_grid_timesteps_come_from_the_budgets_euler_grids():
    flow = FlowMatching(FlowConfig())
    g = torch.Generator().manual_seed(0)
    t = torch.cat([flow.draw(torch.zeros(1, 2, 3), g, [1, 2, 4]).t for _ in range(3000)])
    values, counts = torch.unique(t, return_counts=True)
    assert values.tolist() == [0.0, 0.25, 0.5, 0.75]
    # P(0) = (1 + 1/2 + 1/4) / 3, P(1/2) = (1/2 + 1/4) / 3, P(1/4) = P(3/4) = (1/4) / 3
    expected = torch.tensor([7 / 12, 1 / 12, 3 / 12, 1 / 12])
    assert torch.allclose(counts / 3000, expected, atol=0.03)  # 3.5 binomial standard deviations


@pytest.mark.parametrize("steps", [1, 2, 4, 3])
def test_euler_steps_retrace_a_straight_path(steps):
    """A network that returns the path's end x_T at every point of z_t = t x_T + (1 - t) eps makes every Euler
    step land on that path again, so any number of steps ends at x_T: the distillation's premise."""
    g = torch.Generator().manual_seed(1)
    x_T, eps, c = (torch.randn(2, 6, 5, generator=g) for _ in range(3))
    calls = []

    def oracle(z, t, c, mask=None):  # checks that z lies on the path, then returns its end
        tb = t.view(-1, 1, 1)
        assert torch.allclose(z, tb * x_T + (1 - tb) * eps, atol=1e-5)
        calls.append(float(t[0]))
        return x_T

    out = FlowMatching(FlowConfig()).sample(oracle, c, steps=steps, solver="euler", noise=eps)
    assert torch.allclose(out, x_T, atol=1e-5)
    assert calls == pytest.approx([k / steps for k in range(steps)])


def test_teacher_samples_do_not_depend_on_the_students_statistics(teacher_ckpt):
    """The teacher samples in its own latent space: two students with different statistics get the same
    target once it is taken back to codec units."""
    cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml", [f"distill.teacher={teacher_ckpt}",
                                                             *(f"{k}={v}" for k, v in STUDENT.items())])
    g = torch.Generator().manual_seed(2)
    raw_c = torch.randn(2, C, T, generator=g)
    noise = FlowNoise(torch.zeros(2), torch.randn(2, C, T, generator=g), torch.tensor([False, True]))
    outs = []
    shifted = LatentNorm(torch.randn(C, generator=g), 0.5 + torch.rand(C, generator=g))
    for norm in (LatentNorm.identity(C), shifted):
        teacher = Teacher(cfg, norm, torch.device("cpu"))
        outs.append(norm.denormalize(teacher.sample(norm.normalize(raw_c), None, noise)))
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4 * outs[0].abs().max().item())
    # a dropped condition (the second example) is sampled unconditionally: the condition does not matter
    other = Teacher(cfg, LatentNorm.identity(C), torch.device("cpu")).sample(raw_c + 1, None, noise)
    base = Teacher(cfg, LatentNorm.identity(C), torch.device("cpu")).sample(raw_c, None, noise)
    assert torch.equal(other[1], base[1]) and not torch.allclose(other[0], base[0])


def test_config_rules_for_a_student(teacher_ckpt):
    base = {"model": {"preset": "tiny"}, "distill": {"teacher": str(teacher_ckpt)}}
    cfg = Config.from_dict({**base, "flow": STUDENT_FLOW})
    assert cfg.train.init_from == str(teacher_ckpt)  # a student starts as its teacher
    with pytest.raises(ConfigError, match="flow.solver: a distilled student samples with euler"):
        Config.from_dict({**base, "flow": {"steps": 2}})
    with pytest.raises(ConfigError, match=r"flow.steps: .*\[1, 2, 4\].*got 3"):
        Config.from_dict({**base, "flow": {"solver": "euler", "steps": 3}})
    with pytest.raises(ConfigError, match="distill.teacher_steps: must be >= 1"):
        Config.from_dict({**base, "flow": STUDENT_FLOW, "distill": {"teacher": "x", "teacher_steps": 0}})


def _teacher_gap(model, teacher: Teacher, data: RandomLatents, steps: int) -> float:
    """Mean squared distance of `model`'s `steps`-step Euler sample from the teacher's, on fixed noise."""
    g = torch.Generator().manual_seed(7)
    c = data.c[:4]
    noise = FlowNoise(torch.zeros(4), torch.randn(4, C, T, generator=g), torch.zeros(4, dtype=torch.bool))
    target = teacher.sample(c, None, noise)
    out = teacher.flow.sample(model, c, steps=steps, solver="euler", noise=noise.eps)
    return float((out - target).pow(2).mean())


@pytest.mark.slow
def test_distillation_brings_one_step_samples_to_the_teacher(tmp_path, teacher_ckpt):
    data = RandomLatents(4)
    trainer = tiny_trainer(tmp_path / "student", 4, 150, data=data, **STUDENT,
                           **{"distill.teacher": str(teacher_ckpt), "train.ema_decay": 0.0, "optim.lr": 3e-3,
                              "flow.cond_dropout": 0.0, "train.ckpt_every": 150})
    teacher = trainer.teacher
    before = {k: _teacher_gap(teacher.model, teacher, data, k) for k in (1, 2)}
    trainer.fit()
    model = trainer.ema_model()
    after = {k: _teacher_gap(model, teacher, data, k) for k in (1, 2)}
    # the teacher's own 1-step sample is its posterior mean, far from its 8-step sample; the student's is not
    assert after[1] < 0.25 * before[1] and after[2] < 0.25 * before[2], (before, after)
    # the checkpoint samples with the budget it was trained for, by default
    student, cfg, _ = load_model(ckpt.latest_checkpoint(tmp_path / "student"))
    assert (cfg.flow.solver, cfg.flow.steps) == ("euler", 2)


def test_distillation_resumes_exactly(tmp_path, teacher_ckpt):
    extra = {**STUDENT, "distill.teacher": str(teacher_ckpt), "distill.teacher_steps": 2}
    full = tiny_trainer(tmp_path / "full", 2, 5, **extra)
    full.fit()
    tiny_trainer(tmp_path / "part", 2, 5, **extra).fit(until=3)
    torch.manual_seed(123)
    resumed = tiny_trainer(tmp_path / "part", 2, 5, resume="auto", **extra)
    resumed.fit()
    assert resumed.history == full.history[3:]
    assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow, resumed.ema.shadow, strict=True))


def test_a_lora_student_trains_adapters_only(tmp_path, teacher_ckpt):
    trainer = tiny_trainer(tmp_path / "lora", 2, 3, **STUDENT,
                           **{"distill.teacher": str(teacher_ckpt), "distill.teacher_steps": 2,
                              "lora.mode": "lora", "lora.rank": 4})
    before = {k: v.clone() for k, v in trainer.model_plain.state_dict().items()}
    trainer.fit()
    after = trainer.model_plain.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora" in k for k in changed), sorted(changed)[:5]
    model, cfg, base = load_model(ckpt.latest_checkpoint(tmp_path / "lora"))  # its base: the teacher
    assert base == teacher_ckpt and (cfg.flow.solver, cfg.flow.steps) == ("euler", 2)


def test_a_student_is_validated_at_its_own_budget(tmp_path, teacher_ckpt):
    """In-training validation samples as the run's model will be used: a student at its flow.steps (in
    its trained budgets), any other run at train.val_steps."""
    import numpy as np
    import soundfile as sf

    from jat.train.validation import Validator

    val = tmp_path / "val"
    val.mkdir()
    sf.write(val / "a.wav", 0.1 * np.random.default_rng(0).standard_normal(44100).astype("float32"), 44100)
    base = {"model": {"preset": "tiny"}, "data": {"val": str(val), "segment_seconds": 1.0},
            "train": {"val_steps": 6}}
    student = Config.from_dict({**base, "flow": STUDENT_FLOW, "distill": {"teacher": str(teacher_ckpt)}})
    assert Validator.from_config(student).steps == 2
    assert Validator.from_config(Config.from_dict({**base, "flow": STUDENT_FLOW})).steps == 6
