"""TOML run configs: parsing and validation with errors that name the offending field.

A config has top-level `name`, `seed`, `output`, tables `[model]`, `[data]`, `[loss]`,
`[ensemble]` and one or more `[[dynamics]]` tables (each a run on the same models and data).
See `configs/quickstart.toml` for a commented example and README.md for every field.
"""

import dataclasses
import difflib
import importlib.resources
import pathlib
import tomllib
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A config problem; the message names the field and says how to fix it."""


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Field:
    kind: str  # "int", "float", "bool", "str", "ints", "floats", "str|floats", "auto|bool"
    default: Any = _REQUIRED
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None
    example: str = ""


def _positive(v):
    return None if v > 0 else "must be > 0"


def _nonnegative(v):
    return None if v >= 0 else "must be ≥ 0"


def _choice(*options):
    def check(v):
        return None if v in options else f"must be one of {', '.join(map(repr, options))}"
    return check


def _at_least(n, what):
    def check(v):
        if len(v) < n:
            return f"needs at least {n} entries ({what})"
        if not all(x > 0 for x in v):
            return "entries must be positive"
        return None
    return check


def _unit_interval(v):
    return None if 0.0 < v <= 1.0 else "must lie in (0, 1]"


def _momentum(v):
    return None if 0.0 <= v < 1.0 else "must lie in [0, 1)"


_TYPE_NAMES = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "ints": "a list of integers", "floats": "a list of numbers",
    "str|floats": "a preset name or a list of numbers", "auto|bool": '"auto", true or false',
    "matrix": "a list of numbers or a list of equal-length lists of numbers",
    "strs": "a list of strings",
}


def _coerce(kind, v):
    """Return v converted to `kind`, or raise TypeError."""
    is_num = isinstance(v, int | float) and not isinstance(v, bool)
    if kind == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind == "float" and is_num:
        return float(v)
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "str" and isinstance(v, str):
        return v
    if kind == "ints" and isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v):
        return list(v)
    if kind == "floats" and isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v]
    if kind == "str|floats":
        return v if isinstance(v, str) else _coerce("floats", v)
    if kind == "auto|bool" and (v == "auto" or isinstance(v, bool)):
        return v
    if kind == "strs" and isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    if kind == "matrix" and isinstance(v, list) and v:
        rows = [_coerce("floats", r) if isinstance(r, list) else None for r in v]
        if all(r is None for r in rows):
            return [[x] for x in _coerce("floats", v)]  # a column
        if any(r is None for r in rows) or len({len(r) for r in rows}) != 1 or not rows[0]:
            raise TypeError
        return rows
    raise TypeError


def _read(table: dict, path: str, spec: dict[str, _Field]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"`{path}` must be a table, e.g. [{path}].")
    for key in table:
        if key not in spec:
            near = difflib.get_close_matches(key, spec, n=1)
            hint = f" Did you mean `{path}.{near[0]}`?" if near else (
                f" Known fields: {', '.join(sorted(spec))}.")
            raise ConfigError(f"unknown field `{path}.{key}`.{hint}")
    out = {}
    for key, field in spec.items():
        if key not in table:
            if field.default is _REQUIRED:
                example = f" For example: {key} = {field.example}" if field.example else ""
                raise ConfigError(f"missing field `{path}.{key}`.{example}")
            out[key] = field.default
            continue
        try:
            value = _coerce(field.kind, table[key])
        except TypeError:
            raise ConfigError(
                f"field `{path}.{key}` must be {_TYPE_NAMES[field.kind]}, got {table[key]!r}."
            ) from None
        problem = field.check(value) if field.check else None
        if problem:
            raise ConfigError(f"field `{path}.{key}` {problem}, got {value!r}.")
        out[key] = value
    return out


_KIND = _Field("str")
GROUP_NAMES = ("cyclic_shift", "permutations", "rotations", "sign_flips", "octahedral",
               "icosahedral", "orthogonal")
_INIT_SCALE = _Field("float", 1.0, _positive)
MODEL_SPECS = {
    "deep_linear": {
        "kind": _KIND,
        "widths": _Field("ints", check=_at_least(2, "input and output width"),
                         example="[16, 32, 32, 8]"),
        "init_scale": _INIT_SCALE,
    },
    "polynomial": {
        "kind": _KIND,
        "widths": _Field("ints", check=_at_least(3, "input, hidden and output width"),
                         example="[3, 4, 1]"),
        "activation": _Field("str|floats", "quadratic"),
        "init_scale": _INIT_SCALE,
    },
    "lightning_attention": {
        "kind": _KIND,
        "dim": _Field("int", check=_positive, example="8"),
        "key_dim": _Field("int", 1, _positive),
        "value_dim": _Field("int", 1, _positive),
        "heads": _Field("int", 1, _positive),
        "out_dim": _Field("int", 0, _nonnegative),  # 0: no output projection
        "decay": _Field("float", 1.0, _unit_interval),
        "causal": _Field("bool", True),
        "form": _Field("str", "parallel", _choice("parallel", "tiled", "recurrent")),
        "block_size": _Field("int", 64, _positive),
        "init_scale": _INIT_SCALE,
    },
    "mlp": {
        "kind": _KIND,
        "widths": _Field("ints", check=_at_least(3, "input, hidden and output width"),
                         example="[4, 16, 16, 3]"),
        "activation": _Field("str", "relu", _choice("relu", "leaky_relu", "linear")),
        "normalize": _Field("bool", False),  # RMS-normalise layer 1: scale symmetry
        "init_scale": _INIT_SCALE,
    },
    "neuron": {
        "kind": _KIND,
        "dim": _Field("int", check=_positive, example="2"),
        "activation": _Field("str|floats", "sextic"),
        "init_scale": _INIT_SCALE,
    },
}
DATA_SPEC = {
    "n": _Field("int", check=_positive, example="128"),
    "inputs": _Field("str", "gaussian", _choice("gaussian", "whitened", "explicit")),
    "x": _Field("matrix", None),  # inputs = "explicit": one row per sample
    "input_scale": _Field("float", 1.0, _positive),
    "targets": _Field("str", "teacher", _choice("teacher", "random", "explicit")),
    "y": _Field("matrix", None),  # targets = "explicit": one value or row per sample
    "teacher_scale": _Field("float", 1.0, _positive),
    "noise": _Field("float", 0.0, _nonnegative),
    "tokens": _Field("int", 0, _nonnegative),  # sequence length, attention models only
}
LOSS_SPEC = {
    "kind": _Field("str", "mse", _choice("mse", "log_cosh", "quartic", "cross_entropy")),
    "moments": _Field("auto|bool", "auto"),
}
ENSEMBLE_SPEC = {
    "size": _Field("int", 1, _positive),
    "init": _Field("matrix", None),  # explicit flat parameter vectors, one per member
}
AUGMENTATION_SPEC = {
    "group": _Field("str", check=_choice(*GROUP_NAMES), example='"cyclic_shift"'),
    "order": _Field("int", 0, _nonnegative),  # rotations: n of C_n ⊂ SO(2)
    "samples": _Field("int", 0, _nonnegative),  # orthogonal: 0 = exact, else Monte Carlo
    "equivariant": _Field("bool", False),
    "compare": _Field("bool", True),  # also run every dynamics on the plain data
    "mode": _Field("str", "auto", _choice("auto", "orbit")),  # orbit: expand the data
}
_COMMON_DYNAMICS = {
    "kind": _KIND,
    "label": _Field("str", ""),
    "n_save": _Field("int", None, lambda v: None if v >= 2 else "must be ≥ 2"),  # None: runner default
    "divergence": _Field("float", 1e8, _positive),
}
_OPTIMIZER = {
    **_COMMON_DYNAMICS,
    "lr": _Field("float", check=_positive, example="0.01"),
    "steps": _Field("int", check=_positive, example="1000"),
    "weight_decay": _Field("float", 0.0, _nonnegative),
}
_FLOW = {
    **_COMMON_DYNAMICS,
    "t1": _Field("float", check=_positive, example="50.0"),
    "solver": _Field("str", "tsit5", _choice("tsit5", "dopri5", "dopri8", "heun", "kvaerno5")),
    "rtol": _Field("float", 1e-8, _positive),
    "atol": _Field("float", 0.0, _nonnegative),  # 0: same as rtol
    "max_steps": _Field("int", 100_000, _positive),
    "weight_decay": _Field("float", 0.0, _nonnegative),
}
DYNAMICS_SPECS = {
    "flow": _FLOW,
    # The modified equation of GD / heavy ball at learning rate `lr` (time t = lr · step).
    "modified_flow": {**_FLOW, "lr": _Field("float", check=_positive, example="0.05"),
                      "momentum": _Field("float", 0.0, _momentum)},
    "gd": _OPTIMIZER,
    "sgd": {**_OPTIMIZER, "batch_size": _Field("int", check=_positive, example="16")},
    "momentum": {**_OPTIMIZER, "momentum": _Field("float", 0.9, _momentum),
                 "batch_size": _Field("int", 0, _nonnegative)},
    "adam": {**_OPTIMIZER, "batch_size": _Field("int", 0, _nonnegative)},
}
TOP_SPEC = {
    "name": _Field("str", ""),
    "seed": _Field("int", 0),
    "output": _Field("str", ""),
}
LAW_NAMES = ("rowspace", "range_qkv", "ratio_c3", "phase1", "phase2", "phase3")
LAWS_SPEC = {
    "architecture": _Field("bool", True),  # the model's own laws
    "augmentation": _Field("bool", True),  # laws derived from (model, augmentation group)
    "extra": _Field("strs", []),  # candidate laws to monitor anyway (negative controls)
}
SECTIONS = ("model", "data", "loss", "ensemble", "augmentation", "laws", "sweep", "dynamics")
SWEEP_AXES = {"seed": "int", "init_scale": "float", "lr": "float", "weight_decay": "float",
              "momentum": "float", "widths": "ints"}


def _read_sweep(table, dynamics, model) -> dict:
    if not isinstance(table, dict):
        raise ConfigError("`sweep` must be a table, e.g. [sweep].")
    axes, options = {}, {"chunk": 0, "devices": 0}
    for key, values in table.items():
        if key in options:
            if not isinstance(values, int) or isinstance(values, bool) or values < 0:
                raise ConfigError(f"field `sweep.{key}` must be an integer ≥ 0, got {values!r}.")
            options[key] = values
            continue
        if key not in SWEEP_AXES:
            near = difflib.get_close_matches(key, list(SWEEP_AXES) + list(options), n=1)
            hint = f" Did you mean `sweep.{near[0]}`?" if near else (
                f" Axes: {', '.join(SWEEP_AXES)}; options: chunk, devices.")
            raise ConfigError(f"unknown field `sweep.{key}`.{hint}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axis `sweep.{key}` must be a non-empty list of values.")
        try:
            axes[key] = [_coerce(SWEEP_AXES[key], v) for v in values]
        except TypeError:
            raise ConfigError(f"axis `sweep.{key}` must list {_TYPE_NAMES[SWEEP_AXES[key]]} "
                              "values.") from None
    if not axes:
        raise ConfigError("`sweep` needs at least one axis, e.g. lr = [0.01, 0.02].")
    if len(dynamics) != 1 or dynamics[0]["kind"] not in ("gd", "sgd", "momentum"):
        raise ConfigError("a sweep runs exactly one [[dynamics]] entry of kind 'gd', 'sgd' or "
                          "'momentum'.")
    if "momentum" in axes and dynamics[0]["kind"] != "momentum":
        raise ConfigError("axis `sweep.momentum` needs `dynamics[0].kind` = 'momentum'.")
    if "widths" in axes and "widths" not in model:
        raise ConfigError(f"axis `sweep.widths` does not apply to {model['kind']!r} models.")
    for w in axes.get("widths", []):
        if len(w) != len(model["widths"]) or w[0] != model["widths"][0]:
            raise ConfigError(f"axis `sweep.widths` entry {w} must keep the depth and input "
                              f"width of `model.widths` = {model['widths']}.")
    return {"axes": axes, **options}


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated run config (plain dicts of resolved fields, defaults filled in)."""

    name: str
    seed: int
    output: str
    model: dict
    data: dict
    loss: dict
    ensemble: dict
    augmentation: dict | None
    laws: dict
    sweep: dict | None
    dynamics: tuple[dict, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"dynamics": list(self.dynamics)}


