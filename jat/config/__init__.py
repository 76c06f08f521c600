"""Typed configuration: nested dataclasses loaded from YAML (schema.py: the sections; loading.py: YAML,
overrides, presets, the typed build; rules.py: ranges and cross-field checks; safe_yaml.py: the parser).

Every setting is written once: the dataclass field (with its comment) is the YAML key. Loading
rejects unknown or misspelled keys, wrong types and impossible values with a `ConfigError` that
names the key path and the file. `section.key=value` overrides come from the command line.

A YAML file may start from another with `base: other.yaml` (resolved beside it); the model
section may start from a named size preset with `model: {preset: small}` (`MODEL_PRESETS`, applied by
`model_preset`; `preset_model_config` builds one in code). YAML is read by
`jat.config.safe_yaml`, which refuses duplicate keys and alias bombs. Every number must be finite and
inside the range `RANGES` gives for its field; values in messages are shortened (`_show`).

Facts owned elsewhere are read from their home, imported lazily because those modules import this one:
the sample rate and hop (`jat.codecs.base`), each codec's latent channels (`jat.codecs.LATENT_DIMS`) and
the filter families of the LR simulation (`jat.data.degrade.FAMILIES`).
"""

from jat.config.loading import (
    apply_override,
    load_yaml_tree,
    model_preset,
    preset_model_config,
    resolve_config_path,
)
from jat.config.rules import RANGES, validate
from jat.config.schema import (
    MODEL_PRESETS,
    CodecConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    FlowConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = ["MODEL_PRESETS", "RANGES", "CodecConfig", "Config", "ConfigError", "DataConfig", "DistillConfig",
           "FlowConfig", "LoraConfig", "ModelConfig", "OptimConfig", "TrainConfig", "apply_override",
           "load_yaml_tree", "model_preset", "preset_model_config", "resolve_config_path", "validate"]
