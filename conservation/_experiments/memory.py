"""Memory estimate of a config's run, checked before anything is allocated or compiled.

The run itself is sized by `conservation._memory.run_estimate`, the function `gradient_flow`
and `train` check themselves with (members × parameters × solver or optimizer copies, the
lanes' solver state, the saved values), here from the `[model]` table alone; to it come the
parts a config builds before any run: the teacher, the data (orbit-expanded in `orbit` mode)
and the moment path's matrices, sized by the exact feature count p of the model (rows × p
features per sample: a deep polynomial net's p is Σ d^k over every degree k its output
reaches, 5⁸ for widths [5, 7, 7, 7, 3] with a quadratic σ). The gradient's working set is
not known before the objective exists: `gradient_flow` / `train` measure it and check again
when they start. Available memory: `conservation._memory.available_memory` (the device's free
memory, else the host's MemAvailable or the room under `ulimit -v`).
"""

import math

import jax

from .._memory import (
    BYTES,
    FLOW_RESIDENT_COPIES,
    TRAIN_STEP_COPIES,
    InsufficientMemory,
    MemoryEstimate,
    check,
    free_device_memory,
    gb,
    moments_bytes,
    run_estimate,
    tree_bytes,
)
from .config import FLOW_KINDS, PHASE_FLOW_KINDS, ConfigError, input_dim

__all__ = ["MemoryEstimate", "MemoryConfigError", "parameter_count", "feature_shape",
           "law_entries", "phase_law_entries", "state_size", "estimate", "check_memory"]

_gb = gb  # the name older code imports


class MemoryConfigError(ConfigError, InsufficientMemory):
    """A config whose run does not fit in the available memory (a `ConfigError` and an
    `InsufficientMemory`)."""


def parameter_count(model) -> int:
    """Trainable parameters of one member of a validated `[model]` table (python models: 0,
    they are measured after their factory runs)."""
    kind = model.kind
    if kind in ("deep_linear", "polynomial", "mlp"):
        w = model.widths
        count = sum(a * b for a, b in zip(w[:-1], w[1:]))
        if kind == "mlp" and getattr(model, "bias", True):
            count += sum(w[1:])
        return count
    if kind == "neuron":
        return model.dim
    if kind == "lightning_attention":
        h, d = model.heads, model.dim
        return h * d * (2 * model.key_dim + model.value_dim) + model.out_dim * h * model.value_dim
    return 0


def _degrees(model) -> tuple[int, ...]:
    """The feature degrees of a polynomial net or neuron, read off the model class itself
    from shapes alone (`jax.eval_shape`: nothing is allocated)."""
    from .._models.polynomial import Neuron, PolynomialNet

    key = jax.random.PRNGKey(0)
    if model.kind == "polynomial":
        net = jax.eval_shape(lambda: PolynomialNet.random(model.widths, key=key,
                                                          activation=model.activation))
        return net.degrees
    neuron = jax.eval_shape(lambda: Neuron.random(model.dim, key=key,
                                                  activation=model.activation))
    return neuron.feature_degrees


def feature_shape(model, tokens: int) -> tuple[int, int]:
    """(rows, p): the shape of one sample's tensorized features ψ(x) on the moment path
    ((0, 0) where there is none: MLPs; python models, whose moments `make_objective` sizes).

    Deep linear: (1, d). Polynomial nets: (1, Σ_k d^k) over the degrees k of f (full tensor
    powers x^{⊗k}, every degree the layers reach: [5, 7, 7, 7, 3] quadratic has k = 8 only,
    p = 5⁸). Neuron: (1, Σ_k d^k) over the nonzero coefficients s_k of σ. Attention:
    (tokens, d³)."""
    kind = model.kind
    if kind == "deep_linear":
        return 1, model.widths[0]
    if kind in ("polynomial", "neuron"):
        d = input_dim(model)
        return 1, sum(d ** k for k in _degrees(model))
    if kind == "lightning_attention":
        return max(tokens, 1), model.dim ** 3
    return 0, 0


