"""TOML run configs: one typed model (pydantic v2), validated once, with errors that name the field.

A config has top-level `name`, `seed`, `output`, tables `[model]`, `[data]`, `[loss]`,
`[ensemble]`, `[augmentation]`, `[laws]`, `[sweep]` and one or more `[[dynamics]]` tables (each a
run on the same models and data). See `configs/quickstart.toml` for a commented example,
README.md for every field and `configs/schema.json` (from `config_schema()`) for editors.

Every value goes through the same checks, sweep points included: each point of a `[sweep]` is
substituted into the config and validated like a hand-written config. Non-finite numbers (inf,
nan) are refused everywhere. pydantic's errors are rewritten into one line that names the field
(`dynamics[0].rtol`), says what is wrong and how to fix it.
"""

import copy
import difflib
import importlib
import importlib.resources
import itertools
import json
import math
import pathlib
import sys
import tomllib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)

from .._validation import INTERVALS, MAX_RTOL, ArgumentError
from .store import NAME_MAX, path_problem


class ConfigError(ArgumentError):
    """A config problem; the message names the field and says how to fix it (an
    `ArgumentError`, like every bad argument of the API)."""


# ----------------------------------------------------------------------------- field helpers


class _Rule:
    """Metadata of a field: the words for its constraint, its type and an example value."""

    def __init__(self, text: str = "", finite: str = "", type_name: str = "", example: str = ""):
        self.text, self.type_name, self.example = text, type_name, example
        self.finite = finite or "must be a finite number" + (
            " " + text.removeprefix("must be ").removeprefix("must lie") if text else "")


def _check(predicate, text):
    def check(v):
        if not predicate(v):
            raise ValueError(text)
        return v
    return AfterValidator(check)


def _num(bound: str, *, type_=float, example: str = "", schema=None):
    """A finite number with a constraint: '>0', '>=0', '(0,1]', '[0,1)', '>=2', 'rtol', 'atol',
    ''. The predicate is the API's (`_validation.INTERVALS`): one rule for both; the words
    and the JSON schema are the config's."""
    texts = {
        ">0": ("must be > 0", {"exclusiveMinimum": 0}),
        ">=0": ("must be ≥ 0", {"minimum": 0}),
        ">=2": ("must be ≥ 2", {"minimum": 2}),
        "(0,1]": ("must lie in (0, 1]", {"exclusiveMinimum": 0, "maximum": 1}),
        "[0,1)": ("must lie in [0, 1)", {"minimum": 0, "exclusiveMaximum": 1}),
        "": ("", {}),
        "rtol": (f"must be > 0 and < {MAX_RTOL:g} (a tolerance of {MAX_RTOL:g} or more cannot "
                 "give a meaningful drift)", {"exclusiveMinimum": 0, "exclusiveMaximum": MAX_RTOL}),
        "atol": (f"must be ≥ 0 and < {MAX_RTOL:g} (0: same as rtol)",
                 {"minimum": 0, "exclusiveMaximum": MAX_RTOL}),
    }
    text, extra = texts[bound]
    predicate = INTERVALS[bound][0]
    return Annotated[type_, _check(lambda v: bool(predicate(v)), text),
                     _Rule(text, example=example),
                     Field(json_schema_extra=extra | (schema or {}))]


def _widths(minimum: int, what: str, example: str):
    def check(v):
        if len(v) < minimum:
            raise ValueError(f"needs at least {minimum} entries ({what})")
        if not all(x > 0 for x in v):
            raise ValueError("entries must be positive")
        return v
    return Annotated[list[int], AfterValidator(check), _Rule(example=example),
                     Field(json_schema_extra={"minItems": minimum,
                                              "items": {"type": "integer", "minimum": 1}})]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _array(v):
    """Nested lists of numbers, rectangular and finite; a flat list is a column."""
    if not isinstance(v, list) or not v:
        raise ValueError("shape")
    if all(_is_number(x) for x in v):
        v = [[float(x)] for x in v]

    def shape(a):
        if _is_number(a):
            if not math.isfinite(a):
                raise ValueError("finite")
            return ()
        if not isinstance(a, list) or not a:
            raise ValueError("shape")
        shapes = {shape(x) for x in a}
        if len(shapes) != 1:
            raise ValueError("shape")
        return (len(a), *shapes.pop())

    if len(shape(v)) < 2:
        raise ValueError("shape")
    return json.loads(json.dumps(v, default=float))  # ints → stay ints; plain lists


def _array_check(v):
    try:
        return _array(v)
    except ValueError as e:
        raise ValueError("must hold finite numbers only" if str(e) == "finite" else
                         "must be a list of numbers or a list of equal-length lists of "
                         "numbers (a matrix; token matrices for attention)") from None


_ARRAY = Annotated[Any, BeforeValidator(_array_check), _Rule(type_name="a matrix"),
                   Field(json_schema_extra={"type": "array"})]
_FACTORY = Annotated[str, _check(lambda v: ":" in v and all(v.split(":", 1)),
                                 'must read "package.module:function"'),
                     _Rule(example='"mypackage.models:make"')]


