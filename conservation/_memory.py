"""The memory check shared by the API and the CLI: what a run needs against what is free.

A run is refused before anything of it is allocated when its estimate exceeds the available
memory, with `InsufficientMemory` (an `ArgumentError`) naming the estimate, the available
memory and the fix. The same function, `run_estimate`, sizes a run for `gradient_flow` /
`train` (from the real model and objective) and for a config (`conservation run` / `sweep`,
from the `[model]` table, before the data are built).

Available memory (`available_memory`): on an accelerator its allocator's free bytes; on the
CPU the host's `MemAvailable` (/proc/meminfo), or less when the address-space limit
(`ulimit -v`, RLIMIT_AS) minus the process's current size is smaller.

The estimate is of what XLA must hold at once (float64, 8 bytes a number): it leaves out
XLA's own temporaries beyond the working set measured from a jaxpr, so it is a lower bound of
the peak for the resident parts and the refusal threshold is the whole available memory.

This module imports nothing from conservation's subpackages (models, data, laws, dynamics and
experiments all use it).
"""

import math
import os
import resource

import jax
import jax.extend as jex
import jax.tree_util as jtu
import numpy as np

from ._validation import ArgumentError

BYTES = 8  # float64
# A lane of an adaptive explicit Runge–Kutta solve: y, y₁, error, ~7 stages / dense-output
# coefficients, PID history. Implicit solvers add a dense Jacobian and its factors (2·P²).
FLOW_STATE_COPIES = 12
# A lane of the stabilised (Chebyshev) solver: y, the power iteration's vector, f(y₀), the
# stage recurrence's y_{j−1}, y_{j−2}, f and y_j, the five finishing evaluations, y₁, f₁, the
# error and the dense output (y₀, y₁, h·f₀, h·f₁). Measured on an H200 (`bench_memory.py`,
# 128-256-256-32 at B = 256): 16.5 parameter vectors per lane beyond the other parts.
FLOW_STATE_COPIES_CHEBYSHEV = 17
# Copies of every member's parameters a flow allocates beside the caller's ensemble: the flat
# initial vectors, the final flat vectors and the final ensemble.
FLOW_RESIDENT_COPIES = 3
# Per member of a discrete run (all members step at once, vmapped): the gradient, the
# updates and the new parameters, plus a new copy of the optimizer state.
TRAIN_STEP_COPIES = 3


class InsufficientMemory(ArgumentError, MemoryError):
    """A run whose memory estimate exceeds the available memory, refused before anything is
    allocated. The message names the estimate, the available memory and the fix. An
    `ArgumentError` (exit status 2 in the CLI) and a `MemoryError`."""


class MemoryEstimate:
    """Bytes per part of a run (`parts`) and their `total`."""

    def __init__(self, parts: dict[str, float]):
        self.parts = {k: float(v) for k, v in parts.items()}
        self.total = sum(self.parts.values())

    def __repr__(self):
        parts = ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items())
        return f"MemoryEstimate({gb(self.total)}: {parts})"

    @property
    def largest(self) -> str:
        """The name of the largest part."""
        return max(self.parts, key=self.parts.get)


def gb(n: float) -> str:
    """`n` bytes in GB, three digits."""
    return f"{n / 1e9:.3g} GB"


# ----------------------------------------------------------------------- available memory


def free_device_memory(device=None) -> float | None:
    """Bytes free on `device` (default: JAX's first device) by its allocator's statistics, or
    None where the backend reports none (the CPU)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 — some backends have no memory_stats
        return None
    limit = stats.get("bytes_limit")
    return float(limit - stats.get("bytes_in_use", 0)) if limit else None


def _proc_kb(path: str, field: str) -> float | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory() -> tuple[float, str]:
    """(bytes, where) the host can still give this process: `MemAvailable` (else the physical
    memory), or the room left under `ulimit -v` (RLIMIT_AS minus the process's VmSize) when
    that is less."""
    free = _proc_kb("/proc/meminfo", "MemAvailable")
    if free is None:
        try:
            free = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            free = math.inf
    where = "the machine"
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _proc_kb("/proc/self/status", "VmSize") or 0.0
        room = max(0.0, soft - used)
        if room < free:
            free, where = room, f"`ulimit -v` ({gb(soft)}, {gb(used)} in use)"
    return free, where


def available_memory() -> tuple[float, str]:
    """(bytes, where) a run can allocate: the accelerator's free memory when JAX runs on one,
    else the host's (`host_memory`)."""
    free = free_device_memory()
    if free is not None:
        return free, f"the {jax.devices()[0].device_kind}"
    return host_memory()


# --------------------------------------------------------------------------- the estimate


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jtu.tree_leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype"))


def tree_size(tree) -> int:
    """Numbers in the array leaves of `tree`."""
    return sum(math.prod(x.shape) for x in jtu.tree_leaves(tree) if hasattr(x, "shape"))


def _nbytes(aval) -> int:
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    return math.prod(shape) * np.dtype(aval.dtype).itemsize


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.core.Jaxpr):
                yield item


def peak_live_bytes(jaxpr) -> int:
    """Peak bytes of the intermediate values alive at once while `jaxpr` runs in program
    order (nested jaxprs count their own intermediates at their call): no fusion, no buffer
    reuse within an operation, so an upper bound of what XLA allocates beside the inputs.

    Inputs and closed-over constants are not counted: in a batched flow they are the member's
    parameters (counted with the solver state) and the data or moments every member shares
    (resident once, already in the device's used memory)."""
    last_use = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jex.core.Var):
                last_use[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jex.core.Var):
            last_use[v] = len(jaxpr.eqns)
    live = {}
    current = peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        inner = max((peak_live_bytes(j) for j in _sub_jaxprs(eqn.params)), default=0)
        out = sum(_nbytes(v.aval) for v in eqn.outvars)
        peak = max(peak, current + max(out, inner))
        for v in eqn.outvars:
            live[v] = _nbytes(v.aval)
        current += out
        for v in {v for v in eqn.invars if isinstance(v, jex.core.Var)}:
            if last_use.get(v) == i and v in live:
                current -= live.pop(v)
        for v in eqn.outvars:  # never read
            if v not in last_use and v in live:
                current -= live.pop(v)
    return peak


