"""Typed configuration: nested dataclasses loaded from YAML.

Every setting is written once: the dataclass field (with its comment) is the YAML key. Loading
rejects unknown or misspelled keys, wrong types and impossible values with a `ConfigError` that
names the key path and the file. `section.key=value` overrides come from the command line.

A YAML file may start from another with `base: other.yaml` (resolved beside it); the model
section may start from a named size preset with `model: {preset: small}` (`MODEL_PRESETS`, applied by
`model_preset`; `preset_model_config` builds one in code). YAML is read by
`jat.yaml_loader`, which refuses duplicate keys and alias bombs. Every number must be finite and
inside the range `RANGES` gives for its field; values in messages are shortened (`_show`).

Facts owned elsewhere are read from their home, imported lazily because those modules import this one:
the sample rate and hop (`jat.codecs.base`), each codec's latent channels (`jat.codecs.LATENT_DIMS`) and
the filter families of the LR simulation (`jat.data.degrade.FAMILIES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jat import yaml_loader
from jat.yaml_loader import cut as _cut
from jat.yaml_loader import show as _show


class ConfigError(ValueError):
    """A configuration problem, with the key path and the source named in the message."""


@dataclass
class ModelConfig:
    """The DiT (docs/design.md section 3). Defaults are the V2 model on DAC latents."""

    preset: str | None = None  # size preset this section started from (v1, v2, small, tiny); informational
    in_channels: int = field(default_factory=lambda: _latent_dim("dac"))  # codec latent channels C (DAC's)
    patch_size: int = 4  # latent frames per token (p)
    hidden_size: int = 1024
    depth: int = 16
    num_heads: int = 16  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention); = num_heads for plain MHA
    mlp_ratio: float = 4.0
    bottleneck_dim: int = 512  # BottleneckPatchEmbed inner width
    time_freq_dim: int = 512  # sinusoidal timestep features before the time MLP
    pos_embed: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    max_tokens: int = 2048  # length of the learned position table (pos_embed=learned only)
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    envelope_bands: int = 0  # extra output channels: a per-frame log-envelope (flow.precondition=band)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "v2": {},
    "v1": dict(hidden_size=768, depth=12, num_heads=12, num_kv_heads=12, bottleneck_dim=128,
               pos_embed="learned"),
    "small": dict(hidden_size=384, depth=6, num_heads=6, num_kv_heads=2, bottleneck_dim=256),
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, num_kv_heads=2, bottleneck_dim=64, time_freq_dim=64),
}


@dataclass
class FlowConfig:
    """Flow matching (docs/design.md section 4). Time convention: t = 0 is noise, t = 1 is data."""

    timesteps: Literal["u_shaped", "uniform", "logit_normal"] = "u_shaped"
    u_shape_a: float = 4.0  # density proportional to cosh(a (t - 1/2))
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    t_eps: float = 0.05  # clamp of (1 - t) when turning x-prediction into velocity
    cond_dropout: float = 0.1  # probability of replacing the condition by the null latent
    solver: Literal["euler", "heun"] = "heun"
    steps: int = 32
    cfg_scale: float = 1.0  # classifier-free guidance; 1.0 is off
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    precondition: Literal["none", "band"] = "none"  # output parametrisation (flow.py docstring)
    band_threshold: float = 0.1  # "band": condition RMS below this: channel absent; above 3x: carried
    sigma_min: float = 0.05  # "band": residual scale of the channels the condition carries
    band_level: Literal["average", "condition"] = "average"  # "band": expected level of an empty channel
    envelope_loss: float = 1.0  # "band": weight of the envelope likelihood (flow.envelope_error); 0: none


@dataclass
class CodecConfig:
    """The latent codec (docs/design.md section 2)."""

    name: Literal["mdct", "dac"] = "dac"
    dac_weights: str | None = None  # local .pth of DAC 44 kHz; None: the library's download cache
    dac_model_type: str = "44khz"
    dac_model_bitrate: str = "8kbps"
    chunk_seconds: float = 30.0  # long audio is encoded/decoded in chunks of this length
    mdct_compression: float = 0.5  # amplitude compression exponent of the mdct codec (1.0 = none)


@dataclass
class DataConfig:
    """Training data (docs/design.md section 5)."""

    train: str | None = None  # audio folder (recursive) or manifest .txt of audio paths
    val: str | None = None  # audio folder or manifest for validation; None: no validation
    latents: str | None = None  # pre-encoded latent shards (fast path); used instead of `train`
    segment_seconds: float = 6.0
    cutoff_min: float = 2000.0  # Hz, low-pass cutoff range of the LR simulation
    cutoff_max: float = 16000.0
    filters: list[str] = field(default_factory=lambda: list(_filter_families()))  # all of them
    order_min: int = 2
    order_max: int = 10
    versions: int = 4  # degraded LR versions per clip when pre-encoding
    num_workers: int = 0
    strict: bool = False  # fail on the first bad file instead of skipping it
    val_clips: int = 4  # validation clips sampled and scored every val_every steps
    val_cutoff: float = 8000.0  # Hz, cutoff used to degrade validation clips


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01  # applied to matrices only
    eps: float = 1e-8
    warmup_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    fused: bool | None = None  # fused AdamW kernel; None: on (CUDA and CPU)


@dataclass
class TrainConfig:
    """The training loop."""

    output_dir: str = "runs/v2"
    max_steps: int = 400_000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    val_every: int = 5000
    val_steps: int = 16  # sampler steps during validation
    ckpt_every: int = 5000
    keep_last: int = 3  # newest checkpoints kept, besides the best by validation LSD
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # start weights from this checkpoint (fine-tuning, QLoRA)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops


@dataclass
class LoraConfig:
    """LoRA / QLoRA fine-tuning (docs/design.md section 6)."""

    mode: Literal["none", "lora", "qlora"] = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out", "fc1", "fc2"])
    temporal_adapter: bool = False
    temporal_dim: int = 64  # bottleneck width of the temporal adapter
    temporal_kernel: int = 3


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        cfg = _build(cls, _apply_presets(data, source), "", source)
        validate(cfg, source)
        object.__setattr__(cfg, "source", source)  # where it came from, for later error messages
        return cfg

    def check_paths(self, need_data: bool = True) -> None:
        """Fail before any work when a path the run needs does not exist, naming the key and the file."""
        source = getattr(self, "source", "config")
        keys = [("data.val", self.data.val), ("train.init_from", self.train.init_from),
                ("codec.dac_weights", self.codec.dac_weights)]
        if need_data:
            if not (self.data.latents or self.data.train):
                raise ConfigError(f"{source}: data.latents or data.train must name the training data")
            keys.insert(0, ("data.latents", self.data.latents) if self.data.latents
                        else ("data.train", self.data.train))
        for key, value in keys:
            if value and not Path(value).exists():
                raise ConfigError(f"{source}: {key}: path not found: {_cut(value, 300)}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        path = Path(path)
        data = load_yaml_tree(path)
        source = str(path)
        for item in overrides or []:
            apply_override(data, item)
        if overrides:
            source += " (with command-line overrides)"
        return cls.from_dict(data, source)


# ---------------------------------------------------------------------------------------------
# loading


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, following `base:` to the file it extends (deep-merged, this file wins)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml_loader.load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except yaml_loader.YamlStructureError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:  # PyYAML's messages quote bounded snippets, but tokens can be long
        raise ConfigError(f"{path}: not valid YAML: {_cut(str(exc), 400)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = load_yaml_tree((path.parent / base), _seen + (path.resolve(),))
    return _deep_merge(parent, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config tree."""
    if "=" not in item:
        raise ConfigError(f"command line: override '{_cut(item)}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: '{_cut(key)}': '{_cut(p)}' is not a section")
    try:
        node[parts[-1]] = yaml_loader.load(raw)
    except yaml_loader.YamlStructureError as exc:
        raise ConfigError(f"command line: '{_cut(key)}': {exc}") from None
    except yaml.YAMLError:  # not YAML: the text itself, e.g. a path with a colon
        node[parts[-1]] = raw