def _kind_table(table, path, specs):
    if not isinstance(table, dict):
        raise ConfigError(f"`{path}` must be a table.")
    if "kind" not in table:
        raise ConfigError(f"missing field `{path}.kind`; choose one of {', '.join(specs)}.")
    kind = table["kind"]
    if kind not in specs:
        near = difflib.get_close_matches(str(kind), specs, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown `{path}.kind` = {kind!r}; choose one of {', '.join(specs)}.{hint}")
    return _read(table, path, specs[kind])


def parse_config(raw: dict, *, default_name: str = "run") -> Config:
    """Validate a config dictionary (as parsed from TOML) and fill in defaults."""
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    top = _read(top, "config", TOP_SPEC)
    for section in ("model", "data", "dynamics"):
        if section not in raw:
            raise ConfigError(f"missing section `[{section}]`" + (
                " (write [[dynamics]] for each run)." if section == "dynamics" else "."))
    model = _kind_table(raw["model"], "model", MODEL_SPECS)
    data = _read(raw["data"], "data", DATA_SPEC)
    loss = _read(raw.get("loss", {}), "loss", LOSS_SPEC)
    ensemble = _read(raw.get("ensemble", {}), "ensemble", ENSEMBLE_SPEC)
    augmentation = (_read(raw["augmentation"], "augmentation", AUGMENTATION_SPEC)
                    if "augmentation" in raw else None)
    laws = _read(raw.get("laws", {}), "laws", LAWS_SPEC)
    for name in laws["extra"]:
        if name not in LAW_NAMES:
            raise ConfigError(f"unknown law {name!r} in `laws.extra`; choose from "
                              f"{', '.join(LAW_NAMES)}.")
    runs = raw["dynamics"]
    runs = [runs] if isinstance(runs, dict) else runs
    if not isinstance(runs, list) or not runs:
        raise ConfigError("`dynamics` must hold at least one [[dynamics]] table.")
    dynamics = []
    for i, table in enumerate(runs):
        run = _kind_table(table, f"dynamics[{i}]", DYNAMICS_SPECS)
        run["label"] = run["label"] or _default_label(run)
        dynamics.append(run)
    labels = [run["label"] for run in dynamics]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise ConfigError(f"`dynamics[{i}].label` = {label!r} is used twice; labels name the "
                              "output files, so give each run its own `label`.")
    _check_consistency(model, data, loss, dynamics)
    sweep = _read_sweep(raw["sweep"], dynamics, model) if "sweep" in raw else None
    _check_explicit(model, data, ensemble)
    if augmentation is not None:
        _check_augmentation(augmentation, model, loss)
    name = top["name"] or default_name
    return Config(name=name, seed=top["seed"], output=top["output"] or f"results/{name}",
                  model=model, data=data, loss=loss, ensemble=ensemble,
                  augmentation=augmentation, laws=laws, sweep=sweep,
                  dynamics=tuple(dynamics))


def _default_label(run):
    if run["kind"] == "flow":
        return f"flow (rtol {run['rtol']:g})"
    if run["kind"] == "modified_flow":
        return f"modified flow (lr {run['lr']:g})"
    return f"{run['kind']} (lr {run['lr']:g})"


def _check_consistency(model, data, loss, dynamics):
    attention = model["kind"] == "lightning_attention"
    if attention and data["tokens"] < 1:
        raise ConfigError("`data.tokens` (sequence length) is required for attention models, "
                          "e.g. tokens = 5.")
    if not attention and data["tokens"]:
        raise ConfigError("`data.tokens` only applies to attention models; remove it.")
    if attention and data["inputs"] == "whitened":
        raise ConfigError("`data.inputs` = 'whitened' is for vector inputs; use 'gaussian' for "
                          "attention models.")
    if attention and not model["causal"] and model["decay"] != 1.0:
        raise ConfigError("`model.decay` must be 1.0 when `model.causal` = false.")
    if model["kind"] in ("polynomial", "neuron") and isinstance(model["activation"], str):
        from ._polynomial import ACTIVATIONS
        if model["activation"] not in ACTIVATIONS:
            raise ConfigError(f"field `model.activation` must be one of {sorted(ACTIVATIONS)} "
                              f"or a list of coefficients, got {model['activation']!r}.")
    if data["inputs"] == "whitened" and data["n"] < input_dim(model):
        raise ConfigError(f"`data.n` = {data['n']} is below the input width "
                          f"{input_dim(model)}: whitened inputs need n ≥ input width.")
    if loss["moments"] is True and loss["kind"] != "mse":
        raise ConfigError("`loss.moments` = true needs `loss.kind` = 'mse' (the fast path is "
                          "exact only for MSE); use \"auto\".")
    for i, run in enumerate(dynamics):
        if run.get("batch_size", 0) > data["n"]:
            raise ConfigError(f"`dynamics[{i}].batch_size` = {run['batch_size']} exceeds "
                              f"`data.n` = {data['n']}.")


def input_dim(model: dict) -> int:
    """The size of the input axis a group acts on, for a validated `[model]` table."""
    return model["widths"][0] if "widths" in model else model["dim"]


def _check_explicit(model, data, ensemble):
    if (data["inputs"] == "explicit") != (data["x"] is not None):
        raise ConfigError("`data.x` and `data.inputs` = 'explicit' go together: give both or "
                          "neither.")
    if (data["targets"] == "explicit") != (data["y"] is not None):
        raise ConfigError("`data.y` and `data.targets` = 'explicit' go together: give both or "
                          "neither.")
    if data["x"] is not None:
        if model["kind"] == "lightning_attention":
            raise ConfigError("`data.x` (explicit inputs) is for vector-input models.")
        if len(data["x"][0]) != input_dim(model):
            raise ConfigError(f"`data.x` rows have {len(data['x'][0])} entries but the model's "
                              f"input dimension is {input_dim(model)}.")
        if len(data["x"]) != data["n"]:
            raise ConfigError(f"`data.x` has {len(data['x'])} rows but `data.n` = {data['n']}.")
    if data["y"] is not None:
        if data["x"] is None:
            raise ConfigError("explicit `data.y` needs explicit `data.x`.")
        if len(data["y"]) != data["n"]:
            raise ConfigError(f"`data.y` has {len(data['y'])} rows but `data.n` = {data['n']}.")
    if ensemble["init"] is not None and len(ensemble["init"]) != ensemble["size"]:
        raise ConfigError(f"`ensemble.init` has {len(ensemble['init'])} rows but "
                          f"`ensemble.size` = {ensemble['size']}.")


def _check_augmentation(augmentation, model, loss):
    group, d = augmentation["group"], input_dim(model)
    exact_orthogonal = group == "orthogonal" and not augmentation["samples"]
    if exact_orthogonal and loss["kind"] != "mse":
        raise ConfigError(f"exact O(d) augmentation symmetrises MSE moments; with "
                          f"`loss.kind` = {loss['kind']!r} set `augmentation.samples` (Monte "
                          "Carlo) instead.")
    if augmentation["equivariant"] and model["kind"] != "deep_linear":
        raise ConfigError("`augmentation.equivariant` = true is supported for deep_linear models.")
    if augmentation["equivariant"] and model["widths"][-1] != d:
        raise ConfigError(f"`augmentation.equivariant` = true needs output width = input width "
                          f"({d}), got {model['widths'][-1]}.")
    if group == "rotations":
        if d != 2:
            raise ConfigError(f"`augmentation.group` = 'rotations' acts on R², but the model's "
                              f"input dimension is {d}.")
        if augmentation["order"] < 1:
            raise ConfigError("`augmentation.order` (n of C_n) is required for 'rotations', "
                              "e.g. order = 18.")
    elif augmentation["order"]:
        raise ConfigError(f"`augmentation.order` only applies to 'rotations'; {group!r} acts on "
                          f"all {d} input coordinates.")
    if group in ("octahedral", "icosahedral") and d != 3:
        raise ConfigError(f"`augmentation.group` = {group!r} acts on R³, but the model's input "
                          f"dimension is {d}.")
    if augmentation["samples"] and group != "orthogonal":
        raise ConfigError("`augmentation.samples` only applies to 'orthogonal'.")
    if augmentation["samples"] % 2:
        raise ConfigError("`augmentation.samples` must be even (each g is used with −g).")
    if augmentation["mode"] == "orbit" and exact_orthogonal:
        raise ConfigError("`augmentation.mode` = 'orbit' needs finitely many group elements: "
                          "set `augmentation.samples` for 'orthogonal'.")


def load_config(path: str | pathlib.Path | None = None) -> Config:
    """Read and validate a TOML config; `None` loads the embedded quickstart config."""
    if path is None:
        text = importlib.resources.files("conservation").joinpath(
            "configs/quickstart.toml").read_text()
        name = "quickstart"
    else:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        text, name = path.read_text(), path.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path or 'quickstart'}: not valid TOML: {e}") from None
    return parse_config(raw, default_name=name)