def feature_count(model, tokens: int) -> int:
    """p, the number of features per row (`feature_shape`)."""
    return feature_shape(model, tokens)[1]


def phase_law_entries(model) -> tuple[int, int]:
    """(numbers in all phase-space-law values, number of laws) of one member: what a
    second-order flow monitors besides `law_entries` (`phase_space_laws`: one k × k
    `AngularMomentumLaw` per pair of layers of a deep linear net, k the hidden width; none
    for other models)."""
    linear = model.kind == "deep_linear" or (
        model.kind == "mlp" and model.activation == "linear" and not model.bias
        and not model.normalize)
    if not linear:
        return 0, 0
    hidden = model.widths[1:-1]
    return sum(w * w for w in hidden), len(hidden)


def state_size(run, parameters: int) -> int:
    """Numbers in one member's solver state for a `[[dynamics]]` entry: the parameters θ,
    or (θ, v) — twice as many — for a second-order flow (`momentum_flow`, `nesterov_flow`),
    integrated in phase space."""
    return 2 * parameters if run.kind in PHASE_FLOW_KINDS else parameters


def law_entries(model) -> tuple[int, int]:
    """(numbers in all architecture-law values, number of laws) of one member."""
    kind = model.kind
    if kind == "deep_linear":  # balance matrices, one per hidden layer
        hidden = model.widths[1:-1]
        return sum(w * w for w in hidden), len(hidden)
    if kind in ("polynomial", "mlp"):  # one number per hidden neuron and layer
        hidden = model.widths[1:-1]
        return sum(hidden) + 2, len(hidden) + 2
    if kind == "lightning_attention":
        # per head: qk (key_dim²), kv (a number), vo (value_dim², with an output projection)
        vo = model.value_dim ** 2 if model.out_dim else 0
        return model.heads * (model.key_dim ** 2 + 1 + vo), model.heads * (2 + bool(vo))
    return 4, 4  # neuron / python models: a few scalar laws


def _orbit_size(augmentation, d: int) -> int:
    if augmentation is None:
        return 1
    group = augmentation.group
    sizes = {"cyclic_shift": d, "permutations": math.factorial(min(d, 20)),
             "rotations": augmentation.order, "sign_flips": 2 ** min(d, 60), "octahedral": 24,
             "icosahedral": 60, "orthogonal": augmentation.samples or 1}
    return max(1, sizes[group])


def _optimizer_slots(run, parameters: int) -> float:
    """Copies of the parameters in the optimizer state of a discrete `run` (from
    `optimizer(...).init` on shapes alone, as `train` measures it)."""
    import jax.numpy as jnp

    from .._dynamics.train import optimizer

    kind = "gd" if run.kind == "sgd" else run.kind
    optim = optimizer(kind, lr=1.0, momentum=0.5 if kind == "momentum" else 0.0)
    flat = jax.ShapeDtypeStruct((max(parameters, 1),), jnp.float64)
    return tree_bytes(jax.eval_shape(optim.init, flat)) / tree_bytes(flat)