def model_preset(name: object, where: str = "model.preset") -> dict[str, Any]:
    """The ModelConfig fields the size preset `name` sets (a copy of its MODEL_PRESETS entry).

    Raises ConfigError (a ValueError) naming `where` for an unknown name."""
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ConfigError(f"{where}: unknown preset {_show(name)} (choose from {sorted(MODEL_PRESETS)})")
    return dict(MODEL_PRESETS[name])


def preset_model_config(name: str, **overrides: Any) -> ModelConfig:
    """A named size preset (v1, v2, small, tiny) as a ModelConfig, with optional field overrides."""
    return ModelConfig(preset=name, **{**model_preset(name), **overrides})


def _apply_presets(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A raw config tree whose model section starts from its preset's fields (the section's own win)."""
    model = data.get("model")
    if isinstance(model, dict) and model.get("preset") is not None:
        data = dict(data, model={**model_preset(model["preset"], f"{source}: model.preset"), **model})
    return data


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{_cut(str(key), 40)}" if path else _cut(str(key), 40)
        if key not in names:
            raise ConfigError(f"{source}: {where}: unknown key{_key_hint(str(key), names, path)}")
        kwargs[key] = _coerce(hints[key], value, where, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a bool
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in choices), value)
        if value not in choices:
            raise ConfigError(f"{source}: {where}: must be one of {list(choices)}, got {_show(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where}: expected a list, got {_show(value)}")
        return [_coerce(item_tp, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if value is None:
        raise ConfigError(f"{source}: {where}: a value is required (got null)")
    raise ConfigError(f"{source}: {where}: expected {tp.__name__}, got {type(value).__name__} {_show(value)}")


def _key_hint(key: str, names: list[str], path: str) -> str:
    """' (did you mean ...?)' for an unknown key: a close match in its own section, or the other
    section where the key (or a close match) lives: `train.lr` -> 'optim.lr', top-level `lr` too."""
    sections = typing.get_type_hints(Config)
    others = [f"{sec}.{f.name}" for sec, tp in sections.items() if sec != path
              for f in dataclasses.fields(tp)] if path in ("", *sections) else []
    leaf = {p: p.split(".")[1] for p in others}
    picks = [p for p in others if leaf[p] == key] + difflib.get_close_matches(key, names, n=1)
    if not picks:
        close = difflib.get_close_matches(key, sorted(set(leaf.values())), n=1)
        picks = [p for p in others if close and leaf[p] == close[0]]
    if not picks:
        return f" (known keys: {', '.join(names)})"
    return f" (did you mean {' or '.join(repr(p) for p in picks[:3])}?)"


# ---------------------------------------------------------------------------------------------
# validation of values that are well-typed but impossible

# The allowed values of every number in the config (of each item, for a list of numbers), written
# as the message says them; besides, every float must be finite and every int fit in 64 bits.
# tests/test_config.py checks that every int and float field has a rule here.
_RULES = {
    ">= 1": "model.in_channels model.patch_size model.hidden_size model.depth model.num_heads "
            "model.num_kv_heads model.bottleneck_dim model.time_freq_dim model.max_tokens flow.steps "
            "data.order_min data.order_max data.versions train.max_steps train.batch_size train.grad_accum "
            "train.log_every train.val_every train.val_steps train.ckpt_every train.keep_last "
            "train.max_bad_steps lora.rank lora.temporal_dim lora.temporal_kernel "
            "data.val_clips",  # data.val: null turns validation off, not 0 clips
    ">= 0": "data.num_workers optim.weight_decay optim.warmup_steps model.envelope_bands flow.envelope_loss",
    "> 0": "model.mlp_ratio model.rope_theta flow.u_shape_a flow.logit_normal_std codec.chunk_seconds "
           "data.segment_seconds optim.lr optim.eps optim.grad_clip lora.alpha flow.band_threshold",
    "in [0, 1)": "flow.cond_dropout optim.betas train.ema_decay lora.dropout",
    "in (0, 1)": "flow.t_eps",
    "in [0, 1]": "flow.cfg_interval optim.min_lr_ratio",
    "in (0, 1]": "codec.mdct_compression flow.sigma_min",
    # Hz, below Nyquist: SAMPLE_RATE / 2 (jat.codecs.base), which tests/test_config.py checks this matches
    "in (0, 22050)": "data.cutoff_min data.cutoff_max data.val_cutoff",
    "in [0, 4294967295]": "train.seed",  # accelerate's set_seed seeds numpy, which takes < 2**32
    "finite": "flow.logit_normal_mean flow.cfg_scale",  # cfg_scale 1 is off, 0 unconditional, < 0 repels
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

    o = cfg.optim
    check(len(o.betas) == 2, "optim.betas", f"need two values in [0, 1), got {_show(o.betas)}")

    lo = cfg.lora
    check(lo.mode == "none" or bool(lo.targets) or lo.temporal_adapter, "lora.targets", "nothing to adapt")


def _latent_dim(codec: str) -> int:
    """Latent channels of a codec backend, from their home (`jat.codecs.LATENT_DIMS`)."""
    from jat.codecs import LATENT_DIMS

    return LATENT_DIMS[codec]


def _filter_families() -> tuple[str, ...]:
    """The LR simulation's filter families, from their home (`jat.data.degrade.FAMILIES`)."""
    from jat.data.degrade import FAMILIES

    return FAMILIES


def resolve_config_path(name: str | Path) -> Path:
    """`--config v2.yaml` finds configs/v2.yaml when no such file exists in the working directory."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (Path("configs") / p, Path(__file__).resolve().parent.parent / "configs" / p):
        if candidate.is_file():
            return candidate
        if candidate.with_suffix(".yaml").is_file():
            return candidate.with_suffix(".yaml")
    raise ConfigError(f"{name}: config file not found (also looked in configs/)")
