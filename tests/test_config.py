"""Typed configuration: loading, overrides, and clear errors naming the key and the file."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jat.config import Config, ConfigError, resolve_config_path
from jat.model import JaT, parameter_breakdown

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = Config.from_yaml(path)
    assert Config.from_dict(cfg.to_dict()) == cfg  # to_dict round-trips


def test_v2_yaml_is_the_spec_model():
    import torch

    cfg = Config.from_yaml(CONFIGS / "v2.yaml")
    with torch.device("meta"):
        assert parameter_breakdown(JaT(cfg.model))["total"] == pytest.approx(289.6e6, rel=0.01)
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.pos_embed) == (16, 4, "rope")
    assert cfg.flow.timesteps == "u_shaped" and cfg.flow.u_shape_a == 4.0 and cfg.flow.t_eps == 0.05


def test_base_and_preset_inheritance():
    cfg = Config.from_yaml(CONFIGS / "v1.yaml")
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.pos_embed) == (768, 12, "learned")
    assert cfg.flow.timesteps == "uniform" and cfg.codec.name == "dac"  # rest from v2.yaml


def test_overrides(tmp_path):
    cfg = Config.from_yaml(CONFIGS / "tiny.yaml",
                           ["optim.lr=3e-4", "train.batch_size=5", "flow.cfg_interval=[0.1,0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.batch_size == 5 and cfg.flow.cfg_interval == [0.1, 0.9]


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr: unknown key (did you mean 'lr'?)"),
    ("optimizer:\n  lr: 0.1\n", "optimizer: unknown key (did you mean 'optim'?)"),
    ("train:\n  batch_size: two\n", "train.batch_size: expected int"),
    ("train:\n  batch_size: 2.5\n", "train.batch_size: expected int"),
    ("flow:\n  solver: rk4\n", "flow.solver: must be one of ['euler', 'heun']"),
    ("model:\n  num_heads: 5\n", "model.num_heads: 5 heads do not divide hidden_size"),
    ("model:\n  num_kv_heads: 3\n", "model.num_kv_heads: 3 KV heads do not divide num_heads"),
    ("model:\n  patch_size: 0\n", "model.patch_size: must be >= 1"),
    ("optim:\n  lr: -1.0\n", "optim.lr: must be > 0"),
    ("optim:\n  lr: null\n", "optim.lr: a value is required"),
    ("model:\n  preset: huge\n", "model.preset: unknown preset 'huge'"),
    ("model:\n  in_channels: 512\n", "model.in_channels: codec 'dac' gives 1024"),
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("model: [1, 2\n", "not valid YAML"),
])
def test_bad_configs_name_key_and_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_bad_override_is_named():
    with pytest.raises(ConfigError, match="train.bach_size: unknown key"):
        Config.from_yaml(CONFIGS / "tiny.yaml", ["train.bach_size=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        Config.from_yaml(CONFIGS / "tiny.yaml", ["train.batch_size"])


def test_missing_file_and_bare_name_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("v2.yaml").resolve() == (CONFIGS / "v2.yaml").resolve()
    assert resolve_config_path("tiny").resolve() == (CONFIGS / "tiny.yaml").resolve()
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        resolve_config_path("nope.yaml")


def test_missing_paths_fail_before_work_naming_key_and_file(tmp_path):
    cfg = Config.from_yaml(CONFIGS / "tiny.yaml", [f"data.train={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"tiny.yaml.*data.train: path not found"):
        cfg.check_paths()
    cfg = Config.from_yaml(CONFIGS / "tiny.yaml",
                           [f"data.train={tmp_path}", f"train.init_from={tmp_path}/base"])
    with pytest.raises(ConfigError, match=r"train.init_from: path not found"):
        cfg.check_paths()
    with pytest.raises(ConfigError, match=r"data.latents or data.train"):
        Config.from_yaml(CONFIGS / "tiny.yaml").check_paths()


# random config trees: either a Config or the project's ConfigError, never another exception
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8))
_keys = st.sampled_from(["model", "flow", "optim", "train", "data", "codec", "lora", "lr", "depth",
                         "num_heads", "batch_size", "steps", "preset", "name", "betas", "x"])
_trees = st.recursive(_scalars,
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(_keys, inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(_keys, _trees, max_size=4))
def test_config_loader_property(tree):
    try:
        Config.from_dict(tree, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_config_file_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "random.yaml"
    path.write_bytes(data)
    try:
        Config.from_yaml(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
