"""A flow's overhead over its bare gradient evaluations, at the CPU default batch.

    python benchmarks/bench_overhead.py [--rounds 7] [--members 64]

bench_core's problem (deep linear 16-32-32-8, n = 128, t1 = 50, rtol = atol = 1e-8, Tsit5)
for an ensemble of 64 members, run by `gradient_flow` at its default `batch_size` (4 lanes on
the CPU, 101 saves of loss, drifts and conditions, the divergence event). Its reference is the
bare cost of the gradients it evaluates: Tsit5 is FSAL, 6 new gradients per step (accepted or
rejected) and one at each member's start, Σ_m (6·steps_m + 1) member-gradients in all; the
bare program is a `fori_loop` of the same vmapped gradient at the same width (2 members), run
Σ/2 times, each evaluation fed into the next (nothing to hoist or fuse away). Variants:

- `flow`: `gradient_flow(...)` as a user calls it (validation, the lanes' loop, the saves);
- `flow_no_saves`: `n_save=2`, no laws (what the loop costs without the monitors);
- `bare_gradients`: the fori_loop above;
- `solver_loop`: the solver alone on the flow's own field: a `fori_loop` of the flow's step
  attempt (`lockstep.attempt_step`: the unrolled Tsit5 step, the flow's controller, the
  accept/reject selection) on the same lanes, as many iterations as the flow's steps fill
  (Σ steps / lanes), a lane that reaches t1 starting again at t = 0 from where it is. No
  saves, laws, divergence check, refill or statuses: what the Runge–Kutta method and its
  controller cost over the gradients they evaluate;
- `flow_2_lanes`, `bare_gradients_2_lanes`: the flow and its bare gradients at 2 lanes (the
  CPU default before 4).
- `step_floor`: the lanes alone, with a field that costs nothing (dy/dt = −c⊙y, P = the
  member's parameters, the same lanes, solver, controller and rtol, 2 saves): what a step
  costs beyond its gradients, per step of all lanes, and times the flow's steps (it takes
  its own number of steps); `step_floor_16_parameters`: the same at 16 parameters (the
  loop's fixed cost per step, its kernels' launches and its scalars).

Every variant is compiled first, then `--rounds` rounds call each once in turn (a slow spell
of the shared machine falls on all alike); the ratios are of the medians (and of the best
rounds, for reference), in wall seconds and in this process's CPU seconds
(`time.process_time`: on a machine shared with other jobs, less of their load leaks into it
than into wall time; JAX's CPU work here runs on one thread). The load average of the machine
is recorded. Goal (issue 24): the
flow ≤ 1.3× its bare gradients. Writes benchmarks/results/overhead_<backend>.json.
"""

import argparse
import os
import statistics
import time

import _harness  # noqa: F401  (pins threads before numpy/jax load)
import equinox as eqx
import jax
import numpy as np
from bench_core import RTOL, T1, WIDTHS, N, build
from bench_ensembles import bare_programs

