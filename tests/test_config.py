"""Config validation: every mistake gives one error that names the field."""

import copy
import importlib.resources
import pathlib
import tomllib

import pytest

from conservation._config import ConfigError, load_config, parse_config


ROOT = pathlib.Path(__file__).resolve().parents[1]

VALID = {
    "name": "t",
    "model": {"kind": "deep_linear", "widths": [3, 4, 2]},
    "data": {"n": 16},
    "dynamics": [{"kind": "flow", "t1": 1.0}, {"kind": "sgd", "lr": 0.1, "steps": 5,
                                               "batch_size": 4}],
}


def _with(path, value):
    raw = copy.deepcopy(VALID)
    *parents, last = path
    target = raw
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return raw


def test_valid_config_fills_defaults():
    config = parse_config(copy.deepcopy(VALID))
    assert config.model["init_scale"] == 1.0
    assert config.loss == {"kind": "mse", "moments": "auto"}
    assert config.dynamics[0]["rtol"] == 1e-8 and config.dynamics[0]["label"] == "flow (rtol 1e-08)"
    assert config.dynamics[1]["label"] == "sgd (lr 0.1)"
    assert config.output == "results/t"


@pytest.mark.parametrize("path, value, message", [
    (("model", "kind"), "transformer", "unknown `model.kind` = 'transformer'"),
    (("model", "kind"), "deep_linaer", "Did you mean 'deep_linear'"),
    (("model", "widths"), [4], "field `model.widths` needs at least 2 entries"),
    (("model", "widths"), [4, 0, 2], "field `model.widths` entries must be positive"),
    (("model", "widths"), "4-8-2", "field `model.widths` must be a list of integers"),
    (("model", "widths"), KeyError, "missing field `model.widths`"),
    (("model", "widht"), [3, 2], "Did you mean `model.widths`"),
    (("data", "n"), KeyError, "missing field `data.n`"),
    (("data", "n"), 2.5, "field `data.n` must be an integer"),
    (("data", "inputs"), "uniform", "field `data.inputs` must be one of"),
    (("data", "tokens"), 5, "`data.tokens` only applies to attention models"),
    (("dynamics", 0, "rtol"), -1e-8, "field `dynamics[0].rtol` must be > 0"),
    (("dynamics", 0, "t1"), KeyError, "missing field `dynamics[0].t1`"),
    (("dynamics", 0, "solver"), "rk4", "field `dynamics[0].solver` must be one of"),
    (("dynamics", 1, "batch_size"), 99, "`dynamics[1].batch_size` = 99 exceeds `data.n`"),
    (("dynamics", 1, "lr"), 0, "field `dynamics[1].lr` must be > 0"),
    (("dynamics", 1, "kind"), "newton", "unknown `dynamics[1].kind`"),
    (("dynamics",), [], "at least one [[dynamics]]"),
    (("loss", ), {"kind": "log_cosh", "moments": True}, "`loss.moments` = true needs"),
    (("loss", ), {"kind": "hinge"}, "field `loss.kind` must be one of"),
    (("seed",), "zero", "field `config.seed` must be an integer"),
    (("model",), KeyError, "missing section `[model]`"),
])
def test_bad_configs_name_the_field(path, value, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value))
    assert message in str(info.value)


def test_attention_config_needs_tokens_and_causal_decay():
    raw = _with(("model",), {"kind": "lightning_attention", "dim": 4})
    with pytest.raises(ConfigError, match="data.tokens"):
        parse_config(raw)
    raw["data"]["tokens"] = 5
    raw["model"].update(causal=False, decay=0.9)
    with pytest.raises(ConfigError, match="model.decay"):
        parse_config(raw)


