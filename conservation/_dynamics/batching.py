"""How many ensemble members one solve holds side by side (its lanes): the default `batch_size`.

On the CPU 4 lanes (2 for a Chebyshev solver), as `benchmarks/bench_lanes.py` measured. On an
accelerator, where lanes step in lockstep, the batch should be as large as the device memory
allows (that is what fills it), and no larger (out-of-memory errors come from XLA mid-run). A
lane holds its solver state (~12 parameter vectors for an explicit Runge–Kutta method with
dense output and error estimate; implicit methods add a dense Jacobian and its factorisation,
2·P² numbers), the working set of one gradient evaluation (estimated from the gradient's jaxpr
with a liveness sweep over its intermediates: an upper bound of what XLA keeps, which fuses and
reuses buffers; the shared data are resident once and not counted per member), and its saved
monitor scalars.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu

from .._memory import (
    FLOW_RESIDENT_COPIES,
    FLOW_STATE_COPIES,
    FLOW_STATE_COPIES_CHEBYSHEV,
    TRAIN_STEP_COPIES,
    MemoryEstimate,
    check,
    free_device_memory,
    peak_live_bytes,
    run_estimate,
    tree_bytes,
    tree_size,
)

__all__ = ["free_device_memory", "flat_member", "peak_live_bytes", "member_bytes", "cpu_lanes",
           "state_copies", "member_parameters", "default_batch_size", "check_flow_memory",
           "check_train_memory"]

_FILL = 0.75  # of the free device memory: XLA's temporaries beyond the estimate, fragmentation
# Lanes on the CPU (`benchmarks/bench_lanes.py`, 2-core CPU, members/s against one member at a
# time, `lanes_cpu.json`). Lanes share a gradient's per-operation overhead and the loop's
# per-iteration overhead (an implicit solver's Newton iterations), which dominate small models:
# with 2 / 4 lanes attention d = 4 gains 3.13× / 4.17× (Tsit5), 1.37× / 1.63× (Kvaerno5), deep
# linear 16-32-32-8 1.14× / 1.24×: 4 lanes. A Chebyshev solver's steps take as many stages as
# the stiffest lane needs, so its lanes wait for each other at every step: with the stabilised
# solver 4 lanes ran 0.71×, 0.85× and 1.01× the members/s of 2 on attention d = 8 at B = 8 in
# three runs (d = 4: 0.81×, 1.03×, 1.02×): 2 lanes for it. Where a member's gradient is a few
# larger products there is little to share: deep linear 64-128-128-32 (28 672 parameters)
# 1.02× / 1.02×, 128-256-256-32 0.89× / 0.82× (4 lanes behind 2 in three runs): 2 lanes above
# 4096 parameters.
_CPU_LANES = 4
_CPU_LANES_FEW = 2
_LARGE_MODEL = 4096  # parameters


def _chebyshev(solver, auto: bool) -> bool:
    """Whether `solver` (a solver object or a name) is a Chebyshev solver (`"stabilized"`,
    `StabilizedRK`, `ROCK4`, `RKC`); `auto`: what `"auto"` counts as."""
    from .solvers import AbstractChebyshevSolver

    if isinstance(solver, str):
        return solver == "stabilized" or (solver == "auto" and auto)
    return isinstance(solver, AbstractChebyshevSolver)


def cpu_lanes(solver, size: int, parameters: int) -> int:
    """The CPU's default lanes for `solver` (a solver object or a name; "auto" counts as the
    largest default), `size` members of `parameters` parameters each: 4; 2 for a Chebyshev
    solver (`"stabilized"`, `StabilizedRK`, `ROCK4`, `RKC`) or above `_LARGE_MODEL`
    parameters; never more than the members."""
    few = _chebyshev(solver, auto=False) or parameters > _LARGE_MODEL
    return max(1, min(size, _CPU_LANES_FEW if few else _CPU_LANES))


def state_copies(solver) -> int:
    """Parameter vectors one lane of `solver` (a solver object or a name; "auto" counts as
    the larger) holds: `FLOW_STATE_COPIES`, `FLOW_STATE_COPIES_CHEBYSHEV` for a Chebyshev
    solver. (An implicit solver's dense Jacobian comes on top.)"""
    return FLOW_STATE_COPIES_CHEBYSHEV if _chebyshev(solver, auto=True) else FLOW_STATE_COPIES


def member_bytes(grad, y0, solver, n_save: int, n_laws: int) -> int:
    """Bytes one member of a batched flow holds: solver state, one gradient evaluation's
    working set, saved scalars (`grad`: flat parameters → gradient; `y0`: one member's flat
    parameters)."""
    size, item = y0.size, y0.dtype.itemsize
    state = state_copies(solver) * size * item
    if isinstance(solver, dfx.AbstractImplicitSolver):
        state += 2 * size * size * item
    working = peak_live_bytes(jax.make_jaxpr(grad)(y0).jaxpr)
    saved = n_save * (1 + 2 * n_laws) * item
    return state + working + saved


def default_batch_size(grad, y0, size: int, solver, n_save: int, n_laws: int,
                       free: float | None, parameters: int | None = None) -> int:
    """Lanes per solve (at least 1, at most `size`): on the CPU (`free` None) `cpu_lanes` for
    members of `parameters` parameters (default `y0.size`); on an accelerator as many as fit
    in `_FILL` of the `free` bytes."""
    if free is None:
        return cpu_lanes(solver, size, y0.size if parameters is None else parameters)
    fit = int(_FILL * free // member_bytes(grad, y0, solver, n_save, n_laws))
    return max(1, min(size, fit))


# ------------------------------------------------------------- the memory check of a run


def member_parameters(params) -> int:
    """Parameters of one member (`params` carries the ensemble axis first)."""
    return tree_size(_member_shapes(params))


def _member_shapes(params):
    """One member's parameter shapes (`params` carries the ensemble axis first)."""
    return jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)


def flat_member(params):
    """(shape, unravel): one member's flat parameters as a `jax.ShapeDtypeStruct`, and the
    function from a flat vector back to its pytree (`params` carries the ensemble axis
    first). From shapes alone: slicing a member out and ravelling it would compile an eager
    program per operation (seven for a two-layer net on a GPU)."""
    unravel = []

    def flat(p):
        y, back = jfu.ravel_pytree(p)
        unravel.append(back)  # static: it holds the leaves' shapes and dtypes, no tracer
        return y

    return jax.eval_shape(flat, _member_shapes(params)), unravel[0]


def _law_sizes(laws, params, static) -> dict[str, int]:
    """Numbers in each law's value for one member, from shapes alone (0 where a law cannot
    be evaluated: the run reports that itself)."""
    def values(p):
        model = eqx.combine(p, static)
        return {law.name: law(model) for law in laws}

    try:
        return {k: tree_size(v) for k, v in
                jax.eval_shape(values, _member_shapes(params)).items()}
    except Exception:  # noqa: BLE001 — a broken law is the run's error to report, not ours
        return {}


def _working(loss, params, static) -> int:
    """`peak_live_bytes` of one member's gradient of `loss(model)`, traced from shapes alone
    (0 where it cannot be traced: the run reports that itself)."""
    def grad(p):
        return jax.grad(lambda q: loss(eqx.combine(q, static)))(p)

    try:
        return peak_live_bytes(jax.make_jaxpr(grad)(_member_shapes(params)).jaxpr)
    except Exception:  # noqa: BLE001 — as above
        return 0


def _members_here(params, size: int) -> int:
    """Members one device holds: an ensemble split over accelerators (`shard_ensemble`)
    puts size/devices on each, checked against each device's free memory. (CPU devices
    share the host's memory: all members count.)"""
    try:
        devices = len(jtu.tree_leaves(params)[0].sharding.device_set)
    except Exception:  # noqa: BLE001 — traced or plain arrays: one device
        devices = 1
    if devices > 1 and free_device_memory() is not None:
        return -(-size // devices)
    return size


def _implicit(solver, parameters: int) -> bool:
    """Whether `solver` (a name, "auto" or a diffrax solver) holds a dense Jacobian; "auto"
    picks the implicit Kvaerno5 only for small models (`solvers._IMPLICIT_MAX_PARAMS`)."""
    from .solvers import _IMPLICIT_MAX_PARAMS

    if isinstance(solver, dfx.AbstractImplicitSolver):
        return True
    if isinstance(solver, str):
        return solver == "kvaerno5" or (solver == "auto" and parameters <= _IMPLICIT_MAX_PARAMS)
    return False


def check_flow_memory(objective, params, static, laws, keep, final_values: bool, solver,
                      n_save: int, batch_size: int | None, size: int) -> MemoryEstimate:
    """Refuse (`conservation.InsufficientMemory`, an `ArgumentError`) a `gradient_flow` whose
    estimate (`conservation._memory.run_estimate`) exceeds the available memory, before
    anything of it is allocated; return the estimate otherwise.

    Lanes: `batch_size`, else the CPU default (`cpu_lanes`); on an accelerator the default
    batch takes what fits, so one lane is checked. The gradient's
    working set per lane comes from the liveness sweep of its jaxpr."""
    parameters = member_parameters(params)
    implicit = _implicit(solver, parameters)
    size = _members_here(params, size)
    if batch_size is None:
        lanes = cpu_lanes(solver, size, parameters) if free_device_memory() is None else 1
    else:
        lanes = batch_size
    lanes = min(lanes, size)
    sizes = _law_sizes(laws, params, static)
    estimate = run_estimate(
        members=size, parameters=parameters, lanes=lanes, state_copies=state_copies(solver),
        resident_copies=FLOW_RESIDENT_COPIES, implicit=implicit,
        working=_working(objective, params, static), n_save=n_save, n_laws=len(laws),
        law_entries=sum(sizes.values()) if final_values else 0,
        kept_entries=sum(sizes.get(k, 0) for k in keep))
    members = "fewer members (an ensemble in several calls)"
    return check(estimate, {
        "parameters": f"{members} or a smaller model",
        "solver state": "a smaller `batch_size` (members integrated side by side)"
                        + (" or an explicit `solver` (an implicit one holds a dense "
                           "Jacobian per lane)" if implicit else "") + f", or {members}",
        "gradient working set": "a smaller `batch_size` (members integrated side by side) "
                                "or fewer samples",
        "saved values": 'values="final" or "none" (law values at every save are kept only '
                        'with values="all" or names), a smaller `n_save`, or ' + members,
    }, what=f"this flow ({size} members of {parameters} parameters)")


def check_train_memory(objective, params, static, laws, keep, final_values: bool, optim,
                       steps: int, n_save: int, batch_size: int | None, size: int
                       ) -> MemoryEstimate:
    """Refuse (`conservation.InsufficientMemory`) a `train` run whose estimate exceeds the
    available memory, before anything of it is allocated; return the estimate otherwise.

    Every member steps at once (vmapped): each holds its parameters and optimizer state
    (twice: a chunk's inputs and outputs), a step's gradient, updates and new parameters,
    and one gradient evaluation's working set (of a `batch_size` minibatch when given)."""
    member = _member_shapes(params)
    parameters = tree_size(member)
    size = _members_here(params, size)
    try:
        slots = tree_bytes(jax.eval_shape(optim.init, member)) / max(1, tree_bytes(member))
    except Exception:  # noqa: BLE001 — an optimizer that cannot init fails in the run itself
        slots = 0.0
    if batch_size is None:
        loss = objective
    else:
        def loss(model):
            return objective.on(jnp.arange(batch_size))(model)
    sizes = _law_sizes(laws, params, static)
    chunk = -(-steps // (n_save - 1))
    estimate = run_estimate(
        members=size, parameters=parameters, lanes=size,
        state_copies=TRAIN_STEP_COPIES + slots, resident_copies=2 * (1 + slots),
        working=_working(loss, params, static), n_save=-(-steps // chunk) + 1,
        n_laws=len(laws), law_entries=sum(sizes.values()), final_copies=2 if final_values
        else 1, kept_entries=sum(sizes.get(k, 0) for k in keep))
    members = "fewer members per call (an ensemble in several calls)"
    return check(estimate, {
        "parameters": f"{members} or a smaller model",
        "solver state": f"{members}, or an optimizer with less state",
        "gradient working set": f"`batch_size` (a minibatch per step) or {members}",
        "saved values": 'values="final" or "none" (law values at every save are kept only '
                        'with values="all" or names), a smaller `n_save`, or ' + members,
    }, what=f"this training run ({size} members of {parameters} parameters)")