import conservation as cn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--members", type=int, default=64)
    args = parser.parse_args()

    data, ensemble = build(args.members)
    objective = cn.make_objective(cn.MSE(), data, ensemble)

    def flow():
        return cn.gradient_flow(objective, ensemble, T1, rtol=RTOL, solver="tsit5",
                                progress=False)

    def flow_no_saves():
        return cn.gradient_flow(objective, ensemble, T1, rtol=RTOL, solver="tsit5",
                                progress=False, n_save=2, laws=())

    def flow_2_lanes():
        return cn.gradient_flow(objective, ensemble, T1, rtol=RTOL, solver="tsit5",
                                progress=False, batch_size=2)

    result = jax.block_until_ready(flow())
    width = result.batch_size
    steps = np.asarray(result.num_steps)
    member_gradients = int(np.sum(6 * steps + 1))
    y0, _, gradients, _ = bare_programs(objective, ensemble)

    def bare(lanes):  # the member gradients as batched evaluations at a width of `lanes`
        rows, evaluations = y0[:lanes], -(-member_gradients // lanes)
        return lambda: gradients(rows, evaluations)

    loop = solver_loop(objective, ensemble, width, -(-int(steps.sum()) // width))
    floor = step_floor(width, y0.shape[1])
    floor_16 = step_floor(width, 16)  # the loop's own cost, nearly no vectors
    variants = {"flow": flow, "flow_no_saves": flow_no_saves,
                "bare_gradients": bare(width), "solver_loop": loop, "flow_2_lanes": flow_2_lanes,
                "bare_gradients_2_lanes": bare(2), "step_floor": floor,
                "step_floor_16_parameters": floor_16}
    first = {}
    for name, fn in variants.items():  # compile (and a first run) apart
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
    rounds: dict = {name: [] for name in variants}
    cpu: dict = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            rounds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = {name: statistics.median(r) for name, r in rounds.items()}
    # step attempts of all members (the floor's own: its field is not the flow's)
    floor_steps, floor_16_steps = (int(np.sum(fn()[3])) for fn in (floor, floor_16))
    per_step = median["step_floor"] / (floor_steps / width)  # a step of all lanes
    best = {name: min(r) for name, r in rounds.items()}
    median_cpu = {name: statistics.median(r) for name, r in cpu.items()}
    out = {
        "problem": {"widths": list(WIDTHS), "n": N, "t1": T1, "rtol": RTOL,
                    "members": args.members, "solver": "tsit5", "batch_size": width,
                    "n_save": int(result.loss.shape[1]), "laws": sorted(result.max_drift),
                    "steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
                    "member_gradients": member_gradients,
                    "bare_evaluations": -(-member_gradients // width),
                    "status": result.summary()["status"]},
        "rounds": args.rounds, "load_average": os.getloadavg(),
        "first_call_s": first, "median_s": median, "best_s": best, "rounds_s": rounds,
        "flow_over_bare_median": median["flow"] / median["bare_gradients"],
        "flow_over_bare_best": best["flow"] / best["bare_gradients"],
        "no_saves_over_bare_median": median["flow_no_saves"] / median["bare_gradients"],
        "solver_loop_over_bare_median": median["solver_loop"] / median["bare_gradients"],
        "median_cpu_s": median_cpu, "rounds_cpu_s": cpu,
        "flow_over_bare_median_cpu": median_cpu["flow"] / median_cpu["bare_gradients"],
        "no_saves_over_bare_median_cpu": (median_cpu["flow_no_saves"]
                                          / median_cpu["bare_gradients"]),
        "goal_flow_over_bare": 1.3,
        # The CPU default was 2 lanes until bench_lanes measured 4 faster for Tsit5.
        "flow_2_lanes_over_bare_2_lanes_median": (median["flow_2_lanes"]
                                                  / median["bare_gradients_2_lanes"]),
        "flow_over_flow_2_lanes_median": median["flow"] / median["flow_2_lanes"],
        "step_floor": {
            "parameters": int(y0.shape[1]), "lanes": width, "lane_steps": floor_steps,
            "us_per_step": per_step * 1e6,
            # at the flow's steps (steps of all lanes: lane-steps / lanes)
            "at_flow_steps_s": per_step * int(steps.sum()) / width,
            "flow_minus_bare_s": median["flow"] - median["bare_gradients"],
            "us_per_step_16_parameters": (median["step_floor_16_parameters"]
                                          / (floor_16_steps / width) * 1e6)},
    }
    count = arithmetic(objective, ensemble)
    saves = int(np.sum(np.isfinite(np.asarray(result.loss))))
    bare_flops = member_gradients * (count["gradient"] + count["bare_update"])
    extra = {"solver": int(steps.sum()) * count["step_beyond_gradients"],
             "laws": saves * count["save_laws"], "losses": saves * count["save_loss"]}
    solver_extra_s = median["solver_loop"] - median["bare_gradients"]
    out["arithmetic"] = {
        "flops": count, "member_saves": saves, "bare_flops": bare_flops,
        "extra_over_bare": {k: v / bare_flops for k, v in extra.items()},
        # The rate of the bare loop's own arithmetic, and the time each extra would take at it.
        "bare_gflops_per_s": bare_flops / median["bare_gradients"] / 1e9,
        # None where the solver loop did not measure slower than the bare loop (noise).
        "solver_loop_extra_gflops_per_s": (
            extra["solver"] / solver_extra_s / 1e9 if solver_extra_s > 0 else None)}
    for key in ("problem", "median_s", "flow_over_bare_median", "flow_over_bare_best",
                "no_saves_over_bare_median", "solver_loop_over_bare_median",
                "flow_over_bare_median_cpu",
                "no_saves_over_bare_median_cpu", "flow_2_lanes_over_bare_2_lanes_median",
                "flow_over_flow_2_lanes_median", "step_floor", "arithmetic", "load_average"):
        print(key, out[key])
    print(f"wrote {_harness.write('overhead', out)}")


def _tsit5():
    """The flow's solver and step-size controller at the benchmark's rtol = atol."""
    import jax.numpy as jnp

    from conservation._dynamics.solvers import step_size_controller
    from conservation._dynamics.unrolled import Tsit5

    solver = Tsit5()
    return solver, step_size_controller(solver, jnp.asarray(RTOL), jnp.asarray(RTOL))


def _flow_field(objective, ensemble):
    """(y0, model, term): the members' flat parameters (B, P), the model of one flat row, and
    the field as the flow makes it: the gradient of −L (the sign on the cotangent)."""
    import diffrax as dfx
    from bench_ensembles import _flat

    y0, unravel, static = _flat(ensemble)

    def model(z):
        return eqx.combine(unravel(z), static)

    term = dfx.ODETerm(lambda t, y, args: jax.grad(lambda z: -objective(model(z)))(y))
    return y0, model, term


def solver_loop(objective, ensemble, lanes: int, iterations: int):
    """The flow's step attempts alone on its own field (`solver_loop` in the module's
    docstring), on the first `lanes` members. Returns the run, a callable."""
    import jax.numpy as jnp

    from conservation._dynamics.lockstep import _clip_floor, attempt_step

    y0, _, term = _flow_field(objective, ensemble)
    solver, controller = _tsit5()
    error_order = solver.error_order(term)
    t0, t1 = jnp.zeros(()), jnp.asarray(T1)

    def start(y):
        tnext, controller_state = controller.init(term, t0, t1, y, 0.01, None, solver.func,
                                                  error_order)
        return y, t0, tnext, solver.init(term, t0, tnext, y, None), controller_state

    def attempt(floor, y, tprev, tnext, solver_state, controller_state):
        y, tprev, tnext, solver_state, controller_state = attempt_step(
            solver, controller, term, error_order, t1, floor, y, tprev, tnext, solver_state,
            controller_state)[:5]
        again = tprev >= t1  # start again at t = 0 (the work per step is the same)
        return (y, jnp.where(again, t0, tprev), jnp.where(again, 0.01, tnext), solver_state,
                controller_state)

    @jax.jit
    def run(rows):
        lanes, floor = jax.vmap(start)(rows), _clip_floor(t1)
        return jax.lax.fori_loop(
            0, iterations, lambda i, c: jax.vmap(attempt, (None, 0, 0, 0, 0, 0))(floor, *c),
            lanes)[0]

    rows = y0[:lanes]
    return lambda: run(rows)


def arithmetic(objective, ensemble) -> dict:
    """XLA's flop count (`cost_analysis` of the compiled programs, one member) of what the
    flow computes: a gradient; a step attempt beyond its 6 gradients (the Runge–Kutta
    stages, the error estimate and norm, the controller, the selection); a save's law drifts
    and its loss; and the bare loop's update beyond its gradient."""
    import jax.numpy as jnp

    from conservation._dynamics.lockstep import _clip_floor, attempt_step
    from conservation._dynamics.monitor import LawMonitor

    y0, model, term = _flow_field(objective, ensemble)
    y = y0[0]

    def grad(z):
        return term.vf(None, z, None)

    solver, controller = _tsit5()
    error_order = solver.error_order(term)
    t0, t1, h = jnp.zeros(()), jnp.asarray(T1), jnp.asarray(0.01)
    _, controller_state = controller.init(term, t0, t1, y, 0.01, None, solver.func,
                                          error_order)
    monitor = LawMonitor(tuple(cn.default_laws(ensemble[0])))
    reference = monitor.reference(model(y))

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    gradient = flops(grad, y)
    step = flops(lambda floor, z, f, cs: attempt_step(solver, controller, term, error_order, t1,
                                                      floor, z, t0, h, f, cs)[:5],
                 _clip_floor(t1), y, grad(y), controller_state)
    return {"parameters": int(y.size), "gradient": gradient,
            "step_beyond_gradients": step - 6 * gradient,
            "save_laws": flops(lambda z: monitor.drifts(monitor.values(model(z)), reference), y),
            "save_loss": flops(lambda z: objective(model(z)), y),
            "bare_update": flops(lambda z: z - 1e-12 * grad(z), y) - gradient}


def step_floor(lanes: int, parameters: int):
    """The lanes alone: Tsit5 with the flow's controller on dy/dt = −c⊙y, whose evaluation is
    one multiply, for 64 members of `parameters` numbers on `lanes` lanes. Returns the run,
    a callable (compiled at its first call, as the other variants are)."""
    import jax.numpy as jnp

    from conservation._dynamics.lockstep import solve_lanes

    solver, controller = _tsit5()
    rates = jnp.linspace(0.5, 1.5, parameters)
    ts = jnp.linspace(0.0, T1, 2)
    y0 = jnp.ones((64, parameters))

    @jax.jit
    def run(y0):
        return solve_lanes(lambda y: -rates * y, solver, controller, lambda row: (row, ()),
                           lambda t, y, aux: jnp.sum(y), y0, jnp.asarray(T1), ts, 0.01,
                           lanes=lanes, max_steps=100_000,
                           diverged=lambda y: ~jnp.isfinite(jnp.sum(y * 0)))

    return lambda: run(y0)


if __name__ == "__main__":
    main()
