"""Many members of an ensemble in one adaptive loop: lanes that step together, each member with
its own step size, refilled from the queue of members as they finish.

`jax.vmap` of `diffrax.diffeqsolve` batches its loops with per-member predicates, and JAX then
runs the loop body under a `select` of the whole loop state, old against new, on every
iteration (the solution, the last step's dense output kept for events, the solver and
controller states, the save buffers); its save loop evaluates the monitors on every member in
each pass, though a step crosses a save time for only n_save / (steps per member) of them; and
the batch waits, step after step, for its slowest member (mean/max steps 0.71 at B = 8192 on
the H100).

Here the loop is written for the ensemble: one unbatched `while_loop` over L lanes whose body
takes one step of the same diffrax solver and step-size controller on every lane (`jax.vmap`
of `solver.step` and `controller.adapt_step_size`: straight-line code, so a lane's arithmetic
is the one diffrax does for a single member), keeps each lane's step where it was accepted
(`where` on the solution and the solver state only), saves where a lane's step crossed a save
time (a pass serves the lanes that need it, gathered, at most L/4 at a time), and stops a lane
at t1, at `max_steps`, on divergence or on a failure. A lane whose member has finished loads
the next member of the ensemble, so an ensemble larger than L keeps every lane busy until the
queue is empty instead of waiting for the slowest member of each fixed chunk.

Every member keeps its own step sequence: its numbers are those of its own diffrax solve, to
round-off (tested). What the loop gains over the vmapped `diffeqsolve`, and how many lanes
pay on the CPU (the default, `batching.cpu_lanes`), is measured in `docs/benchmarks/
ensembles.md` (`benchmarks/bench_ensembles.py`, `benchmarks/bench_lanes.py`).
"""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from equinox import internal as eqxi

from .._custom_types import Array
from .monitor import DIVERGED, FAILED, MAX_STEPS, REACHED_LOSS, SUCCESS
from .unrolled import AbstractUnrolledERK

_RUNNING = -1
# diffrax's marker for an implicit solver's root-finder tolerances "taken from the step-size
# controller" (`diffeqsolve` substitutes them; so do the lanes).
_FROM_CONTROLLER = dfx.Kvaerno5().root_finder.rtol
# A save pass serves at most 1/_SAVE_SHARE of the lanes (more passes when more need one).
_SAVE_SHARE = 4


def _where(pred, new, old):
    """`new` where the per-lane `pred` holds, else `old`, leaf by leaf (lane axis first)."""
    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (jnp.ndim(a) - 1)), a, b)
    return jtu.tree_map(pick, new, old)


def _clip_floor(t1):
    """100 ULPs below `t1`: a step ending beyond it ends at t1 (`_clip_to_end`)."""
    # diffrax unrolls these 100 `prevbefore`s; as a loop they are the same operations (the
    # same floor, bit for bit) in one traced body instead of ~500 equations, which were 40 %
    # of the stiffness probe's program and cost its tracing and lowering at every first call.
    # (A scan, not `fori_loop`, whose Python-int bounds compile a conversion program.)
    return jax.lax.scan(lambda t, _: (eqxi.prevbefore(t), None), t1, length=100)[0]


def attempt_step(solver, controller, term, error_order, t1, t1_clip_floor, y, tprev, tnext,
                 solver_state, controller_state, select=True):
    """One step attempt of one member from `tprev` to `tnext`, as diffrax's loop makes it:
    the solver's step, a NaN error made infinite, the controller's verdict and next step
    (clipped to t1), the state kept where the step was accepted. Returns (y, tprev, tnext,
    solver state, controller state, accepted, the step's dense output, failed); with
    `select=False` y and the solver state are the step's candidates, whether accepted or
    not (for a caller that selects them itself)."""
    # An unrolled Runge–Kutta method's dense output keeps its field values apart
    # (`step_stages`): the saves evaluate it with the interpolation's weights
    # (`AbstractUnrolledERK.interpolate`), and no step copies all seven into one array.
    step = solver.step_stages if isinstance(solver, AbstractUnrolledERK) else solver.step
    y1, y_error, dense_info, new_solver_state, solver_result = step(
        term, tprev, tnext, y, None, solver_state, False)
    if y_error is not None:  # None: the controller says it needs an error estimate
        y_error = jnp.where(jnp.isnan(y_error), jnp.inf, y_error)
    keep, new_tprev, new_tnext, _, new_controller_state, controller_result = (
        controller.adapt_step_size(tprev, tnext, y, y1, None, y_error, error_order,
                                   controller_state))
    new_tprev = jnp.minimum(new_tprev, t1)
    new_tnext = _clip_to_end(new_tprev, new_tnext, t1, t1_clip_floor, keep)
    failed = (keep & _unsuccessful(solver_result)) | _unsuccessful(controller_result)
    if select:
        y1, new_solver_state = jnp.where(keep, y1, y), _where(keep, new_solver_state,
                                                              solver_state)
    return (y1, new_tprev, new_tnext, new_solver_state, new_controller_state, keep, dense_info,
            failed)