def test_duplicate_labels_are_rejected():
    raw = copy.deepcopy(VALID)
    raw["dynamics"] = [{"kind": "flow", "t1": 1.0}, {"kind": "flow", "t1": 2.0}]
    with pytest.raises(ConfigError, match="used twice"):
        parse_config(raw)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nkind = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_embedded_quickstart_equals_the_shipped_file():
    embedded = importlib.resources.files("conservation").joinpath("configs/quickstart.toml")
    assert embedded.read_text() == (ROOT / "configs" / "quickstart.toml").read_text()
    assert load_config(None) == load_config(ROOT / "configs" / "quickstart.toml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = parse_config(tomllib.loads(path.read_text()), default_name=path.stem)
    assert config.dynamics


AUGMENTED = copy.deepcopy(VALID) | {"augmentation": {"group": "cyclic_shift"},
                                    "dynamics": [{"kind": "flow", "t1": 1.0}]}


@pytest.mark.parametrize("change, message", [
    ({"augmentation": {"group": "cyclic"}}, "field `augmentation.group` must be one of"),
    ({"augmentation": {}}, "missing field `augmentation.group`"),
    ({"augmentation": {"group": "rotations"}}, "acts on R², but the model's input dimension is 3"),
    ({"augmentation": {"group": "icosahedral"}, "model": {"kind": "deep_linear",
                                                           "widths": [2, 2]}},
     "acts on R³, but the model's input dimension is 2"),
    ({"augmentation": {"group": "rotations"}, "model": {"kind": "neuron", "dim": 2}},
     "`augmentation.order` (n of C_n) is required"),
    ({"augmentation": {"group": "cyclic_shift", "order": 4}}, "only applies to 'rotations'"),
    ({"augmentation": {"group": "orthogonal"}, "loss": {"kind": "log_cosh"}},
     "set `augmentation.samples`"),
    ({"augmentation": {"group": "orthogonal", "samples": 7}}, "must be even"),
    ({"augmentation": {"group": "orthogonal", "mode": "orbit"}}, "needs finitely many"),
    ({"augmentation": {"group": "permutations", "equivariant": True}},
     "needs output width = input width (3), got 2"),
    ({"laws": {"extra": ["rowspaces"]}}, "unknown law 'rowspaces' in `laws.extra`"),
    ({"data": {"n": 2, "inputs": "explicit", "x": [[1.0, 2.0], [3.0, 4.0]]}},
     "`data.x` rows have 2 entries but the model's input dimension is 3"),
    ({"data": {"n": 3, "inputs": "explicit", "x": [[1.0, 2.0, 3.0]]}},
     "`data.x` has 1 rows but `data.n` = 3"),
    ({"data": {"n": 2, "inputs": "explicit", "x": [[1, 2, 3], [4, 5]]}},
     "field `data.x` must be a list of numbers or a list of equal-length lists"),
    ({"data": {"n": 2, "x": [[1, 2, 3], [4, 5, 6]]}}, "`data.x` and `data.inputs` = 'explicit'"),
    ({"ensemble": {"size": 2, "init": [[1.0] * 14]}}, "`ensemble.init` has 1 rows"),
])
def test_augmentation_and_explicit_data_errors_name_the_field(change, message):
    with pytest.raises(ConfigError) as error:
        parse_config(copy.deepcopy(AUGMENTED) | change)
    assert message in str(error.value)


def test_wrong_length_explicit_init_is_reported_when_building():
    from conservation._runner import build

    config = parse_config(copy.deepcopy(VALID) | {"ensemble": {"size": 1, "init": [[1.0] * 5]}})
    with pytest.raises(ConfigError, match="rows have 5 entries but the model has 20 parameters"):
        build(config)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.toml")),
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.name and config.dynamics


@pytest.mark.parametrize("change, message", [
    ({"model": {"kind": "mlp", "widths": [3, 2]}}, "field `model.widths` needs at least 3"),
    ({"model": {"kind": "mlp", "widths": [3, 4, 2], "activation": "tanh"}},
     "field `model.activation` must be one of 'relu', 'leaky_relu', 'linear'"),
    ({"dynamics": [{"kind": "modified_flow", "t1": 1.0}]}, "missing field `dynamics[0].lr`"),
    ({"dynamics": [{"kind": "modified_flow", "t1": 1.0, "lr": 0.1, "momentum": 1.0}]},
     "field `dynamics[0].momentum` must lie in [0, 1)"),
    ({"dynamics": [{"kind": "flow", "t1": 1.0, "weight_decay": -1.0}]},
     "field `dynamics[0].weight_decay` must be ≥ 0"),
    ({"model": {"kind": "neuron", "dim": 2, "activation": "sextc"}},
     "field `model.activation` must be one of"),
])
def test_mechanics_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError) as error:
        parse_config(copy.deepcopy(VALID) | change)
    assert message in str(error.value)