class _Table(BaseModel):
    """A config table: unknown fields, wrong types and non-finite numbers are refused. Fields
    are read as attributes; `table["field"]` also works (the runner's older dict access)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              validate_default=False)
    _path: ClassVar[str] = ""

    def __getitem__(self, key):
        return getattr(self, key)

    def __contains__(self, key):
        return key in type(self).model_fields

    def get(self, key, default=None):
        return getattr(self, key, default)

    def __eq__(self, other):
        if isinstance(other, dict):
            return self.model_dump() == other
        return super().__eq__(other)


# ----------------------------------------------------------------------------- models

SOLVER_NAMES = ("tsit5", "dopri5", "dopri8", "heun", "kvaerno5", "stabilized", "auto")
GROUP_NAMES = ("cyclic_shift", "permutations", "rotations", "sign_flips", "octahedral",
               "icosahedral", "orthogonal")
LAW_NAMES = ("rowspace", "range_qkv", "ratio_c3", "phase1", "phase2", "phase3")
_INIT_SCALE = _num(">0")


class DeepLinearSpec(_Table):
    kind: Literal["deep_linear"]
    widths: _widths(2, "input and output width", "[16, 32, 32, 8]")
    init_scale: _INIT_SCALE = 1.0


class PolynomialSpec(_Table):
    kind: Literal["polynomial"]
    widths: _widths(3, "input, hidden and output width", "[3, 4, 1]")
    activation: Annotated[str | list[float], _Rule(type_name="a preset name or a list of "
                                                             "numbers")] = "quadratic"
    init_scale: _INIT_SCALE = 1.0


class MLPSpec(_Table):
    kind: Literal["mlp"]
    widths: _widths(3, "input, hidden and output width", "[4, 16, 16, 3]")
    activation: Literal["relu", "leaky_relu", "linear"] = "relu"
    normalize: bool = False  # RMS-normalise layer 1: scale symmetry
    bias: bool = True
    init_scale: _INIT_SCALE = 1.0


class NeuronSpec(_Table):
    kind: Literal["neuron"]
    dim: _num(">0", type_=int, example="2")
    activation: Annotated[str | list[float], _Rule(type_name="a preset name or a list of "
                                                             "numbers")] = "sextic"
    init_scale: _INIT_SCALE = 1.0


class AttentionSpec(_Table):
    kind: Literal["lightning_attention"]
    dim: _num(">0", type_=int, example="8")
    key_dim: _num(">0", type_=int) = 1
    value_dim: _num(">0", type_=int) = 1
    heads: _num(">0", type_=int) = 1
    out_dim: _num(">=0", type_=int) = 0  # 0: no output projection
    decay: _num("(0,1]") = 1.0
    causal: bool = True
    form: Literal["parallel", "tiled", "recurrent"] = "parallel"
    block_size: _num(">0", type_=int) = 64
    init_scale: _INIT_SCALE = 1.0


class SoftmaxAttentionSpec(_Table):
    kind: Literal["softmax_attention"]
    dim: _num(">0", type_=int, example="8")
    key_dim: _num(">0", type_=int) = 2
    value_dim: _num(">0", type_=int) = 2
    heads: _num(">0", type_=int) = 1
    out_dim: _num(">=0", type_=int) = 0  # 0: no output projection
    causal: bool = False
    rotary: bool = False  # rotary position encoding (key_dim even)
    rotary_base: _num(">0") = 10000.0
    init_scale: _INIT_SCALE = 1.0


class FeedForwardSpec(_Table):
    kind: Literal["feed_forward"]
    widths: _widths(3, "input, hidden and output width", "[4, 8, 4]")
    activation: Literal["gelu", "silu", "relu", "linear"] = "gelu"
    gated: bool = False  # W₂(σ(W₁x) ⊙ W₃x): SwiGLU with silu, GeGLU with gelu
    init_scale: _INIT_SCALE = 1.0


class TransformerBlockSpec(_Table):
    kind: Literal["transformer_block"]
    dim: _num(">0", type_=int, example="4")
    blocks: _num(">0", type_=int) = 1  # > 1: a stack of blocks
    heads: _num(">0", type_=int) = 1
    key_dim: _num(">0", type_=int) = 2
    value_dim: _num(">0", type_=int) = 2
    hidden: _num(">0", type_=int) = 8
    activation: Literal["gelu", "silu", "relu", "linear"] = "gelu"
    gated: bool = False
    norm: Literal["layer", "rms", "none"] = "layer"
    causal: bool = True
    rotary: bool = False
    rotary_base: _num(">0") = 10000.0
    init_scale: _INIT_SCALE = 1.0


class PythonModelSpec(_Table):
    """`factory(key, **kwargs)` returns any equinox Module (its inexact arrays are the
    parameters); `input_shape` is the shape of one input (needed for generated data and
    groups). `init_scale` does not apply."""

    kind: Literal["python"]
    factory: _FACTORY
    kwargs: dict[str, Any] = {}
    input_shape: Annotated[list[int], _check(lambda v: v and all(x > 0 for x in v),
                                             "must list positive sizes, e.g. [8]"),
                           _Rule(example="[8]")] = []
    init_scale: _INIT_SCALE = 1.0


MODEL_SPECS = {"deep_linear": DeepLinearSpec, "polynomial": PolynomialSpec, "mlp": MLPSpec,
               "neuron": NeuronSpec, "lightning_attention": AttentionSpec,
               "softmax_attention": SoftmaxAttentionSpec, "feed_forward": FeedForwardSpec,
               "transformer_block": TransformerBlockSpec,
               "python": PythonModelSpec}


class DataSpec(_Table):
    n: _num(">0", type_=int, example="128") | None = None  # generated data: required
    inputs: Literal["gaussian", "whitened", "explicit", "file", "python"] = "gaussian"
    x: _ARRAY | None = None  # inputs = "explicit": one row (token matrix) per sample
    path: str | None = None  # inputs = "file": .npy (x) or .npz (keys x, y), config-relative
    factory: _FACTORY | None = None  # inputs = "python": returns (x, y)
    input_scale: _num(">0") = 1.0
    targets: Literal["teacher", "random", "explicit", "file", "python"] = "teacher"
    y: _ARRAY | None = None  # targets = "explicit": one value or row per sample
    teacher_scale: _num(">0") = 1.0
    noise: _num(">=0") = 0.0
    tokens: _num(">=0", type_=int) = 0  # sequence length, attention models only


class LossSpec(_Table):
    kind: Literal["mse", "log_cosh", "quartic", "cross_entropy"] = "mse"
    moments: Annotated[Literal["auto"] | bool, _Rule(type_name='"auto", true or false')] = "auto"


class EnsembleSpec(_Table):
    size: _num(">0", type_=int) = 1
    init: _ARRAY | None = None  # explicit flat parameter vectors, one per member


class AugmentationSpec(_Table):
    group: Annotated[Literal[GROUP_NAMES], _Rule(example='"cyclic_shift"')]
    order: _num(">=0", type_=int) = 0  # rotations: n of C_n ⊂ SO(2)
    samples: _num(">=0", type_=int) = 0  # orthogonal: 0 = exact, else Monte Carlo
    equivariant: bool = False
    compare: bool = True  # also run every dynamics on the plain data
    mode: Literal["auto", "orbit"] = "auto"  # orbit: expand the data


class LawsSpec(_Table):
    architecture: bool = True  # the model's own laws
    augmentation: bool = True  # laws derived from (model, augmentation group)
    extra: list[Literal[LAW_NAMES]] = []  # candidate laws to monitor anyway
    # Find the translation/scale/rescale laws numerically (`conservation.find_symmetries`):
    # default on for `kind = "python"` models, which declare no laws of their own.
    discover: bool | None = None


class ObservablesSpec(_Table):
    """`[observables]`: observables of (θ, data) saved per member like the drifts."""

    sharpness: _num(">=0", type_=int) = 0  # k top Hessian eigenvalues (0: none)
    gradient_norm: bool = False
    kernel_distance: bool = False  # NTK distance from θ₀ on the first `kernel_probe` inputs
    kernel_probe: _num(">0", type_=int) = 16


class _DynamicsBase(_Table):
    label: str = ""
    # None: every step of a discrete run of ≤ 1000 steps, else 101 saves (the runner decides).
    n_save: _num(">=2", type_=int) | None = None
    divergence: _num(">0") = 1e8
    # A loss goal: each member stops once its loss is ≤ this (status `reached_loss`).
    stop_at_loss: _num(">0") | None = None
    # `conservation run` integrates the entry in this many equal segments, saving its state
    # after each (<file>.partial.npz): a run stopped part-way resumes from its last segment.
    checkpoints: _num(">0", type_=int) = 1


class _FlowBase(_DynamicsBase):
    t1: _num(">0", example="50.0")
    solver: Literal[SOLVER_NAMES] = "auto"
    rtol: _num("rtol") = 1e-8
    atol: _num("atol") = 0.0  # 0: same as rtol
    max_steps: _num(">0", type_=int) = 100_000
    weight_decay: _num(">=0") = 0.0


class FlowSpec(_FlowBase):
    kind: Literal["flow"]


class ModifiedFlowSpec(_FlowBase):
    """The modified equation of GD / heavy ball at learning rate `lr` (time t = lr · step)."""

    kind: Literal["modified_flow"]
    lr: _num(">0", example="0.05")
    momentum: _num("[0,1)") = 0.0


class MomentumFlowSpec(_FlowBase):
    """The heavy-ball ODE μθ̈ + θ̇ = −∇L − λθ (`MomentumField`), from v₀ = −c(∇L + λθ₀)."""

    kind: Literal["momentum_flow"]
    mass: _num(">0", example="0.5")
    start_velocity: _num(">=0") = 0.0


class NesterovFlowSpec(_FlowBase):
    """Nesterov's ODE θ̈ + (3/τ)θ̇ + ∇L + λθ = 0 from τ = start_time (`NesterovField`)."""

    kind: Literal["nesterov_flow"]
    start_time: _num(">0") = 1.0
    start_velocity: _num(">=0") = 0.0


