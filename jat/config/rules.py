"""Values that are well-typed but impossible: every number finite and inside its field's range
(`RANGES`), and the cross-field checks (`validate`)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from jat.config.safe_yaml import show as _show
from jat.config.schema import Config, ConfigError, _filter_families, _latent_dim, _parse_codec

# The allowed values of every number in the config (of each item, for a list of numbers), written
# as the message says them; besides, every float must be finite and every int fit in 64 bits.
# tests/test_config.py checks that every int and float field has a rule here.
_RULES = {
    ">= 1": "model.in_channels model.patch_size model.hidden_size model.depth model.num_heads "
            "model.num_kv_heads model.bottleneck_dim model.time_freq_dim model.max_tokens flow.steps "
            "data.order_min data.order_max data.versions train.max_steps train.batch_size train.grad_accum "
            "train.log_every train.val_every train.val_steps train.ckpt_every train.keep_last "
            "train.max_bad_steps lora.rank lora.temporal_dim lora.temporal_kernel "
            "data.val_clips "  # data.val: null turns validation off, not 0 clips
            "data.holes_max model.envelope_hidden model.envelope_dilations distill.teacher_steps "
            "distill.evaluations",
    ">= 0": "data.num_workers optim.weight_decay optim.warmup_steps model.envelope_bands flow.envelope_loss "
            "model.envelope_aligned",
    "> 0": "model.mlp_ratio model.rope_theta flow.u_shape_a flow.logit_normal_std codec.chunk_seconds "
           "data.segment_seconds optim.lr optim.eps optim.grad_clip lora.alpha flow.band_threshold",
    "in [0, 1)": "flow.cond_dropout optim.betas train.ema_decay lora.dropout",
    "in (0, 1)": "flow.t_eps",
    "in [0, 1]": "flow.cfg_interval optim.min_lr_ratio data.noise_prob data.codec_prob "
                 "data.holes_prob flow.envelope_aim flow.sample_aim",
    "in (0, 1]": "codec.mdct_compression flow.sigma_min lora.select_fraction",
    # Hz, below Nyquist: SAMPLE_RATE / 2 (jat.codecs.base), which tests/test_config.py checks this matches
    "in (0, 22050)": "data.cutoff_min data.cutoff_max data.val_cutoff",
    "in [0, 4294967295]": "train.seed",  # accelerate's set_seed seeds numpy, which takes < 2**32
    # cfg_scale 1 is off, 0 unconditional, < 0 repels
    "finite": "flow.logit_normal_mean flow.cfg_scale data.noise_snr_min data.noise_snr_max",
}
RANGES: dict[str, str] = {key: rule for rule, keys in _RULES.items() for key in keys.split()}


def _satisfies(value: float, rule: str) -> bool:
    """Whether value meets a RANGES rule: 'finite', '> a', '>= a', or 'in [a, b)' style intervals."""
    op, _, rest = rule.partition(" ")
    if op == "finite":
        return True  # checked for every float already
    if op in (">", ">="):
        return value > float(rest) if op == ">" else value >= float(rest)
    lo, hi = (float(x) for x in rest[1:-1].split(","))
    above = lo < value if rest[0] == "(" else lo <= value
    return above and (value < hi if rest[-1] == ")" else value <= hi)


def numbers(obj: Any, path: str = "") -> typing.Iterator[tuple[str, int | float]]:
    """(key path, value) of every int and float in a config, list items included; not bools."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            yield from numbers(value, where)
        elif isinstance(value, list):
            yield from ((f"{where}[{i}]", v) for i, v in enumerate(value) if type(v) in (int, float))
        elif type(value) in (int, float):
            yield where, value


