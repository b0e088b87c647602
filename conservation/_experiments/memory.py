"""Memory estimate of a run, checked before anything is allocated or compiled.

The estimate counts what a run holds at once, in float64 (8 bytes): the parameters of every
member (initial, solver state and ~8 Runge–Kutta stages or optimizer state), the teacher, the
data (orbit-expanded in `orbit` mode), the moment matrices of the fast path (p² for p features),
and the saved values (loss, every law's drift and condition at `n_save` times per member, and
every law's value at the final time; the values at every save only on request,
`values="all"`). It is a lower bound on the peak (XLA adds temporaries), so the refusal threshold
is the machine's memory, not a fraction of it.
"""

import math
import os

from .config import ConfigError, input_dim

_BYTES = 8
_STAGES = 8  # RK stages + state + error estimate held per member by an adaptive solver


class MemoryEstimate:
    """Bytes per part of a run (`parts`) and their `total`."""

    def __init__(self, parts: dict[str, float]):
        self.parts = {k: float(v) for k, v in parts.items()}
        self.total = sum(self.parts.values())

    def __repr__(self):
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in self.parts.items())
        return f"MemoryEstimate({_gb(self.total)}: {parts})"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


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


def feature_count(model, tokens: int) -> int:
    """Size p of the tensorized features Ψ(x) on the moment path (0 when not applicable)."""
    kind = model.kind
    d = input_dim(model)
    if kind == "deep_linear":
        return d
    if kind == "polynomial":
        degree = 2 if isinstance(model.activation, str) and model.activation == "quadratic" \
            else (6 if isinstance(model.activation, str) else len(model.activation) - 1)
        return math.comb(d + degree - 1, degree) if degree > 1 else d
    if kind == "neuron":
        return math.comb(d + 5, 6)
    if kind == "lightning_attention":
        return d ** 3  # cubic in the tokens: the paper's 512×512 moments at d = 8
    return 0


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


def _saves(run) -> int:
    """Save points of a `[[dynamics]]` entry (the runner's default when `n_save` is unset)."""
    if run.n_save is not None:
        return run.n_save
    steps = getattr(run, "steps", None)
    return steps + 1 if steps is not None and steps <= 1000 else 101


def estimate(config, *, members: int | None = None, parameters: int | None = None) \
        -> MemoryEstimate:
    """What a run of `config` holds at once, with `members` ensemble members (default
    `ensemble.size`) and `parameters` per member (default from the `[model]` table)."""
    B = members or config.ensemble.size
    P = parameters if parameters is not None else parameter_count(config.model)
    data = config.data
    n = data.n or (len(data.x) if data.x is not None else 0)
    d = input_dim(config.model)
    tokens = data.tokens or 1
    out = config.model.widths[-1] if "widths" in config.model else max(d, 1)
    orbit = _orbit_size(config.augmentation, d)
    orbit_mode = config.augmentation is not None and config.augmentation.mode == "orbit"
    samples = n * (orbit if orbit_mode else 1)
    entries, count = law_entries(config.model)
    n_save = max((_saves(run) for run in config.dynamics), default=2)
    flows = any(run.kind in ("flow", "modified_flow") for run in config.dynamics)
    p = feature_count(config.model, tokens)
    moments = config.loss.kind == "mse" and config.loss.moments is not False and p > 0
    parts = {
        "parameters": P * B * ((_STAGES + 2) if flows else 4) * _BYTES,
        "teacher": P * _BYTES,
        "data": samples * (d * tokens + out) * _BYTES,
        "moments": (p * p + p * out) * _BYTES * (2 if config.augmentation else 1)
        if moments else 0,
        # loss, every law's drift and condition at each save time of each member, and the
        # laws' values at the end (what `gradient_flow`/`train` keep by default)
        "saved values": B * (n_save * (1 + 2 * count) + entries) * _BYTES,
    }
    return MemoryEstimate(parts)


def available_memory() -> tuple[float, str]:
    """(bytes, where) the run can use: the accelerator's free memory when JAX runs on one,
    else the machine's physical memory."""
    import jax

    from .._dynamics.batching import free_device_memory

    free = free_device_memory()
    if free is not None:
        return free, f"the {jax.devices()[0].device_kind}"
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the machine"
    except (ValueError, OSError, AttributeError):
        return math.inf, "the machine"


def check_memory(config, *, members: int | None = None, parameters: int | None = None,
                 available: float | None = None) -> MemoryEstimate:
    """Refuse (ConfigError) a run whose estimate exceeds the available memory, with the
    number and the fix; return the estimate otherwise."""
    est = estimate(config, members=members, parameters=parameters)
    where = "the machine"
    if available is None:
        available, where = available_memory()
    if est.total > available:
        biggest = max(est.parts, key=est.parts.get)
        fixes = {"parameters": "reduce `model.widths` or `ensemble.size` (sweeps: `sweep.chunk`)",
                 "teacher": "reduce `model.widths`",
                 "data": "reduce `data.n`" + (" or use `augmentation.mode` = 'auto'"
                                              if config.augmentation is not None else ""),
                 "moments": "reduce the input size (`model.widths[0]` / `model.dim`) or set "
                            "`loss.moments` = false",
                 "saved values": "reduce `model.widths` (law values such as balance matrices "
                                 "grow with them), `n_save` or `ensemble.size`"}
        raise ConfigError(
            f"this run needs ~{_gb(est.total)} ({biggest}: {_gb(est.parts[biggest])}), "
            f"{where} has {_gb(available)}: {fixes[biggest]}.")
    return est