class SignFlowSpec(_FlowBase):
    """Sign-gradient flow dθ/dt = −sign(∇L + λθ) (`SignField`; `smoothing` ε > 0: g/√(g²+ε²))."""

    kind: Literal["sign_flow"]
    smoothing: _num(">=0") = 0.0


class CentralFlowSpec(_FlowBase):
    """The central flow of GD at learning rate `lr` (edge of stability; `CentralFlowField`)."""

    kind: Literal["central_flow"]
    lr: _num(">0", example="0.05")
    k: _num(">0", type_=int) = 1  # top eigenvalues that may sit at 2/lr
    relaxation: _num(">0") = 2.0


class _OptimizerBase(_DynamicsBase):
    lr: _num(">0", example="0.01")
    steps: _num(">0", type_=int, example="1000")
    weight_decay: _num(">=0") = 0.0


class GDSpec(_OptimizerBase):
    kind: Literal["gd"]


class SGDSpec(_OptimizerBase):
    kind: Literal["sgd"]
    batch_size: _num(">0", type_=int, example="16")


class MomentumSpec(_OptimizerBase):
    kind: Literal["momentum"]
    momentum: _num("[0,1)") = 0.9
    batch_size: _num(">=0", type_=int) = 0


class AdamSpec(_OptimizerBase):
    kind: Literal["adam"]
    batch_size: _num(">=0", type_=int) = 0


DYNAMICS_SPECS = {"flow": FlowSpec, "modified_flow": ModifiedFlowSpec, "gd": GDSpec,
                  "sgd": SGDSpec, "momentum": MomentumSpec, "adam": AdamSpec,
                  "momentum_flow": MomentumFlowSpec, "nesterov_flow": NesterovFlowSpec,
                  "sign_flow": SignFlowSpec, "central_flow": CentralFlowSpec}
FLOW_KINDS = ("flow", "modified_flow", "momentum_flow", "nesterov_flow", "sign_flow",
              "central_flow")
# Second-order flows: their state is (θ, v) (a checkpoint keeps the velocity too), and they
# also monitor the model's phase-space laws (`phase_space_laws`).
PHASE_FLOW_KINDS = ("momentum_flow", "nesterov_flow")


class _Top(_Table):
    name: str = ""
    seed: int = 0
    output: str = ""


# Sweep axes: name → (where the value goes, how the runner treats it).
#   "member": per-member value of one compiled program (seeds, init scales, optax
#             hyperparameters); "call": a traced scalar of the flow, one call of the same
#             program per value; "static": a new build (shapes, losses, groups, data), one
#             compile per group of equal static values.
AXES = {
    "seed": (("seed",), "member"),
    "init_scale": (("model", "init_scale"), "member"),
    "lr": (("dynamics", "lr"), "member"),
    "weight_decay": (("dynamics", "weight_decay"), "member"),
    "momentum": (("dynamics", "momentum"), "member"),
    "rtol": (("dynamics", "rtol"), "call"),
    "atol": (("dynamics", "atol"), "call"),
    "t1": (("dynamics", "t1"), "call"),
    "solver": (("dynamics", "solver"), "static"),
    "widths": (("model", "widths"), "static"),
    "loss": (("loss", "kind"), "static"),
    "group": (("augmentation", "group"), "static"),
    "samples": (("augmentation", "samples"), "static"),
    "n": (("data", "n"), "static"),
    "noise": (("data", "noise"), "static"),
}
SWEEP_OPTIONS = ("chunk", "devices")


