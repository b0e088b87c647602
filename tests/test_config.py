"""Config validation: every mistake gives one error that names the field."""

import copy
import importlib.resources
import pathlib
import tomllib

import pytest

from conservation._experiments.config import ConfigError, load_config, parse_config

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
def test_every_shipped_config_parses_from_its_toml(path):
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
    from conservation._experiments.runner import build

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


# ----------------------------------------------------------------------------- issue 13
# Every bad config exits 2 with one line naming the field, from `conservation run` (parse-time
# and build-time problems alike) and never a traceback.

import json
import math

import hypothesis
import hypothesis.strategies as st

from conservation._experiments.cli import main
from conservation._experiments.config import AXES, MODEL_SPECS, config_schema

_FLOW = {"kind": "flow", "t1": 1.0}
_GD = {"kind": "gd", "lr": 0.1, "steps": 3}


def _config(**sections):
    raw = {"name": "bad", "model": {"kind": "deep_linear", "widths": [3, 4, 2]},
           "data": {"n": 8}, "dynamics": [dict(_GD)]}
    for key, value in sections.items():
        if value is KeyError:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def _toml(raw) -> str:
    """A tiny TOML writer for the test tables (floats as repr: inf/nan round-trip)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "inf" if v == math.inf else "-inf" if v == -math.inf else \
                "nan" if v != v else repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict | list)
             or (isinstance(v, list) and k != "dynamics")]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{f} = {value(x)}" for f, x in v.items()]
        elif k == "dynamics" and isinstance(v, list):
            for run in v:
                lines += ["[[dynamics]]"] + [f"{f} = {value(x)}" for f, x in run.items()]
    return "\n".join(lines) + "\n"


_MODEL = {"kind": "deep_linear", "widths": [3, 4, 2]}
_SWEEP_GD = {"lr": [0.1]}
BAD = [
    # -- sweep values go through the field checks (issue 13 item 1)
    ("sweep-lr-negative", _config(sweep={"lr": [-0.1, 0.5]}), "dynamics[0].lr` must be > 0"),
    ("sweep-wd-negative", _config(sweep={"weight_decay": [-0.1, 0.0]}),
     "dynamics[0].weight_decay` must be ≥ 0"),
    ("sweep-momentum-1.5", _config(dynamics=[{"kind": "momentum", "lr": 0.1, "steps": 3}],
                                   sweep={"momentum": [0.5, 1.5]}),
     "dynamics[0].momentum` must lie in [0, 1)"),
    ("sweep-init-scale-0", _config(sweep={"init_scale": [0.0, 1.0]}),
     "model.init_scale` must be > 0"),
    ("sweep-rtol-inf", _config(dynamics=[dict(_FLOW)], sweep={"rtol": [1e-6, math.inf]}),
     "dynamics[0].rtol` must be a finite number > 0 and < 0.01"),
    ("sweep-lr-on-flow", _config(dynamics=[dict(_FLOW)], sweep={"lr": [0.1]}),
     "axis `sweep.lr` does not apply"),
    ("sweep-group-without-augmentation", _config(sweep={"group": ["cyclic_shift"]}),
     "axis `sweep.group` needs an [augmentation]"),
    ("sweep-solver-unknown", _config(dynamics=[dict(_FLOW)], sweep={"solver": ["rk4"]}),
     "dynamics[0].solver` must be one of"),
    ("sweep-loss-unknown", _config(sweep={"loss": ["hinge"]}), "loss.kind` must be one of"),
    ("sweep-n-zero", _config(sweep={"n": [0, 8]}), "data.n` must be > 0"),
    ("sweep-noise-nan", _config(sweep={"noise": [math.nan]}), "data.noise` must be a finite"),
    ("sweep-duplicate", _config(sweep={"lr": [0.1, 0.1]}), "lists a value twice"),
    ("sweep-two-dynamics", _config(dynamics=[dict(_GD), dict(_FLOW)], sweep={"lr": [0.1]}),
     "exactly one [[dynamics]]"),
    # -- non-finite numbers
    ("rtol-inf", _config(dynamics=[_FLOW | {"rtol": math.inf}]),
     "field `dynamics[0].rtol` must be a finite number > 0 and < 0.01"),
    ("t1-inf", _config(dynamics=[_FLOW | {"t1": math.inf}]), "field `dynamics[0].t1` must be a"),
    ("lr-inf", _config(dynamics=[_GD | {"lr": math.inf}]), "field `dynamics[0].lr` must be a"),
    ("lr-nan", _config(dynamics=[_GD | {"lr": math.nan}]), "field `dynamics[0].lr` must be a"),
    ("divergence-inf", _config(dynamics=[_GD | {"divergence": math.inf}]),
     "field `dynamics[0].divergence`"),
    ("init-scale-inf", _config(model=_MODEL | {"init_scale": math.inf}),
     "field `model.init_scale` must be a finite"),
    ("noise-inf", _config(data={"n": 8, "noise": math.inf}), "field `data.noise`"),
    ("x-nan", _config(data={"n": 1, "inputs": "explicit", "x": [[1.0, math.nan, 2.0]]}),
     "field `data.x` must hold finite numbers"),
    ("activation-inf", _config(model={"kind": "polynomial", "widths": [2, 2, 1],
                                      "activation": [0.0, math.inf]}),
     "field `model.activation`"),
    ("decay-inf", _config(model={"kind": "lightning_attention", "dim": 2, "decay": math.inf},
                          data={"n": 4, "tokens": 3}), "field `model.decay`"),
    # -- types, choices, ranges
    ("wd-negative", _config(dynamics=[_GD | {"weight_decay": -0.1}]),
     "field `dynamics[0].weight_decay` must be ≥ 0"),
    ("steps-float", _config(dynamics=[_GD | {"steps": 3.5}]),
     "field `dynamics[0].steps` must be an integer"),
    ("steps-bool", _config(dynamics=[_GD | {"steps": True}]), "field `dynamics[0].steps`"),
    ("n-save-1", _config(dynamics=[_GD | {"n_save": 1}]), "field `dynamics[0].n_save` must be"),
    ("label-int", _config(dynamics=[_GD | {"label": 3}]), "field `dynamics[0].label` must be a"),
    ("unknown-top", _config(sed=3), "unknown field `config.sed`. Did you mean `config.seed`"),
    ("widht", _config(model={"kind": "deep_linear", "widht": [3, 2]}),
     "unknown field `model.widht`. Did you mean `model.widths`?"),
    ("moments-string", _config(loss={"moments": "yes"}), "field `loss.moments` must be"),
    ("extra-string", _config(laws={"extra": "rowspace"}), "field `laws.extra` must be"),
    ("ensemble-size-0", _config(ensemble={"size": 0}), "field `ensemble.size` must be > 0"),
    ("model-table-int", _config(model=3), "`model` must be a table"),
    ("data-missing-n", _config(data={"inputs": "gaussian"}), "missing field `data.n`"),
    ("bias-on-deep-linear", _config(model=_MODEL | {"bias": False}),
     "unknown field `model.bias`"),
    ("solver-unknown", _config(dynamics=[_FLOW | {"solver": "euler"}]),
     "field `dynamics[0].solver` must be one of 'tsit5', 'dopri5', 'dopri8', 'heun', "
     "'kvaerno5', 'stabilized', 'auto'"),
    # -- cross-field checks found at parse time
    ("moments-mlp", _config(model={"kind": "mlp", "widths": [3, 4, 2]},
                            loss={"moments": True}), "`loss.moments` = true needs a tensorizable"),
    ("permutations-d14", _config(model={"kind": "deep_linear", "widths": [14, 1]},
                                 augmentation={"group": "permutations"}),
     "`augmentation.group` = 'permutations' on 14 coordinates"),
    ("attention-x-width", _config(model={"kind": "lightning_attention", "dim": 2},
                                  data={"n": 1, "inputs": "explicit",
                                        "x": [[[1.0, 2.0, 3.0]]]}),
     "`data.x` for attention models holds one token matrix per sample, shape (n, tokens, 2)"),
    ("file-missing", _config(data={"inputs": "file", "path": "nope.npz"}),
     "field `data.path`: file"),
    ("file-suffix", _config(data={"inputs": "file", "path": "x.csv"}),
     "field `data.path` must name a .npy or .npz file"),
    ("path-without-file", _config(data={"n": 4, "path": "x.npy"}),
     "`data.path` needs `data.inputs` = 'file'"),
    ("data-factory-module", _config(data={"inputs": "python", "factory": "no_such_mod:f"}),
     "field `data.factory`: cannot import module 'no_such_mod'"),
    ("data-factory-attribute", _config(data={"inputs": "python", "factory": "math:nope"}),
     "field `data.factory`: module 'math' has no attribute 'nope'"),
    ("model-factory-not-callable", _config(model={"kind": "python", "factory": "math:pi",
                                                  "input_shape": [3]}),
     "field `model.factory`: 'math:pi' is not callable"),
    ("model-factory-format", _config(model={"kind": "python", "factory": "math.sqrt"}),
     'field `model.factory` must read "package.module:function"'),
    ("python-model-needs-shape", _config(model={"kind": "python", "factory": "math:sqrt"}),
     "`model.input_shape` is required"),
    # -- found while building (before any compile)
    ("init-row-length", _config(ensemble={"size": 1, "init": [[1.0] * 5]}),
     "`ensemble.init` rows have 5 entries but the model has 20 parameters"),
    ("y-width", _config(data={"n": 2, "inputs": "explicit", "x": [[1.0, 2.0, 3.0]] * 2,
                              "targets": "explicit", "y": [[1.0, 2.0, 3.0]] * 2}),
     "`data.y` rows have shape (3,) but the model's output has shape (2,)"),
    ("range-qkv-deep-linear", _config(laws={"extra": ["range_qkv"]}),
     "`laws.extra` = 'range_qkv' does not apply to DeepLinear models"),
    ("memory-320GB", _config(model={"kind": "deep_linear", "widths": [3, 200000, 200000, 2]}),
     "reduce `model.widths`"),
    ("memory-ensemble", _config(ensemble={"size": 10 ** 11}), "this run needs ~"),
    ("memory-samples", _config(data={"n": 10 ** 11}), "reduce `data.n`"),
    # (a flow saves n_save points; a 3-step GD run saves at most its 4 steps)
    ("memory-n-save", _config(dynamics=[{"kind": "flow", "t1": 1.0, "n_save": 10 ** 12}]),
     "`n_save`"),
    ("model-factory-raises", _config(model={"kind": "python", "factory": "math:sqrt",
                                            "input_shape": [3]}),
     "field `model.factory`: math:sqrt(key, **kwargs) raised TypeError"),
]


@pytest.mark.parametrize("name, raw, message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs_exit_2_naming_the_field(name, raw, message, tmp_path, capsys):
    path = tmp_path / f"{name}.toml"
    path.write_text(_toml(raw))
    command = "sweep" if "sweep" in raw else "run"
    code = main([command, str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("conservation: config error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and "`" in lines[0]  # the field, in backticks
    assert not (tmp_path / "out" / "points").exists() or not any(
        (tmp_path / "out" / "points").iterdir())


def test_at_least_forty_bad_configs():
    assert len(BAD) >= 40


def test_sweep_devices_beyond_the_machine_is_a_config_error(tmp_path, capsys):
    import jax

    raw = _config(sweep={"lr": [0.1], "devices": len(jax.devices()) + 3})
    path = tmp_path / "d.toml"
    path.write_text(_toml(raw))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "field `sweep.devices`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_run_and_sweep_say_what_they_ignore():
    assert "`[sweep]` is ignored" in parse_config(_config(sweep={"lr": [0.1]})).ignored("run")[0]
    both = parse_config(_config(sweep={"lr": [0.1]}, ensemble={"size": 4}))
    assert "`[ensemble]` is ignored" in both.ignored("sweep")[0]
    assert parse_config(_config()).ignored("run") == []


def test_sweep_points_are_validated_and_typed():
    config = parse_config(_config(dynamics=[dict(_FLOW)],
                                  sweep={"rtol": [1e-6, 1e-8], "seed": [0, 1]}))
    assert config.sweep.axes == {"rtol": [1e-6, 1e-8], "seed": [0, 1]}
    point = config.at({"rtol": 1e-8, "seed": 1})
    assert point.dynamics[0].rtol == 1e-8 and point.seed == 1 and point.sweep is None
    # to_dict is plain JSON and stable: a round-trip gives the same dictionary.
    assert json.loads(json.dumps(config.to_dict(), allow_nan=False)) == config.to_dict()


def test_schema_covers_every_model_kind_and_the_shipped_file():
    schema = config_schema()
    text = json.dumps(schema)
    for kind in MODEL_SPECS:
        assert f'"{kind}"' in text
    assert set(AXES) <= set(schema["properties"]["sweep"]["properties"])
    shipped = ROOT / "configs" / "schema.json"
    assert json.loads(shipped.read_text()) == schema  # regenerate with config_schema()


# Random types and values into every field: parse_config either accepts or raises ConfigError
# (the CLI turns that into exit 2), never anything else.
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10 ** 6), st.floats(allow_nan=True,
                                                                 allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["auto", "mse", "relu", "orthogonal", "flow", "gd",
                                          "explicit", "file", "python", "x.npz", "math:sqrt",
                                          "log_cosh", "sign_flips", "tsit5", "orbit"]),
    st.floats(1e-3, 1.0), st.integers(1, 4), st.lists(st.floats(1e-3, 1.0), min_size=1,
                                                      max_size=3, unique=True),
    st.lists(st.one_of(st.integers(-2, 6), st.floats(-2, 6)), max_size=4),
    st.lists(st.lists(st.floats(-2, 2), min_size=1, max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.dates(), st.datetimes(), st.times(),  # TOML has these too
    st.lists(st.one_of(st.dates(), st.text(max_size=2), st.booleans()), min_size=1,
             max_size=2))
_SECTIONS = {
    "model": sorted({f for spec in MODEL_SPECS.values() for f in spec.model_fields}),
    "data": ["n", "inputs", "x", "path", "factory", "input_scale", "targets", "y",
             "teacher_scale", "noise", "tokens"],
    "loss": ["kind", "moments"], "ensemble": ["size", "init"],
    "augmentation": ["group", "order", "samples", "equivariant", "compare", "mode"],
    "laws": ["architecture", "augmentation", "extra"],
    "dynamics": ["kind", "t1", "solver", "rtol", "atol", "max_steps", "weight_decay", "lr",
                 "momentum", "steps", "batch_size", "n_save", "divergence", "label"],
    "sweep": list(AXES) + ["chunk", "devices"], "": ["name", "seed", "output"],
}
_FIELDS = [(s, f) for s, fields in _SECTIONS.items() for f in fields]


@hypothesis.settings(max_examples=250, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES), min_size=1,
                           max_size=3),
                  st.sampled_from([dict(_GD), dict(_FLOW), {"kind": "sgd", "lr": 0.1,
                                                            "steps": 2, "batch_size": 2}]),
                  st.sampled_from([None, {"group": "cyclic_shift"}]))
def test_random_values_in_every_field_give_a_config_or_a_config_error(changes, run, augment):
    raw = _config(dynamics=[dict(run)])
    if augment:
        raw["augmentation"] = dict(augment)
    for (section, field), value in changes:
        if section == "":
            raw[field] = value
        elif section == "dynamics":
            raw["dynamics"][0][field] = value
        else:
            raw.setdefault(section, {})[field] = value
    try:
        config = parse_config(raw)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    json.dumps(config.to_dict(), allow_nan=False)  # anything accepted is finite, plain JSON


def test_shipped_configs_validate_against_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(
        json.loads((ROOT / "configs" / "schema.json").read_text()))
    for path in sorted((ROOT / "configs").rglob("*.toml")):
        assert not list(validator.iter_errors(tomllib.loads(path.read_text()))), path
    # an editor sees the same mistakes: a negative tolerance, a typo'd field
    bad = _config(dynamics=[_FLOW | {"rtol": -1.0}])
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors(_config(model={"kind": "deep_linear", "widht": [3]})))


@pytest.mark.parametrize("path, value, message", [
    (("name",), "../../x", "plain file name"),
    (("name",), "a/b", "plain file name"),
    (("name",), "..", "plain file name"),
    (("name",), "   ", "plain file name"),
    (("name",), "n" * 300, "300 bytes long"),
    (("output",), "results/" + "o" * 300, "over the 255-byte limit"),
    (("output",), "results/a\0b", "NUL"),
    (("dynamics", 0, "label"), "l" * 300, "at most 200 characters"),
])
def test_names_and_paths_the_file_system_cannot_take_are_config_errors(path, value, message):
    """`name` names the folder results/<name> (a plain name, never a path out of results/),
    `output` is a folder, a label names a file: each must fit the file system."""
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(_with(path, value))
    assert "\n" not in str(error.value) and len(str(error.value)) < 400
    assert parse_config(_with(("name",), "n" * 255)).output == "results/" + "n" * 255


def test_a_python_factory_beside_the_config_is_found_without_pythonpath(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the config's folder is added
    module = f"beside_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(
        "from conservation import DeepLinear\n\n"
        "def make(key, widths):\n    return DeepLinear.random(widths, key=key)\n")
    config = tmp_path / "python.toml"
    config.write_text(f"""
[model]
kind = "python"
factory = "{module}:make"
kwargs = {{widths = [2, 3, 1]}}
input_shape = [2]
[data]
n = 8
[[dynamics]]
kind = "gd"
lr = 0.1
steps = 5
""")
    assert load_config(config).model.factory == f"{module}:make"
    assert sys.modules[module].__file__ == str(tmp_path / f"{module}.py")
    config.write_text(config.read_text().replace(f"{module}:make", "not_beside_it:make"))
    with pytest.raises(ConfigError, match="in the config's folder") as error:
        load_config(config)
    assert str(tmp_path) in str(error.value) and "model.factory" in str(error.value)