def validate(cfg: Config, source: str) -> None:
    """Reject impossible settings before any work starts."""

    def check(ok: bool, where: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {where}: {msg}")

    # every number, found generically so that a new field cannot escape: finite, then in range
    for where, value in numbers(cfg):
        rule = RANGES.get(where.split("[")[0], "finite")
        if type(value) is float and not math.isfinite(value):
            rule = "a finite number"
        elif type(value) is int and not -2**63 <= value < 2**63:
            rule = "a 64-bit integer"
        elif _satisfies(value, rule):
            continue
        raise ConfigError(f"{source}: {where}: must be {rule}, got {_show(value)}")

    # relations between fields, and limits that need a reason
    m = cfg.model
    check(m.hidden_size % m.num_heads == 0, "model.num_heads",
          f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}")
    check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
          f"{m.num_kv_heads} KV heads do not divide num_heads {m.num_heads}")
    check((m.hidden_size // m.num_heads) % 2 == 0, "model.num_heads", "head dim must be even for RoPE")
    check(m.time_freq_dim % 2 == 0, "model.time_freq_dim", "must be even")
    check(int(m.hidden_size * m.mlp_ratio) >= 1, "model.mlp_ratio",
          f"hidden_size * mlp_ratio must give an MLP width >= 1, got {m.mlp_ratio}")
    expected = _latent_dim(cfg.codec.name)
    check(m.in_channels == expected, "model.in_channels",
          f"codec '{cfg.codec.name}' gives {expected} latent channels, got {m.in_channels}")

    f = cfg.flow
    check(f.u_shape_a <= 700, "flow.u_shape_a",  # math.expm1(a) in sample_t overflows past 709
          f"must be <= 700, got {f.u_shape_a}")
    check(len(f.cfg_interval) == 2 and f.cfg_interval[0] <= f.cfg_interval[1],
          "flow.cfg_interval", f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {_show(f.cfg_interval)}")

    check(not m.envelope_spread or f.envelope_target == "lognormal", "model.envelope_spread",
          "follows from flow.envelope_target: lognormal (which alone trains the spread); not set by hand")
    check(f.envelope_target != "lognormal" or m.envelope_bands > 0, "flow.envelope_target",
          "lognormal needs an envelope head (model.envelope_bands > 0)")
    check(f.band_level != "smooth" or cfg.codec.name == "mdct", "flow.band_level",
          f"smooth averages neighbouring channels, which only a frequency-ordered codec has (mdct), not "
          f"{cfg.codec.name!r}")
    check(f.sample_aim is None or f.envelope_target == "lognormal", "flow.sample_aim",
          "is a lognormal envelope's sampling level: needs flow.envelope_target lognormal")
    check(f.band_skip == "posterior" or f.precondition == "band", "flow.band_skip",
          f"{f.band_skip} is a skip of the band parametrisation: needs flow.precondition band")

    from jat.codecs.base import HOP, SAMPLE_RATE

    d = cfg.data
    check(d.segment_seconds * SAMPLE_RATE >= HOP, "data.segment_seconds",  # else the crop has no latent frame
          f"must cover at least one latent frame ({HOP} samples at {SAMPLE_RATE / 1000:g} kHz), "
          f"got {d.segment_seconds}")
    check(d.cutoff_min <= d.cutoff_max, "data.cutoff_min",
          f"need 0 < cutoff_min <= cutoff_max < {SAMPLE_RATE // 2}, got {d.cutoff_min}, {d.cutoff_max}")
    check(d.order_min <= d.order_max, "data.order_min", "need 1 <= order_min <= order_max")
    unknown = set(d.filters) - set(_filter_families())
    check(bool(d.filters) and not unknown, "data.filters",
          f"unknown filter families {_show(sorted(unknown))}")
    check(d.noise_snr_min <= d.noise_snr_max, "data.noise_snr_min",
          f"need noise_snr_min <= noise_snr_max, got {d.noise_snr_min}, {d.noise_snr_max}")
    check(bool(d.codecs) or d.codec_prob == 0, "data.codecs", "empty, but data.codec_prob > 0")
    for i, name in enumerate(d.codecs):
        try:
            _parse_codec(name)
        except ValueError as exc:
            raise ConfigError(f"{source}: data.codecs[{i}]: {exc}") from None

    o = cfg.optim
    check(len(o.betas) == 2, "optim.betas", f"need two values in [0, 1), got {_show(o.betas)}")

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # the trackers accelerate drives

    unknown = [name for name in cfg.train.log_with if name not in LOGGER_TYPE_TO_CLASS]
    check(not unknown, "train.log_with",
          f"unknown trackers {_show(unknown)}; accelerate offers {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    check(len(set(cfg.train.log_with)) == len(cfg.train.log_with), "train.log_with", "a tracker named twice")

    di = cfg.distill
    if di.teacher:  # the student samples on the grid it was trained on (FlowMatching.draw)
        check(bool(di.evaluations), "distill.evaluations", "no budget to train the student for")
        check(f.solver == "euler", "flow.solver",
              f"a distilled student samples with euler steps (distill.teacher is set), got {f.solver!r}")
        check(f.steps in di.evaluations, "flow.steps",
              f"the student's default budget must be one it is trained for ({_show(di.evaluations)}), "
              f"got {f.steps}")
        check(f.cfg_scale == 1.0, "flow.cfg_scale", "a distilled student samples without guidance: "
              "guide the teacher instead")

    lo = cfg.lora
    check(lo.mode == "none" or bool(lo.targets) or lo.temporal_adapter, "lora.targets", "nothing to adapt")
    check(lo.select_fraction is None or bool(lo.targets), "lora.select_fraction",
          "selects among lora.targets, which is empty")