def _run(config, run, members: int, parameters: int) -> MemoryEstimate:
    """One `[[dynamics]]` entry by `run_estimate`, as `gradient_flow` / `train` size it
    (without the gradient's working set, measured when they start)."""
    from .._dynamics.batching import _implicit, cpu_lanes, state_copies
    from .config import default_n_save

    entries, count = law_entries(config.model)
    n_save = default_n_save(run)
    if run.kind in FLOW_KINDS:
        if run.kind in PHASE_FLOW_KINDS:
            # The state is (θ, v): every solver copy, the start and final vectors and an
            # implicit solver's Jacobian are of 2P numbers; the phase-space laws are
            # monitored too. "auto" is Tsit5 for these flows (`gradient_flow`).
            extra, more = phase_law_entries(config.model)
            entries, count = entries + extra, count + more
            implicit = run.solver == "kvaerno5"
            solver = "tsit5" if run.solver == "auto" else run.solver
        else:
            implicit = _implicit(run.solver, parameters)
            solver = run.solver
        lanes = cpu_lanes(run.solver, members, parameters) if free_device_memory() is None \
            else 1
        return run_estimate(
            members=members, parameters=state_size(run, parameters), lanes=min(lanes, members),
            state_copies=state_copies(solver), resident_copies=FLOW_RESIDENT_COPIES,
            implicit=implicit, n_save=n_save, n_laws=count, law_entries=entries)
    slots = _optimizer_slots(run, parameters)
    chunk = -(-run.steps // (n_save - 1))
    return run_estimate(
        members=members, parameters=parameters, lanes=members,
        state_copies=TRAIN_STEP_COPIES + slots, resident_copies=2 * (1 + slots),
        n_save=-(-run.steps // chunk) + 1, n_laws=count, law_entries=entries, final_copies=2)


def estimate(config, *, members: int | None = None, parameters: int | None = None) \
        -> MemoryEstimate:
    """What a run of `config` holds at once, with `members` ensemble members (default
    `ensemble.size`) and `parameters` per member (default from the `[model]` table): the
    largest `[[dynamics]]` entry (`run_estimate`) plus the teacher, the data and the
    moments."""
    B = members or config.ensemble.size
    P = parameters if parameters is not None else parameter_count(config.model)
    data = config.data
    n = data.n or (len(data.x) if data.x is not None else 0)
    d = input_dim(config.model)
    tokens = data.tokens or 1
    out = config.model.widths[-1] if "widths" in config.model else max(d, 1)
    if config.model.kind == "lightning_attention":
        model = config.model  # no output projection: the heads' values side by side
        out = model.out_dim or model.heads * model.value_dim
    orbit = _orbit_size(config.augmentation, d)
    orbit_mode = config.augmentation is not None and config.augmentation.mode == "orbit"
    samples = n * (orbit if orbit_mode else 1)
    rows, p = feature_shape(config.model, tokens)
    moments = config.loss.kind == "mse" and config.loss.moments is not False and p > 0
    if moments:  # the same function as `make_objective` checks itself with
        matrices = moments_bytes(p, out, rows, samples,
                                 symmetrized=config.augmentation is not None)
    runs = [_run(config, run, B, P) for run in config.dynamics] or \
        [run_estimate(members=B, parameters=P, lanes=0, state_copies=0, resident_copies=1,
                      n_save=0, n_laws=0, law_entries=0)]
    largest = max(runs, key=lambda e: e.total)
    return MemoryEstimate(largest.parts | {
        "teacher": P * BYTES,
        "data": samples * (d * tokens + out * tokens) * BYTES,
        "moments": matrices if moments else 0,
    })


def check_memory(config, *, members: int | None = None, parameters: int | None = None,
                 available: float | None = None) -> MemoryEstimate:
    """Refuse (`MemoryConfigError`: a ConfigError and an InsufficientMemory) a run whose
    estimate exceeds the available memory, with the number and the fix; return the estimate
    otherwise."""
    est = estimate(config, members=members, parameters=parameters)
    members = "`ensemble.size` (sweeps: `sweep.chunk`)"
    fixes = {"parameters": f"reduce `model.widths` or {members}",
             "solver state": f"reduce `model.widths` or {members}",
             "gradient working set": f"reduce `data.n` or {members}",
             "teacher": "reduce `model.widths`",
             "data": "reduce `data.n`" + (" or use `augmentation.mode` = 'auto'"
                                          if config.augmentation is not None else ""),
             "moments": "reduce the input size (`model.widths[0]` / `model.dim`), the "
                        "polynomial degree (fewer layers, a lower-degree activation) or set "
                        "`loss.moments` = false",
             "saved values": "reduce `model.widths` (law values such as balance matrices "
                             f"grow with them), `n_save` or {members}"}
    return check(est, fixes, available=available, error=MemoryConfigError)