def run_estimate(*, members: int, parameters: int, lanes: int, state_copies: float,
                 resident_copies: float, implicit: bool = False, working: float = 0,
                 n_save: int, n_laws: int, law_entries: int, kept_entries: int = 0,
                 final_copies: int = 1, shared: dict[str, float] | None = None
                 ) -> MemoryEstimate:
    """What a run holds at once (bytes): the one estimate of `gradient_flow`, `train` and the
    CLI.

    - `members` of `parameters` numbers each, `resident_copies` copies of each member's
      parameters held for the whole run (initial / final vectors, optimizer state);
    - `lanes` members stepped side by side, each with `state_copies` parameter vectors of
      solver or optimizer state (`implicit`: plus a dense Jacobian and its factors, 2·P²)
      and `working` bytes of one gradient evaluation (from `peak_live_bytes`);
    - saved values: per member, at each of `n_save` saves the loss and every one of `n_laws`
      laws' drift and condition plus `kept_entries` law numbers (`values="all"` / names),
      and `final_copies` × `law_entries` numbers of the laws' values (final values,
      references);
    - `shared`: parts held once (data, moments, teacher), by name.
    """
    P = parameters
    parts = {
        "parameters": members * P * resident_copies * BYTES,
        "solver state": lanes * (state_copies * P + (2 * P * P if implicit else 0)) * BYTES,
        "gradient working set": lanes * working,
        "saved values": members * (n_save * (1 + 2 * n_laws + kept_entries)
                                   + final_copies * law_entries) * BYTES,
    }
    parts.update(shared or {})
    return MemoryEstimate(parts)


def check(estimate: MemoryEstimate, fixes: dict[str, str], *, available: float | None = None,
          where: str = "the machine", what: str = "this run", error=InsufficientMemory
          ) -> MemoryEstimate:
    """Raise `error` (default `InsufficientMemory`) when `estimate` exceeds `available`
    (default: `available_memory()`), naming both and the fix for its largest part
    (`fixes[part]`); return the estimate otherwise."""
    if available is None:
        available, where = available_memory()
    if estimate.total > available:
        part = estimate.largest
        fix = fixes.get(part, "reduce the run's size")
        raise error(
            f"{what} needs ~{gb(estimate.total)} ({part}: {gb(estimate.parts[part])}), "
            f"{where} has {gb(available)} available: {fix}.")
    return estimate


# ------------------------------------------------------------------- ensembles of a factory


def check_members(factory, key, size: int) -> MemoryEstimate:
    """Refuse (`InsufficientMemory`) `size` members of `factory(key)` that do not fit, before
    any is built: their parameters (one member's shapes from `jax.eval_shape`), the largest
    array of each member once more (the factory's draw beside its scaled result) and the
    `size` PRNG keys."""
    import equinox as eqx

    one = eqx.filter_eval_shape(factory, key)
    leaves = [x for x in jtu.tree_leaves(one) if hasattr(x, "shape")]
    member = tree_bytes(leaves)
    largest = max((tree_bytes(x) for x in leaves), default=0)
    estimate = MemoryEstimate({"parameters": size * member,
                               "factory temporaries": size * largest,
                               "keys": size * tree_bytes(key)})
    return check(estimate, {p: "build fewer members (`size`) or a smaller model"
                            for p in estimate.parts},
                 what=f"an ensemble of {size} members")


# ------------------------------------------------------------------- the moment fast path


def moments_bytes(p: int, m: int, rows: int, n: int, *, symmetrized: bool = False) -> int:
    """Bytes the moment path of p features (`rows` rows of them per sample, `m` outputs per
    row, `n` samples) holds while it is built: M, R and the Gram matrix ((p+m)² each), a TSQR
    step's chunk of min(1024, n)·rows rows of features and outputs, the stacked [R; chunk]
    and its QR; twice with an exact symmetrisation (`symmetrized`: the plain and the
    symmetrised moments)."""
    k = p + m
    chunk = min(1024, max(n, 1)) * rows
    return (3 * k * k + (chunk + 2 * (k + chunk)) * k) * BYTES * (2 if symmetrized else 1)


def check_moments(model, data, *, symmetrized: bool = False) -> MemoryEstimate:
    """Refuse (`InsufficientMemory`) moments of `model`'s features on `data` that do not fit,
    before they are built: p from `jax.eval_shape` of `model.features` (a deep polynomial
    net's features are every tensor power x^{⊗k} its output reaches)."""
    x = jax.ShapeDtypeStruct(tuple(data.x.shape[1:]), data.x.dtype)
    rows, p = jax.eval_shape(lambda m, x: m.features(x), model, x).shape
    m = math.prod(data.y.shape[1:]) // max(rows, 1)
    estimate = MemoryEstimate({"moments": moments_bytes(p, m, rows, data.x.shape[0],
                                                        symmetrized=symmetrized)})
    return check(estimate, {"moments": (
        f"the moment fast path needs {p} features; pass moments=False to "
        "`make_objective` (per-sample evaluation), or use a smaller input or a lower "
        "polynomial degree")}, what=f"the moments of {p} features")