class SweepSpec(_Table):
    """Axes in the order written (that order fixes the points), plus `chunk` and `devices`."""

    axes: dict[str, list[Any]]
    chunk: int = 0
    devices: int = 0


class Config(_Table):
    """A validated run config: typed tables with every default filled in."""

    model_config = ConfigDict(extra="forbid", frozen=False, arbitrary_types_allowed=True)

    name: str
    seed: int
    output: str
    model: (DeepLinearSpec | PolynomialSpec | MLPSpec | NeuronSpec | AttentionSpec
            | SoftmaxAttentionSpec | FeedForwardSpec | TransformerBlockSpec | PythonModelSpec)
    data: DataSpec
    loss: LossSpec
    ensemble: EnsembleSpec
    augmentation: AugmentationSpec | None
    laws: LawsSpec
    sweep: SweepSpec | None
    dynamics: tuple[FlowSpec | ModifiedFlowSpec | GDSpec | SGDSpec | MomentumSpec | AdamSpec
                    | MomentumFlowSpec | NesterovFlowSpec | SignFlowSpec | CentralFlowSpec, ...]
    base: str = ""  # the config file's folder: relative data paths are read from there
    observables: ObservablesSpec | None = None
    _raw: dict = PrivateAttr(default_factory=dict)

    def __eq__(self, other):
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """The resolved config as plain JSON values (stored in summary.json / sweep.json)."""
        # A config without `[observables]` resolves as before the table existed.
        out = self.model_dump(mode="json", exclude={"base"} if self.observables is not None
                              else {"base", "observables"})
        out["dynamics"] = list(out["dynamics"])
        return out

    def at(self, point: dict) -> "Config":
        """The config of one sweep point: the point's values substituted and validated."""
        return _point_config(self._raw, point, self.name, self.base)

    def ignored(self, command: str) -> list[str]:
        """What `command` ("run" or "sweep") ignores in this config, as sentences."""
        if command == "run" and self.sweep is not None:
            return ["`[sweep]` is ignored by `conservation run`; use `conservation sweep`."]
        if command == "sweep" and (self.ensemble.size != 1 or self.ensemble.init is not None):
            return ["`[ensemble]` is ignored by `conservation sweep`: each point is one "
                    "member (sweep `seed` for several initialisations)."]
        return []


# ----------------------------------------------------------------------------- errors


def _rule(cls, name) -> _Rule:
    field = cls.model_fields.get(name)
    metadata = list(field.metadata) if field else []
    annotation = field.annotation if field else None
    for m in metadata:
        if isinstance(m, _Rule):
            return m
    for arg in getattr(annotation, "__args__", ()):  # Optional[Annotated[...]]
        for m in getattr(arg, "__metadata__", ()):
            if isinstance(m, _Rule):
                return m
    return _Rule()


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "boolean": "true or false",
               "string": "a string", "object": "a table"}
_LIST_NAMES = {"integer": "a list of integers", "number": "a list of numbers",
               "string": "a list of strings"}


def _type_name(cls, name) -> str:
    """How to describe the type of field `name` of table `cls` in an error ("an integer")."""
    rule = _rule(cls, name)
    if rule.type_name:
        return rule.type_name
    schema = cls.model_json_schema()["properties"][name]
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    option = options[0] if options else {}
    if option.get("type") == "array":
        return _LIST_NAMES.get(option.get("items", {}).get("type"), "a list")
    return _TYPE_NAMES.get(option.get("type"), "a value of the documented type")


def _first(errors):
    # Unknown fields first (a typo explains everything after it), then in field order.
    return sorted(errors, key=lambda e: e["type"] != "extra_forbidden")[0]


def _message(error, table: dict, path: str, cls) -> str:
    loc, kind = error["loc"], error["type"]
    if not loc:
        return str(error.get("ctx", {}).get("error", error["msg"]))
    name = str(loc[0])
    full = f"{path}.{name}" if path else name
    value = table.get(name) if isinstance(table, dict) else None
    if kind == "extra_forbidden":
        near = difflib.get_close_matches(name, list(cls.model_fields), n=1)
        hint = f" Did you mean `{path}.{near[0]}`?" if near else (
            f" Known fields: {', '.join(sorted(cls.model_fields))}.")
        return f"unknown field `{full}`.{hint}"
    rule = _rule(cls, name)
    if kind == "missing":
        example = f" For example: {name} = {rule.example}" if rule.example else ""
        return f"missing field `{full}`.{example}"
    if kind == "finite_number":
        return f"field `{full}` {rule.finite}, got {value!r}."
    if kind == "value_error":
        return f"field `{full}` {error['ctx']['error']}, got {value!r}."
    if kind == "literal_error" and not rule.type_name and not (
            len(loc) > 1 and isinstance(loc[1], int)):
        return f"field `{full}` must be one of {error['ctx']['expected'].replace(' or ', ', ')}" \
               f", got {value!r}."
    if kind == "literal_error" and len(loc) > 1 and isinstance(loc[1], int):  # a list entry
        noun = "law" if full == "laws.extra" else "value"
        return (f"unknown {noun} {error['input']!r} in `{full}`; choose from "
                f"{error['ctx']['expected'].replace(' or ', ', ')}.")
    return f"field `{full}` must be {_type_name(cls, name)}, got {value!r}."


def _validate(cls, table, path: str):
    if not isinstance(table, dict):
        raise ConfigError(f"`{path}` must be a table, e.g. [{path}].")
    try:
        return cls.model_validate(table)
    except ValidationError as e:
        raise ConfigError(_message(_first(e.errors()), table, path, cls)) from None


