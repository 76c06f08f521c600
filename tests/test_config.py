"""Typed configuration: loading, overrides, and clear errors naming the key and the file."""

import dataclasses
import math
import time
import typing

import pytest
import yaml
from helpers import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from jat.config import (
    RANGES,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    preset_model_config,
    resolve_config_path,
)
from jat.config import safe_yaml as yaml_loader
from jat.model.dit import JaT, parameter_breakdown

CONFIGS = ROOT / "configs"


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
    # an fsspec URL for the latent shards is the reader's to open (jat/data/shards.py); a local one is checked
    Config.from_yaml(CONFIGS / "tiny.yaml", ["data.latents=s3://bucket/latents"]).check_paths()
    with pytest.raises(ConfigError, match=r"data.latents: path not found"):
        Config.from_yaml(CONFIGS / "tiny.yaml", [f"data.latents={tmp_path}/nope"]).check_paths()


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


# --- YAML: duplicate keys, alias bombs, recursion ------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr: 0.1\ntrain:\n  seed: 1\noptim:\n  eps: 1.0e-6\n",
     "optim: key given twice (lines 1 and 5); YAML would silently keep only the last"),
    ("optim:\n  lr: 0.1\n  eps: 1.0e-6\n  lr: 0.2\n", "optim.lr: key given twice (lines 2 and 4)"),
    ("flow: {steps: 8, solver: euler, steps: 4}\n", "flow.steps: key given twice (lines 1 and 1)"),
])
def test_duplicate_keys_are_refused_naming_file_key_and_both_lines(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(path)
    assert str(err.value).startswith(f"{path}: {needle}")


def test_duplicate_key_in_a_base_file_names_that_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("train:\n  seed: 1\n  seed: 2\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\n")
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(child)
    parent = tmp_path / "parent.yaml"
    assert str(err.value).startswith(f"{parent}: train.seed: key given twice (lines 2 and 3)")


def test_duplicate_key_inside_an_override_value():
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(CONFIGS / "tiny.yaml", ["flow={steps: 8, steps: 4}"])
    assert str(err.value).startswith("command line: 'flow': steps: key given twice (lines 1 and 1)")


def test_merge_keys_still_work(tmp_path):
    # an explicit key next to a merge replaces the merged one: not a duplicate
    cfg = Config.from_yaml(_write(tmp_path, "optim:\n  <<: {lr: 1.0e-3, eps: 1.0e-6}\n  lr: 2.0e-3\n"))
    assert (cfg.optim.lr, cfg.optim.eps) == (2e-3, 1e-6)
    text = "a: &a {k: 1, j: 2}\nb: &b {m: 3}\nc:\n  <<: [*a, *b]\n  k: 5\n"
    assert yaml_loader.load(text) == yaml.safe_load(text) == {
        "a": {"k": 1, "j": 2}, "b": {"m": 3}, "c": {"k": 5, "j": 2, "m": 3}}


def _alias_bomb(levels: int, indent: str = "  ") -> str:
    """A billion-laughs list: item i is 9 aliases of item i - 1, so 9**levels strings expanded."""
    items = ["&a0 [" + ", ".join(['"x"'] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "".join(f"{indent}- {item}\n" for item in items)


def test_alias_bomb_fails_fast_with_a_short_message(tmp_path):
    path = _write(tmp_path, "model:\n" + _alias_bomb(9))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(path)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert len(msg) < 500
    assert msg.startswith(f"{path}: line ") and msg.endswith(
        f"aliases make the document expand to more than {yaml_loader.MAX_NODES} nodes (YAML alias bomb?)")
    # the same bomb as a command-line value
    flow_style = "[" + _alias_bomb(9, indent="").replace("- ", "").replace("\n", ", ").rstrip(", ") + "]"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"command line: 'model': line 1: .*\(YAML alias bomb\?\)"):
        Config.from_yaml(CONFIGS / "tiny.yaml", [f"model={flow_style}"])
    assert time.perf_counter() - start < 5


def test_recursive_alias_is_refused(tmp_path):
    path = _write(tmp_path, "model: &m [1, *m]\n")
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(path)
    assert str(err.value) == (f"{path}: line 1: "
                              "an alias refers to a node that contains it (a recursive structure)")


@pytest.mark.parametrize("text, needle", [
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("train:\n  output_dir: 2020-13-45\n", "not valid YAML: unreadable value: month must be in 1..12"),
])
def test_yaml_the_parser_chokes_on_is_a_config_error(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:  # not RecursionError or a bare ValueError
        Config.from_yaml(path)
    assert str(err.value) == f"{path}: {needle}"


def test_messages_never_embed_a_huge_value(tmp_path):
    shared = ["x"] * 9  # an alias bomb built in Python: shared lists, 9**7 strings when expanded
    for _ in range(6):
        shared = [shared] * 9
    cases = [{"model": shared}, {"model": list(range(50_000))}, {"flow": {"cfg_interval": ["y" * 10**6]}},
             {"flow": {"solver": "z" * 10**6}}, {"model": {"preset": ["p"] * 10**5}},
             {"data": {"filters": [f"f{i}" for i in range(10**5)]}}, {"train": {"max_steps": 10**5000}}]
    for tree in cases:
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            Config.from_dict(tree, "big.yaml")
        assert len(str(err.value)) < 500 and time.perf_counter() - start < 5, str(err.value)[:200]
    with pytest.raises(ConfigError) as err:  # from a file too: a long list is no alias bomb
        Config.from_yaml(_write(tmp_path, f"model: {list(range(50_000))}\n"))
    assert str(err.value).endswith("model: expected a mapping, got [0, 1, 2, 3, ...]")


# --- numbers: finite everywhere, each field in its range -------------------------------------------

def _number_fields():
    """(key path, int or float, default) for every number field of Config, and every list of numbers,
    found from the type hints so that a field added later is covered without editing the tests."""
    out = []
    for sec, sec_tp in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(sec_tp):
            tp = typing.get_type_hints(sec_tp)[f.name]
            is_list = typing.get_origin(tp) is list
            tp = typing.get_args(tp)[0] if is_list else tp
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # X | None -> X
            if tp in (int, float):
                default = getattr(sec_tp(), f.name)
                out.append((f"{sec}.{f.name}", tp, default, is_list))
    return out


def _tree(key, value):
    sec, name = key.split(".")
    return {sec: {name: value}}


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("train.seed=-5", "train.seed: must be in [0, 4294967295], got -5"),
    ("optim.eps=-1", "optim.eps: must be > 0, got -1.0"),
    ("codec.mdct_compression=-1", "codec.mdct_compression: must be in (0, 1], got -1.0"),
    ("data.num_workers=-3", "data.num_workers: must be >= 0, got -3"),
    ("data.segment_seconds=.inf", "data.segment_seconds: must be a finite number, got inf"),
    ("flow.cfg_scale=nan", "flow.cfg_scale: must be a finite number, got nan"),
    ("flow.cfg_scale=.nan", "flow.cfg_scale: must be a finite number, got nan"),
    ("optim.betas=[0.9, .nan]", "optim.betas[1]: must be a finite number, got nan"),
    ("codec.chunk_seconds=0", "codec.chunk_seconds: must be > 0, got 0.0"),
    ("model.rope_theta=0", "model.rope_theta: must be > 0, got 0.0"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0.0"),
    ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
    ("lora.temporal_dim=0", "lora.temporal_dim: must be >= 1, got 0"),
    ("lora.temporal_kernel=0", "lora.temporal_kernel: must be >= 1, got 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: must be in [0, 1], got 1.5"),
    ("flow.logit_normal_std=0", "flow.logit_normal_std: must be > 0, got 0.0"),
    ("data.val_clips=0", "data.val_clips: must be >= 1, got 0"),
    ("data.val_cutoff=22050", "data.val_cutoff: must be in (0, 22050), got 22050.0"),
    ("flow.u_shape_a=0", "flow.u_shape_a: must be > 0, got 0.0"),
    ("flow.u_shape_a=800", "flow.u_shape_a: must be <= 700, got 800.0"),
    ("train.seed=4294967296", "train.seed: must be in [0, 4294967295], got 4294967296"),
    ("train.max_steps=100000000000000000000",
     "train.max_steps: must be a 64-bit integer, got 100000000000000000000"),
    ("data.segment_seconds=0.001",
     "data.segment_seconds: must cover at least one latent frame (512 samples at 44.1 kHz), got 0.001"),
    ("model.mlp_ratio=0.001", "model.mlp_ratio: hidden_size * mlp_ratio must give an MLP width >= 1"),
])
def test_impossible_numbers_are_named(override, needle):
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(CONFIGS / "tiny.yaml", [override])
    assert str(err.value).startswith(f"{CONFIGS / 'tiny.yaml'} (with command-line overrides): {needle}")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_must_be_finite(bad):
    floats = [(key, default, is_list) for key, tp, default, is_list in _number_fields() if tp is float]
    assert len(floats) >= 24  # the walk finds the fields (the lists of floats too)
    for key, default, is_list in floats:
        value = [bad, *default[1:]] if is_list else bad
        where = f"{key}[0]" if is_list else key
        with pytest.raises(ConfigError) as err:
            Config.from_dict(_tree(key, value), "f.yaml")
        assert str(err.value) == f"f.yaml: {where}: must be a finite number, got {bad}"


def test_every_number_field_has_a_range():
    keys = {key for key, *_ in _number_fields()}
    assert keys - set(RANGES) == set(), "decide the range of the new fields in jat.config.rules._RULES"
    assert set(RANGES) - keys == set(), "RANGES names fields that do not exist"


def _outside(rule: str, tp: type):
    """A value just outside a RANGES rule (None for 'finite')."""
    if rule == "finite":
        return None
    op, _, rest = rule.partition(" ")
    if op in (">", ">="):
        bound = float(rest)
        return tp(bound - 1 if op == ">=" else bound)
    lo, hi = (float(x) for x in rest[1:-1].split(","))
    return tp(lo if rest[0] == "(" else (hi if rest[-1] == ")" else hi + 1))


def test_every_range_is_enforced():
    for key, tp, default, is_list in _number_fields():
        rule = RANGES[key]
        bad = _outside(rule, tp)
        if bad is None:
            continue
        value, where = ([bad, *default[1:]], f"{key}[0]") if is_list else (bad, key)
        with pytest.raises(ConfigError) as err:
            Config.from_dict(_tree(key, value), "r.yaml")
        assert str(err.value) == f"r.yaml: {where}: must be {rule}, got {bad}"


# --- unknown keys that live in another section ----------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("train:\n  lr: 1.0e-3\n", "train.lr: unknown key (did you mean 'optim.lr'?)"),
    ("lr: 1.0e-3\n", "lr: unknown key (did you mean 'optim.lr'"),
    ("model:\n  cfg_scal: 2.0\n", "model.cfg_scal: unknown key (did you mean 'flow.cfg_scale'?)"),
    ("train:\n  steps: 10\n", "train.steps: unknown key (did you mean 'flow.steps' or 'val_steps'?)"),
])
def test_unknown_key_suggests_the_section_that_has_it(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(path)
    assert str(err.value).startswith(f"{path}: {needle}")


def test_unknown_key_from_the_command_line_suggests_the_section_that_has_it():
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(CONFIGS / "tiny.yaml", ["train.lr=1e-3"])
    assert str(err.value) == (f"{CONFIGS / 'tiny.yaml'} (with command-line overrides): "
                              "train.lr: unknown key (did you mean 'optim.lr'?)")


def test_facts_owned_elsewhere_are_read_from_their_home():
    """The filter families (jat.data.degrade), the latent channels (jat.codecs.LATENT_DIMS) and the
    sample rate (jat.codecs.base) are written once; the config's defaults and checks follow them."""
    from jat.codecs import LATENT_DIMS, SAMPLE_RATE
    from jat.data.degrade import FAMILIES

    assert DataConfig().filters == list(FAMILIES) == ["butter", "cheby1", "bessel", "ellip"]
    with pytest.raises(ConfigError, match=r"data.filters: unknown filter families \['sinc'\]"):
        Config.from_yaml(CONFIGS / "tiny.yaml", ["data.filters=[butter, sinc]"])
    assert ModelConfig().in_channels == LATENT_DIMS["dac"] == 1024  # the default codec's
    for name, dim in LATENT_DIMS.items():
        cfg = Config.from_yaml(CONFIGS / "tiny.yaml", [f"codec.name={name}", f"model.in_channels={dim}"])
        assert cfg.model.in_channels == dim
        with pytest.raises(ConfigError, match=f"codec '{name}' gives {dim} latent channels, got {dim + 1}"):
            Config.from_yaml(CONFIGS / "tiny.yaml", [f"codec.name={name}", f"model.in_channels={dim + 1}"])
    # the one cutoff rule written as a number in jat/config/rules.py: Nyquist at SAMPLE_RATE
    for key in ("data.cutoff_min", "data.cutoff_max", "data.val_cutoff"):
        assert RANGES[key] == f"in (0, {SAMPLE_RATE // 2})"


def test_preset_model_config_is_the_yaml_preset():
    tiny = preset_model_config("tiny", in_channels=8)
    assert (tiny.preset, tiny.hidden_size, tiny.depth, tiny.time_freq_dim) == ("tiny", 64, 2, 64)
    assert tiny.in_channels == 8
    cfg = Config.from_dict({"model": {"preset": "tiny", "in_channels": 512}, "codec": {"name": "mdct"}})
    assert cfg.model == preset_model_config("tiny", in_channels=512)
    assert preset_model_config("v2") == ModelConfig(preset="v2")
    with pytest.raises(ValueError) as err:  # a ConfigError, which is a ValueError
        preset_model_config("huge")
    assert str(err.value) == "model.preset: unknown preset 'huge' (choose from ['small', 'tiny', 'v1', 'v2'])"
