"""How many ensemble members one solve holds side by side (its lanes): the default `batch_size`.

On the CPU 2 lanes (4 for an implicit solver), as `benchmarks/bench_lanes.py` measured. On an
accelerator, where lanes step in lockstep, the batch should be as large as the device memory
allows (that is what fills it), and no larger (out-of-memory errors come from XLA mid-run). A
lane holds its solver state (~12 parameter vectors for an explicit Runge–Kutta method with
dense output and error estimate; implicit methods add a dense Jacobian and its factorisation,
2·P² numbers), the working set of one gradient evaluation (estimated from the gradient's jaxpr
with a liveness sweep over its intermediates: an upper bound of what XLA keeps, which fuses and
reuses buffers; the shared data are resident once and not counted per member), and its saved
monitor scalars.
"""

import math

import diffrax as dfx
import jax
import jax.extend as jex
import numpy as np

_STATE_COPIES = 12  # y, y₁, error, ~7 RK stages / dense-output coefficients, PID history
_FILL = 0.75  # of the free device memory: XLA's temporaries beyond the estimate, fragmentation
# Lanes on the CPU (`benchmarks/bench_lanes.py`, 2-core CPU, members/s against one member at a
# time). Lanes share a gradient's per-operation overhead and the loop's per-iteration overhead
# (a Chebyshev solver's stage loop, an implicit one's Newton iterations), which dominate small
# models: with 2 lanes attention d = 4 gains 3.0× (Tsit5), 1.62× (stabilised), 1.14×
# (Kvaerno5), d = 8 2.16× (stabilised), deep linear 16-32-32-8 1.13×. Where a gradient is a few
# large products there is little to share and the lanes' selects cost it back (deep linear
# 128-256-256-32: 0.86×). 4 lanes gain more on the smallest flows (Tsit5 4.24×, Kvaerno5
# 1.46×) and lose more on the deep linear ones (0.94×, 0.79×): 4 for an implicit solver only.
_CPU_LANES = 2
_CPU_LANES_IMPLICIT = 4


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


def member_bytes(grad, y0, solver, n_save: int, n_laws: int) -> int:
    """Bytes one member of a batched flow holds: solver state, one gradient evaluation's
    working set, saved scalars (`grad`: flat parameters → gradient; `y0`: one member's flat
    parameters)."""
    size, item = y0.size, y0.dtype.itemsize
    state = _STATE_COPIES * size * item
    if isinstance(solver, dfx.AbstractImplicitSolver):
        state += 2 * size * size * item
    working = peak_live_bytes(jax.make_jaxpr(grad)(y0).jaxpr)
    saved = n_save * (1 + 2 * n_laws) * item
    return state + working + saved


def default_batch_size(grad, y0, size: int, solver, n_save: int, n_laws: int,
                       free: float | None) -> int:
    """Lanes per solve (at least 1, at most `size`): on the CPU (`free` None) 2, 4 for an
    implicit solver; on an accelerator as many as fit in `_FILL` of the `free` bytes."""
    if free is None:
        implicit = isinstance(solver, dfx.AbstractImplicitSolver)
        return min(size, _CPU_LANES_IMPLICIT if implicit else _CPU_LANES)
    fit = int(_FILL * free // member_bytes(grad, y0, solver, n_save, n_laws))
    return max(1, min(size, fit))