def _kind_table(table, path, specs):
    if not isinstance(table, dict):
        raise ConfigError(f"`{path}` must be a table.")
    if "kind" not in table:
        raise ConfigError(f"missing field `{path}.kind`; choose one of {', '.join(specs)}.")
    kind = table["kind"]
    if not isinstance(kind, str) or kind not in specs:
        near = difflib.get_close_matches(str(kind), specs, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown `{path}.kind` = {kind!r}; choose one of {', '.join(specs)}.{hint}")
    return _validate(specs[kind], table, path)


# ----------------------------------------------------------------------------- parsing

SECTIONS = ("model", "data", "loss", "ensemble", "augmentation", "laws", "sweep", "dynamics",
            "observables")


def parse_config(raw: dict, *, default_name: str = "run", base: str | pathlib.Path = ".") \
        -> Config:
    """Validate a config dictionary (as parsed from TOML) and fill in defaults. `base` is the
    folder relative data paths are read from (the config file's folder)."""
    if not isinstance(raw, dict):
        raise ConfigError("a config is a TOML table of fields and sections.")
    config = _parse(raw, default_name, str(base))
    if config.sweep is not None:
        for point in sweep_point_dicts(config.sweep.axes):
            _point_config(raw, point, config.name, str(base))
    return config


def _parse(raw: dict, default_name: str, base: str) -> Config:
    top = _validate(_Top, {k: v for k, v in raw.items() if k not in SECTIONS}, "config")
    for section in ("model", "data", "dynamics"):
        if section not in raw:
            raise ConfigError(f"missing section `[{section}]`" + (
                " (write [[dynamics]] for each run)." if section == "dynamics" else "."))
    model = _kind_table(raw["model"], "model", MODEL_SPECS)
    data = _validate(DataSpec, raw["data"], "data")
    loss = _validate(LossSpec, raw.get("loss", {}), "loss")
    ensemble = _validate(EnsembleSpec, raw.get("ensemble", {}), "ensemble")
    augmentation = (_validate(AugmentationSpec, raw["augmentation"], "augmentation")
                    if "augmentation" in raw else None)
    laws = _validate(LawsSpec, raw.get("laws", {}), "laws")
    observables = (_validate(ObservablesSpec, raw["observables"], "observables")
                   if "observables" in raw else None)
    runs = raw["dynamics"]
    runs = [runs] if isinstance(runs, dict) else runs
    if not isinstance(runs, list) or not runs:
        raise ConfigError("`dynamics` must hold at least one [[dynamics]] table.")
    dynamics = []
    for i, table in enumerate(runs):
        run = _kind_table(table, f"dynamics[{i}]", DYNAMICS_SPECS)
        dynamics.append(run.model_copy(update={"label": run.label or _default_label(run)}))
    labels = [run.label for run in dynamics]
    for i, label in enumerate(labels):
        _check_label(label, i)
        if labels.index(label) != i:
            raise ConfigError(f"`dynamics[{i}].label` = {label!r} is used twice; labels name the "
                              "output files, so give each run its own `label`.")
    name = top.name or default_name
    _check_name(name, given=bool(top.name))
    _check_output(top.output)
    _check_data_source(data, model, base)
    _check_consistency(model, data, loss, dynamics)
    sweep = _read_sweep(raw["sweep"], dynamics, model, augmentation) if "sweep" in raw else None
    _check_explicit(model, data, ensemble)
    if augmentation is not None:
        _check_augmentation(augmentation, model, loss)
    config = Config.model_construct(
        name=name, seed=top.seed, output=top.output or f"results/{name}", model=model,
        data=data, loss=loss, ensemble=ensemble, augmentation=augmentation, laws=laws,
        sweep=sweep, dynamics=tuple(dynamics), base=base, observables=observables)
    _check_observables(observables, dynamics)
    config._raw = raw
    return config


# A label names its run's file, `<i>-<label>.npz` (" · plain"/" · augmented" appended with
# [augmentation]); this many characters keep that name under the file systems' NAME_MAX.
LABEL_MAX = 200


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "…"


def _check_name(name: str, *, given: bool) -> None:
    """`name` is a plain file name: it names the default output folder, results/<name>."""
    field = "field `name`" if given else f"the config file's name {name!r} (the default `name`)"
    if name in (".", "..") or any(c in name for c in "/\\\0") or not name.strip():
        raise ConfigError(f"{field} must be a plain file name (it names the output folder "
                          f"results/<name>): no '/', '\\', NUL, not '.' or '..', not blank; got "
                          f"{_short(name)}. Set e.g. name = \"run1\", and `output` for "
                          "another folder.")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        raise ConfigError(f"{field} is {size} bytes long; it names the output folder, and a "
                          f"file-system name holds at most {NAME_MAX} bytes: shorten it (got "
                          f"{_short(name)}).")


def _check_output(output: str) -> None:
    problem = path_problem(output) if output else None
    if problem is not None:
        raise ConfigError(f"field `output` = {_short(output)} cannot be a folder: {problem}; "
                          "choose a shorter path.")


def _check_label(label: str, i: int) -> None:
    if len(label) > LABEL_MAX or "\0" in label:
        raise ConfigError(f"field `dynamics[{i}].label` ({len(label)} characters, "
                          f"{_short(label)}) names the run's file <i>-<label>.npz: use at most "
                          f"{LABEL_MAX} characters and no NUL.")


def _default_label(run):
    if run.kind == "flow":
        return f"flow (rtol {run.rtol:g})"
    if run.kind == "modified_flow":
        return f"modified flow (lr {run.lr:g})"
    if run.kind == "momentum_flow":
        return f"momentum flow (mass {run.mass:g})"
    if run.kind in ("nesterov_flow", "sign_flow"):
        return run.kind.replace("_", " ")
    return f"{run.kind} (lr {run.lr:g})"


def _read_sweep(table, dynamics, model, augmentation) -> SweepSpec:
    if not isinstance(table, dict):
        raise ConfigError("`sweep` must be a table, e.g. [sweep].")
    axes, options = {}, {"chunk": 0, "devices": 0}
    for key, values in table.items():
        if key in options:
            if not isinstance(values, int) or isinstance(values, bool) or values < 0:
                raise ConfigError(f"field `sweep.{key}` must be an integer ≥ 0, got {values!r}.")
            options[key] = values
            continue
        if key not in AXES:
            near = difflib.get_close_matches(key, list(AXES) + list(options), n=1)
            hint = f" Did you mean `sweep.{near[0]}`?" if near else (
                f" Axes: {', '.join(AXES)}; options: chunk, devices.")
            raise ConfigError(f"unknown field `sweep.{key}`.{hint}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axis `sweep.{key}` must be a non-empty list of values.")
        if key == "seed" and not all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in values):
            raise ConfigError("axis `sweep.seed` must list an integer values, e.g. "
                              "seed = [0, 1, 2].")
        if len({json.dumps(v, sort_keys=True, default=repr) for v in values}) != len(values):
            raise ConfigError(f"axis `sweep.{key}` lists a value twice; each point must differ.")
        axes[key] = values
    if not axes:
        raise ConfigError("`sweep` needs at least one axis, e.g. lr = [0.01, 0.02].")
    if len(dynamics) != 1:
        raise ConfigError(f"`dynamics` holds {len(dynamics)} entries; a sweep runs exactly one "
                          "[[dynamics]] entry (write one config per dynamics).")
    run = dynamics[0]
    if run.checkpoints != 1:
        raise ConfigError("field `dynamics[0].checkpoints` applies to `conservation run`; a "
                          "sweep saves each point as it finishes (and `--worker`s resume the "
                          "rest): remove it.")
    for key in axes:
        where = AXES[key][0]
        if where[0] == "dynamics" and where[1] not in run:
            raise ConfigError(f"axis `sweep.{key}` does not apply to `dynamics[0].kind` = "
                              f"{run.kind!r}.")
        if where[0] == "model" and where[1] not in model:
            raise ConfigError(f"axis `sweep.{key}` does not apply to {model.kind!r} models.")
        if where[0] == "augmentation" and augmentation is None:
            raise ConfigError(f"axis `sweep.{key}` needs an [augmentation] table.")
    for w in axes.get("widths", []):
        if not isinstance(w, list) or len(w) != len(model.widths) or w[0] != model.widths[0]:
            raise ConfigError(f"axis `sweep.widths` entry {w} must keep the depth and input "
                              f"width of `model.widths` = {model.widths}.")
    return SweepSpec.model_construct(axes=axes, **options)


