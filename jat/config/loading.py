"""Reading a Config: YAML files with `base:` chains, `section.key=value` overrides, size presets, and
the typed build that rejects unknown keys and wrong types with the key path and the file named."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jat.config import safe_yaml as yaml_loader
from jat.config.safe_yaml import cut as _cut
from jat.config.safe_yaml import show as _show
from jat.config.schema import MODEL_PRESETS, Config, ConfigError, ModelConfig

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # shipped in the wheel


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


def resolve_config_path(name: str | Path) -> Path:
    """`--config v2.yaml` finds configs/v2.yaml, else the packaged jat/configs/v2.yaml (so it works from any
    folder once installed), when no such file exists in the working directory."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (Path("configs") / p, PACKAGED_CONFIGS / p):
        if candidate.is_file():
            return candidate
        if candidate.with_suffix(".yaml").is_file():
            return candidate.with_suffix(".yaml")
    raise ConfigError(f"{name}: config file not found (also looked in configs/)")