def _unsuccessful(result) -> Array:
    """`result != diffrax.RESULTS.successful`, traced. (equinox compares two results known at
    trace time, such as an explicit solver's, eagerly: a one-operation program compiled on
    a first call.)"""
    return jnp.asarray(result._value) != dfx.RESULTS.successful._value


def _clip_to_end(tprev, tnext, t1, t1_clip_floor, keep_step):
    # As diffrax's loop: a step ending within 100 ULPs of t1 ends at t1 (after a rejection,
    # halfway there), so that no step is too short for a stable dense output.
    clip = tnext > t1_clip_floor
    tclip = jnp.where(keep_step, t1, tprev + 0.5 * (t1 - tprev))
    return jnp.where(clip, tclip, tnext)


class _Lanes(eqx.Module):
    """The state of the L lanes (every leaf has the lane axis first)."""

    member: Array  # the ensemble member a lane holds (−1: none yet)
    running: Array
    y: Array
    tprev: Array
    tnext: Array
    solver_state: object
    controller_state: object
    aux: object  # per-member data for `observe` (the laws' reference values)
    steps: Array
    save_index: Array
    status: Array  # the member's status once it stopped (`_RUNNING` before)


def solve_lanes(
    vector_field: Callable[[Array], Array],
    solver: dfx.AbstractAdaptiveSolver,
    controller: dfx.AbstractAdaptiveStepSizeController,
    start: Callable,
    observe: Callable,
    y0: Array,
    t1: Array,
    ts: Array,
    dt0: float,
    *,
    lanes: int,
    max_steps: int,
    diverged: Callable[[Array], Array],
    members: Array | None = None,
    report: Callable | None = None,
    t0: Array | None = None,
    extra=(),
    goal: Callable[[Array], Array] | None = None,
    root_finder: optx.AbstractRootFinder | None = None,
    return_t_final: bool = False,
    time_dependent: bool = False,
):
    """Integrate dy/dt = `vector_field(y)` from every row of `y0` to `t1` on `lanes` lanes.

    **Arguments:**

    - `vector_field`: the autonomous right-hand side of one member, flat array to flat array
      (`vector_field(t, y)` with `time_dependent=True`).
    - `solver`, `controller`: a diffrax adaptive solver and step-size controller (each
      member's steps are the ones `diffrax.diffeqsolve` takes with them).
    - `start`: `start(y0_row, *extra_row) -> (y_start, aux)`: the state a member's flow starts
      from and whatever `observe` needs of it (computed when a lane loads the member).
    - `observe`: `observe(t, y, aux) -> pytree` of arrays, saved at the times `ts`.
    - `y0`: (B, P) the members' flat parameters.
    - `t1`, `ts`: final time and the increasing save times in [t0, t1].
    - `dt0`: the first step size of every member.
    - `lanes`: members integrated side by side (1 ≤ lanes ≤ B).
    - `max_steps`: step attempts per member (accepted or rejected, as diffrax counts them).
    - `diverged`: `diverged(y) -> bool`: the member stops there (checked at the start and
      after every step, as a diffrax `Event`).
    - `members`: (B,) the members' numbers as `report` names them (default 0…B−1).
    - `report`: optional host callback `report(members, fraction, finished)` (each (B,):
      t/t1 reached, finished or not), called every 20 iterations and at the end (a progress
      bar).
    - `t0`: the start time of every member (default 0).
    - `extra`: a tuple of per-member arrays (leading axis B) passed on to `start`.
    - `goal`: optional `goal(y) -> scalar`: a member stops, with status `reached_loss`, where
      it becomes ≤ 0 (at its start: 0 steps; after a step: at the root of `goal` along the
      step's dense output, found with `root_finder`, as diffrax's `Event` with a float
      condition does); no save after that time is written.
    - `return_t_final`: also return each member's final time (B,).
    - `time_dependent`: `vector_field` takes (t, y) (a non-autonomous flow, e.g. Nesterov's).

    **Returns:** (saved: pytree of (B, T, …) arrays, `inf` after a member stopped early;
    final state (B, S) (S: the size of the state `start` returns, P for a first-order
    flow); status (B,) with `monitor`'s codes; step attempts (B,); loop iterations: the
    lanes' shared step count[; final times (B,) with `return_t_final`]).
    """
    size = y0.shape[0]
    n_save = ts.shape[0]
    members = jnp.arange(size) if members is None else members
    if isinstance(solver, dfx.AbstractImplicitSolver):
        taken = [a for a in ("rtol", "atol", "norm")
                 if getattr(solver.root_finder, a) is _FROM_CONTROLLER]
        solver = eqx.tree_at(lambda s: [getattr(s.root_finder, a) for a in taken], solver,
                             [getattr(controller, a) for a in taken])
    term = dfx.ODETerm((lambda t, y, args: vector_field(t, y)) if time_dependent
                       else (lambda t, y, args: vector_field(y)))
    error_order = solver.error_order(term)
    t0 = jnp.zeros((), t1.dtype) if t0 is None else jnp.asarray(t0, t1.dtype)
    t1_clip_floor = _clip_floor(t1)
    unrolled = isinstance(solver, AbstractUnrolledERK)

    def load(row, extra_row):
        # What diffeqsolve does before its loop: the first step and the solver's and the
        # controller's initial states.
        y, aux = start(row, *extra_row)
        tnext, controller_state = controller.init(term, t0, t1, y, dt0, None, solver.func,
                                                  error_order)
        tnext = jnp.minimum(tnext, t1)
        return y, tnext, solver.init(term, t0, tnext, y, None), controller_state, aux

    def step(y, tprev, tnext, solver_state, controller_state):
        return attempt_step(solver, controller, term, error_order, t1, t1_clip_floor, y,
                            tprev, tnext, solver_state, controller_state, select=False)

    def interpolate(tprev, tnext, dense_info, t):
        if unrolled:
            return solver.interpolate(dense_info, tprev, tnext, t)
        return solver.interpolation_cls(t0=tprev, t1=tnext, **dense_info).evaluate(t)

    def locate(tprev, tnext, dense_info, hit):
        # Where `goal` crosses 0 on a step's dense output (as diffrax's root find of a float
        # event, from the step's end); a lane without a crossing gets the step's end.
        def fn(t, _):
            return jnp.where(hit, goal(interpolate(tprev, tnext, dense_info, t)), tnext - t)

        sol = optx.root_find(fn, root_finder, y0=tnext,
                             options=dict(lower=tprev, upper=tnext), throw=False)
        return (sol.value, interpolate(tprev, tnext, dense_info, sol.value),
                sol.result == optx.RESULTS.successful)

    # Shapes of one lane's state, to allocate the lanes and the outputs.
    def row_of(i):
        return y0[i], jtu.tree_map(lambda x: x[i], extra)

    load_shape = jax.eval_shape(load, *row_of(0))
    saved_shape = jax.eval_shape(observe, t0, load_shape[0], load_shape[4])

    def lane_zeros(struct):
        return jtu.tree_map(lambda s: jnp.zeros((lanes, *s.shape), s.dtype), struct)

    y_l, tnext_l, solver_l, controller_l, aux_l = lane_zeros(load_shape)
    state = _Lanes(
        member=jnp.full(lanes, -1, jnp.int32), running=jnp.zeros(lanes, bool), y=y_l,
        tprev=jnp.zeros(lanes, t1.dtype), tnext=tnext_l, solver_state=solver_l,
        controller_state=controller_l, aux=aux_l, steps=jnp.zeros(lanes, jnp.int32),
        save_index=jnp.zeros(lanes, jnp.int32), status=jnp.full(lanes, _RUNNING, jnp.int32))
    outputs = dict(
        saved=jtu.tree_map(lambda s: jnp.full((size, n_save, *s.shape), jnp.inf, s.dtype),
                           saved_shape),
        # The state may be larger than a row of y0 (a phase-space flow's (θ, v)).
        final=jnp.zeros((size, *load_shape[0].shape), load_shape[0].dtype),
        status=jnp.full(size, _RUNNING, jnp.int32),
        steps=jnp.zeros(size, jnp.int32),
        fraction=jnp.zeros(size, t1.dtype),
        t_final=jnp.full(size, t0, t1.dtype),
    )

    def stop(state, done, status):
        # The lanes in `done` stop with `status`. Their members' status, step count and
        # final state stay in the lanes until a lane is refilled or the loop ends
        # (`store_final`): written into the (B,) outputs then, not in every iteration.
        return eqx.tree_at(lambda s: (s.running, s.status), state,
                           (state.running & ~done, jnp.where(done, status, state.status)))

    def store_final(outputs, state, lanes_to_store):
        index = jnp.where(lanes_to_store & (state.member >= 0), state.member, size)
        return outputs | dict(
            final=outputs["final"].at[index].set(state.y, mode="drop"),
            t_final=outputs["t_final"].at[index].set(state.tprev, mode="drop"),
            status=outputs["status"].at[index].set(state.status, mode="drop"),
            steps=outputs["steps"].at[index].set(state.steps, mode="drop"))

    def refill(carry):
        state, outputs, queue = carry
        free = ~state.running
        member = queue + jnp.cumsum(free, dtype=jnp.int32) - 1
        take = free & (member < size)
        outputs = store_final(outputs, state, take)
        y, tnext, solver_state, controller_state, aux = jax.vmap(load)(
            *row_of(jnp.clip(member, 0, size - 1)))
        fresh = _Lanes(
            member=member, running=jnp.ones(lanes, bool), y=y, tprev=jnp.full_like(tnext, t0),
            tnext=tnext, solver_state=solver_state, controller_state=controller_state,
            aux=aux, steps=jnp.zeros(lanes, jnp.int32),
            save_index=jnp.zeros(lanes, jnp.int32), status=jnp.full(lanes, _RUNNING, jnp.int32))
        state = _where(take, fresh, state)
        # A member that starts diverged stops before its first step (as diffrax's event).
        bad = take & jax.vmap(diverged)(state.y)
        state = stop(state, bad, DIVERGED)
        if goal is not None:  # a member that starts at its goal takes no step
            there = take & ~bad & (jax.vmap(goal)(state.y) <= 0)
            state = stop(state, there, REACHED_LOSS)
        return state, outputs, queue + jnp.sum(take, dtype=jnp.int32)

    width = max(1, -(-lanes // _SAVE_SHARE))

    def save(state, outputs, keep, tprev, tnext, dense_info, until):
        # Every save time a lane's accepted step [tprev, tnext] crossed, from the step's
        # dense output. Each pass serves up to `width` lanes that have one left, gathered:
        # a pass over all lanes would evaluate `observe` on every lane, while on average
        # n_save / (steps per member) of them need it (~1/4 on the deep linear benchmark).
        def pending(index):
            return (keep & (index < n_save)
                    & (ts[jnp.minimum(index, n_save - 1)] <= until))

        def select(index):
            # The next pass's lanes, their save slots and their states there. The states are
            # interpolated here and carried into the pass, so XLA holds them as one array:
            # interpolated inside it, the interpolation was fused into each operation of
            # `observe` that reads the state, and computed again in each.
            need = pending(index)
            if width == 1:  # one reduction (`nonzero` is a prefix sum and a scatter)
                lane, valid = jnp.argmax(need)[None], jnp.any(need)[None]
            else:
                (lane,) = jnp.nonzero(need, size=width, fill_value=0)
                valid = jnp.arange(width) < jnp.sum(need)
            at = jnp.minimum(index[lane], n_save - 1)
            y = jax.vmap(interpolate)(tprev[lane], tnext[lane],
                                      jtu.tree_map(lambda x: x[lane], dense_info), ts[at])
            return lane, valid, at, y

        def body(carry):
            index, saved, (lane, valid, at, y) = carry
            values = jax.vmap(observe)(ts[at], y, jtu.tree_map(lambda x: x[lane], state.aux))
            row = jnp.where(valid, state.member[lane], size)
            saved = jtu.tree_map(lambda s, v: s.at[row, at].set(v, mode="drop"), saved,
                                 values)
            index = index.at[lane].add(valid.astype(index.dtype))
            return index, saved, select(index)

        index, saved, _ = jax.lax.while_loop(
            lambda c: c[2][1][0], body,
            (state.save_index, outputs["saved"], select(state.save_index)))
        return eqx.tree_at(lambda s: s.save_index, state, index), outputs | dict(saved=saved)

    def step_lanes(carry):
        # One step attempt on every running lane (the loop's iteration).
        state, outputs, queue, iteration = carry
        running = state.running
        y, tprev, tnext, solver_state, controller_state, keep, dense_info, failed = jax.vmap(
            step)(state.y, state.tprev, state.tnext, state.solver_state,
                  state.controller_state)
        keep = keep & running
        step_start, step_end = state.tprev, state.tnext
        # `y` and `solver_state` are the step's candidates: kept where the step was accepted
        # (one selection here, not one for the acceptance and one for the running lanes).
        y, solver_state = _where(keep, (y, solver_state), (state.y, state.solver_state))
        tprev, tnext, controller_state, steps = _where(
            running, (tprev, tnext, controller_state, state.steps + 1),
            (state.tprev, state.tnext, state.controller_state, state.steps))
        state = eqx.tree_at(
            lambda s: (s.y, s.tprev, s.tnext, s.solver_state, s.controller_state, s.steps),
            state, (y, tprev, tnext, solver_state, controller_state, steps))
        blew_up = running & jax.vmap(diverged)(state.y)
        failed = running & failed
        until, at_goal = step_end, jnp.zeros_like(running)
        if goal is not None:
            # The step crossed the goal: the member stops at the crossing (as a diffrax
            # event: divergence first), and saves after it are not written.
            hit = keep & ~blew_up & ~failed & (jax.vmap(goal)(state.y) <= 0)
            t_hit, y_hit, found = jax.lax.cond(
                jnp.any(hit), jax.vmap(locate),
                lambda a, b, c, d: (b, state.y, jnp.ones_like(d)),
                step_start, step_end, dense_info, hit)
            failed = failed | hit & ~found
            at_goal = hit & found
            until = jnp.where(at_goal, t_hit, step_end)
            state = eqx.tree_at(lambda s: (s.y, s.tprev), state,
                                (_where(at_goal, y_hit, state.y),
                                 jnp.where(at_goal, t_hit, state.tprev)))
        state, outputs = save(state, outputs, keep, step_start, step_end, dense_info, until)
        reached = running & (state.tprev >= t1)
        out_of_steps = running & (state.steps >= max_steps)
        status = jnp.where(blew_up, DIVERGED, jnp.where(failed, FAILED, jnp.where(
            at_goal, REACHED_LOSS, jnp.where(reached, SUCCESS, MAX_STEPS))))
        state = stop(state, blew_up | failed | at_goal | reached | out_of_steps, status)
        if report is not None:
            fraction = outputs["fraction"].at[jnp.where(running, state.member, size)].set(
                state.tprev / t1, mode="drop")
            outputs = outputs | dict(fraction=fraction)
            jax.lax.cond(iteration % 20 == 0,
                         lambda f, o, s: jax.debug.callback(report, members, f, stopped(o, s)),
                         lambda f, o, s: None, fraction, outputs["status"], state)
        return state, outputs, queue, iteration + 1

    def stopped(status, state):
        # (B,): whether each member has stopped, those whose status is still in a lane too.
        index = jnp.where(state.member >= 0, state.member, size)
        return status.at[index].set(state.status, mode="drop") != _RUNNING

    def run_lanes(carry):
        # Refill the free lanes, then step until a lane stops while members wait in the
        # queue (or, once it is empty, until every lane has stopped). The refill sits
        # outside the stepping loop: inside it, its `cond` made XLA copy the lanes' state
        # at every iteration.
        state, outputs, queue, iteration = carry
        state, outputs, queue = refill((state, outputs, queue))

        def stepping(c):
            running = c[0].running
            return jnp.any(running) & (jnp.all(running) | (c[2] >= size))

        return jax.lax.while_loop(stepping, step_lanes, (state, outputs, queue, iteration))

    def cond(carry):
        state, _, queue, _ = carry
        return jnp.any(state.running) | (queue < size)

    state, outputs, _, iterations = jax.lax.while_loop(
        cond, run_lanes,
        (state, outputs, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)))
    outputs = store_final(outputs, state, jnp.ones(lanes, bool))
    if report is not None:
        jax.debug.callback(report, members, outputs["fraction"],
                           outputs["status"] != _RUNNING)
    out = (outputs["saved"], outputs["final"], outputs["status"], outputs["steps"], iterations)
    return (*out, outputs["t_final"]) if return_t_final else out