def sweep_point_dicts(axes: dict) -> list[dict]:
    """Every point of a sweep (cartesian product of the axes, in a fixed order)."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _point_config(raw: dict, point: dict, name: str, base: str) -> Config:
    """Substitute a sweep point into the raw config and validate the result in full."""
    raw = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
    raw["name"] = name
    for key, value in point.items():
        where = AXES[key][0]
        if where == ("seed",):
            raw["seed"] = value
            continue
        section, field = where
        if section == "dynamics":
            runs = raw["dynamics"] if isinstance(raw["dynamics"], list) else [raw["dynamics"]]
            runs[0][field] = value
            raw["dynamics"] = runs
        else:
            raw.setdefault(section, {})[field] = value
    try:
        return _parse(raw, name, base)
    except ConfigError as e:
        text = ", ".join(f"{k} = {json.dumps(v, default=str)}" for k, v in point.items())
        raise ConfigError(f"sweep point ({text}): {e}") from None


# ----------------------------------------------------------------------------- consistency


def input_dim(model) -> int:
    """The size of the input axis a group acts on, for a validated `[model]` table."""
    if model.kind == "python":
        return model.input_shape[-1] if model.input_shape else 0
    return model.widths[0] if "widths" in model else model.dim


def _check_data_source(data, model, base):
    if data.inputs in ("gaussian", "whitened") and data.n is None:
        raise ConfigError("missing field `data.n`. For example: n = 128")
    if data.inputs != "file" and data.path is not None:
        raise ConfigError("`data.path` needs `data.inputs` = 'file'.")
    if data.inputs != "python" and data.factory is not None:
        raise ConfigError("`data.factory` needs `data.inputs` = 'python'.")
    if data.inputs == "file":
        if data.path is None:
            raise ConfigError('`data.inputs` = \'file\' needs `data.path`, e.g. path = "x.npz".')
        path = pathlib.Path(base) / data.path
        if path.suffix not in (".npy", ".npz"):
            raise ConfigError(f"field `data.path` must name a .npy or .npz file, got "
                              f"{data.path!r}.")
        try:
            exists = path.is_file()
        except (OSError, ValueError):  # e.g. a NUL byte in the name
            exists = False
        if not exists:
            raise ConfigError(f"field `data.path`: file {str(path)!r} does not exist (paths are "
                              "relative to the config file's folder).")
    if data.inputs == "python" and data.factory is None:
        raise ConfigError('`data.inputs` = \'python\' needs `data.factory`, e.g. '
                          'factory = "mypackage.data:load".')
    if data.inputs == "python":
        resolve_factory(data.factory, "data.factory", base)
    for source in ("file", "python"):
        if data.targets == source and data.inputs != source:
            raise ConfigError(f"`data.targets` = {source!r} needs `data.inputs` = {source!r} "
                              "(x and y come from the same source).")
    if data.inputs == "file" and data.targets == "file" and pathlib.Path(data.path).suffix \
            != ".npz":
        raise ConfigError("`data.targets` = 'file' needs an .npz `data.path` with keys x and y.")
    if model.kind == "python":
        resolve_factory(model.factory, "model.factory", base)
        if data.inputs in ("gaussian", "whitened") and not model.input_shape:
            raise ConfigError("`model.input_shape` is required for python models with "
                              "generated data, e.g. input_shape = [8].")


def resolve_factory(spec: str, field: str, base: str | pathlib.Path | None = None):
    """Import `package.module:function`; errors name `field`.

    `base` (the config file's folder) is appended to `sys.path` first (and stays there, as a
    script's folder does), so a factory module lying beside the config is found without
    PYTHONPATH; an installed module of the same name takes precedence."""
    module_name, _, attribute = spec.partition(":")
    folder = None
    if base is not None:
        folder = str(pathlib.Path(base).resolve())
        if folder not in sys.path:
            sys.path.append(folder)
            importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        beside = f"in the config's folder {folder} nor " if folder else ""
        raise ConfigError(f"field `{field}`: cannot import module {module_name!r} ({e}): it is "
                          f"neither {beside}on PYTHONPATH; check the name, or put the module "
                          "beside the config file.") from None
    except Exception as e:  # a module that fails while importing: the user's code
        raise ConfigError(f"field `{field}`: importing {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from None
    if not hasattr(module, attribute):
        where = getattr(module, "__file__", None)
        raise ConfigError(f"field `{field}`: module {module_name!r} has no attribute "
                          f"{attribute!r}" + (f" (the module read is {where})." if where else "."))
    function = getattr(module, attribute)
    if not callable(function):
        raise ConfigError(f"field `{field}`: {spec!r} is not callable.")
    return function


def _check_consistency(model, data, loss, dynamics):
    attention = model.kind in ("lightning_attention", "softmax_attention", "transformer_block")
    if attention and data.tokens < 1 and data.inputs in ("gaussian", "whitened"):
        raise ConfigError("`data.tokens` (sequence length) is required for attention models, "
                          "e.g. tokens = 5.")
    if not attention and data.tokens:
        raise ConfigError("`data.tokens` only applies to attention models; remove it.")
    if attention and data.inputs == "whitened":
        raise ConfigError("`data.inputs` = 'whitened' is for vector inputs; use 'gaussian' for "
                          "attention models.")
    if attention and not model.causal and model.get("decay", 1.0) != 1.0:
        raise ConfigError("`model.decay` must be 1.0 when `model.causal` = false.")
    if model.get("rotary", False) and model.key_dim % 2:
        raise ConfigError(f"`model.rotary` = true needs an even `model.key_dim` (RoPE rotates "
                          f"pairs of coordinates), got {model.key_dim}.")
    if model.kind in ("polynomial", "neuron") and isinstance(model.activation, str):
        from .._models.polynomial import ACTIVATIONS
        if model.activation not in ACTIVATIONS:
            raise ConfigError(f"field `model.activation` must be one of {sorted(ACTIVATIONS)} "
                              f"or a list of coefficients, got {model.activation!r}.")
    if model.kind in ("polynomial", "neuron") and isinstance(model.activation, list) and not \
            model.activation:
        raise ConfigError("field `model.activation` needs at least one coefficient.")
    if data.inputs == "whitened" and data.n < input_dim(model):
        raise ConfigError(f"`data.n` = {data.n} is below the input width "
                          f"{input_dim(model)}: whitened inputs need n ≥ input width.")
    if loss.moments is True and loss.kind != "mse":
        raise ConfigError("`loss.moments` = true needs `loss.kind` = 'mse' (the fast path is "
                          "exact only for MSE); use \"auto\".")
    if loss.moments is True and model.kind in ("mlp", "python", "softmax_attention",
                                               "feed_forward", "transformer_block"):
        raise ConfigError(f"`loss.moments` = true needs a tensorizable model; {model.kind!r} "
                          "models are evaluated per sample: use \"auto\".")
    for i, run in enumerate(dynamics):
        if data.n is not None and run.get("batch_size", 0) > data.n:
            raise ConfigError(f"`dynamics[{i}].batch_size` = {run.batch_size} exceeds "
                              f"`data.n` = {data.n}.")
        if run.kind in FLOW_KINDS and run.solver == "heun" and run.max_steps < 2:
            raise ConfigError(f"field `dynamics[{i}].max_steps` must be ≥ 2 for 'heun'.")
        _check_checkpoints(run, i)


def default_n_save(run) -> int:
    """`n_save` of a `[[dynamics]]` entry: the config's value if given, else every step for
    discrete runs of ≤ 1000 steps (so step 1 is never skipped) and 101 otherwise."""
    n_save = run.get("n_save")
    if n_save is not None:
        return n_save
    steps = run.get("steps")
    return steps + 1 if steps is not None and steps <= 1000 else 101


def _check_observables(observables, dynamics) -> None:
    """The kernel distance compares with θ₀, which a run continued from a checkpoint no
    longer has."""
    if observables is None or not observables.kernel_distance:
        return
    for i, run in enumerate(dynamics):
        if run.checkpoints > 1:
            raise ConfigError(
                f"`observables.kernel_distance` compares with the start of the run, but "
                f"`dynamics[{i}].checkpoints` = {run.checkpoints} continues it in segments; "
                "set checkpoints = 1 or kernel_distance = false.")


def _check_checkpoints(run, i: int) -> None:
    """Segments end on save points (and on whole steps): the segmented run saves where the
    whole run would."""
    n = run.get("checkpoints", 1)
    if n == 1:
        return
    saves = default_n_save(run) - 1
    steps = run.get("steps")
    if saves % n or (steps is not None and steps % n):
        what = f"`n_save` − 1 = {saves}" + ("" if steps is None else f" and `steps` = {steps}")
        common = math.gcd(saves, steps or saves)
        near = max(d for d in range(1, min(n, common) + 1) if common % d == 0)
        raise ConfigError(f"field `dynamics[{i}].checkpoints` = {n} must divide {what}, so that "
                          f"every segment ends on a save point; e.g. checkpoints = {near}"
                          + ("" if steps is not None else f", or n_save = {n * 10 + 1}") + ".")


def _check_explicit(model, data, ensemble):
    if (data.inputs == "explicit") != (data.x is not None):
        raise ConfigError("`data.x` and `data.inputs` = 'explicit' go together: give both or "
                          "neither.")
    if (data.targets == "explicit") != (data.y is not None):
        raise ConfigError("`data.y` and `data.targets` = 'explicit' go together: give both or "
                          "neither.")
    if data.x is not None:
        shape = _shape(data.x)
        if model.kind in ("lightning_attention", "softmax_attention", "transformer_block"):
            if len(shape) != 3 or shape[2] != model.dim:
                raise ConfigError(f"`data.x` for attention models holds one token matrix per "
                                  f"sample, shape (n, tokens, {model.dim}); got shape {shape}.")
            if data.tokens and shape[1] != data.tokens:
                raise ConfigError(f"`data.x` token matrices have {shape[1]} rows but "
                                  f"`data.tokens` = {data.tokens}.")
        elif model.kind != "python":
            if len(shape) != 2:
                raise ConfigError(f"`data.x` must have one row per sample, got shape {shape}.")
            if shape[1] != input_dim(model):
                raise ConfigError(f"`data.x` rows have {shape[1]} entries but the model's "
                                  f"input dimension is {input_dim(model)}.")
        if data.n is not None and shape[0] != data.n:
            raise ConfigError(f"`data.x` has {shape[0]} rows but `data.n` = {data.n}.")
    if data.y is not None:
        if data.x is None:
            raise ConfigError("explicit `data.y` needs explicit `data.x`.")
        if len(data.y) != len(data.x):
            raise ConfigError(f"`data.y` has {len(data.y)} rows but `data.x` has "
                              f"{len(data.x)}.")
    if ensemble.init is not None:
        shape = _shape(ensemble.init)
        if len(shape) != 2:
            raise ConfigError(f"`ensemble.init` must be one flat parameter vector per member, "
                              f"got shape {shape}.")
        if shape[0] != ensemble.size:
            raise ConfigError(f"`ensemble.init` has {shape[0]} rows but "
                              f"`ensemble.size` = {ensemble.size}.")


def _shape(a) -> tuple[int, ...]:
    shape = []
    while isinstance(a, list):
        shape.append(len(a))
        a = a[0]
    return tuple(shape)


def _check_augmentation(augmentation, model, loss):
    group, d = augmentation.group, input_dim(model)
    exact_orthogonal = group == "orthogonal" and not augmentation.samples
    if exact_orthogonal and loss.kind != "mse":
        raise ConfigError(f"exact O(d) augmentation symmetrises MSE moments; with "
                          f"`loss.kind` = {loss.kind!r} set `augmentation.samples` (Monte "
                          "Carlo) instead.")
    if augmentation.equivariant and model.kind != "deep_linear":
        raise ConfigError("`augmentation.equivariant` = true is supported for deep_linear models.")
    if augmentation.equivariant and model.widths[-1] != d:
        raise ConfigError(f"`augmentation.equivariant` = true needs output width = input width "
                          f"({d}), got {model.widths[-1]}.")
    if model.kind == "python" and not d:
        raise ConfigError("`model.input_shape` is required with [augmentation] for python "
                          "models (the group acts on its last axis).")
    if group == "rotations":
        if d != 2:
            raise ConfigError(f"`augmentation.group` = 'rotations' acts on R², but the model's "
                              f"input dimension is {d}.")
        if augmentation.order < 1:
            raise ConfigError("`augmentation.order` (n of C_n) is required for 'rotations', "
                              "e.g. order = 18.")
    elif augmentation.order:
        raise ConfigError(f"`augmentation.order` only applies to 'rotations'; {group!r} acts on "
                          f"all {d} input coordinates.")
    if group in ("octahedral", "icosahedral") and d != 3:
        raise ConfigError(f"`augmentation.group` = {group!r} acts on R³, but the model's input "
                          f"dimension is {d}.")
    if group == "permutations" and d > 8:
        raise ConfigError(f"`augmentation.group` = 'permutations' on {d} coordinates has {d}! "
                          "elements; use d ≤ 8 or 'cyclic_shift'.")
    if group == "sign_flips" and d > 12:
        raise ConfigError(f"`augmentation.group` = 'sign_flips' on {d} coordinates has 2^{d} "
                          "elements; use d ≤ 12.")
    if augmentation.samples and group != "orthogonal":
        raise ConfigError("`augmentation.samples` only applies to 'orthogonal'.")
    if augmentation.samples % 2:
        raise ConfigError("`augmentation.samples` must be even (each g is used with −g).")
    if augmentation.mode == "orbit" and exact_orthogonal:
        raise ConfigError("`augmentation.mode` = 'orbit' needs finitely many group elements: "
                          "set `augmentation.samples` for 'orthogonal'.")


# ----------------------------------------------------------------------------- files, schema


def load_config(path: str | pathlib.Path | None = None) -> Config:
    """Read and validate a TOML config; `None` loads the embedded quickstart config."""
    if path is None:
        text = importlib.resources.files("conservation").joinpath(
            "configs/quickstart.toml").read_text()
        name, base = "quickstart", "."
    else:
        path = pathlib.Path(path)
        try:
            exists = path.is_file()
        except (OSError, ValueError):  # e.g. a NUL byte in the name
            exists = False
        if not exists:
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        text, name, base = path.read_text(), path.stem, str(path.parent)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path or 'quickstart'}: not valid TOML: {e}") from None
    return parse_config(raw, default_name=name, base=base)


def config_schema() -> dict:
    """A JSON Schema of the TOML config (for editors: taplo / Even Better TOML read
    `#:schema ./schema.json` at the top of a config)."""
    from pydantic import create_model
    sweep = {"type": "object", "additionalProperties": False, "properties": {
        "chunk": {"type": "integer", "minimum": 0}, "devices": {"type": "integer", "minimum": 0},
        **{k: {"type": "array", "minItems": 1} for k in AXES}}}
    models = Annotated[DeepLinearSpec | PolynomialSpec | MLPSpec | NeuronSpec | AttentionSpec
                       | SoftmaxAttentionSpec | FeedForwardSpec | TransformerBlockSpec
                       | PythonModelSpec, Field(discriminator="kind")]
    runs = Annotated[FlowSpec | ModifiedFlowSpec | GDSpec | SGDSpec | MomentumSpec | AdamSpec
                     | MomentumFlowSpec | NesterovFlowSpec | SignFlowSpec | CentralFlowSpec,
                     Field(discriminator="kind")]
    top = create_model(
        "ConservationConfig", __base__=_Top, model=(models, ...), data=(DataSpec, ...),
        loss=(LossSpec, None), ensemble=(EnsembleSpec, None),
        augmentation=(AugmentationSpec, None), laws=(LawsSpec, None),
        observables=(ObservablesSpec, None),
        dynamics=(list[runs], ...))
    schema = top.model_json_schema()
    schema["properties"]["sweep"] = sweep
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
