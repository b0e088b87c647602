"""How many lanes on the CPU: members/s of `gradient_flow` with `batch_size` = 1, 2, 4 lanes.

    python benchmarks/bench_lanes.py [--repeats 2] [--flows dln_small ...] [--quick]

The evidence behind the CPU default `batch_size` (`conservation._dynamics.batching`). Flows
(t1 = 50 unless stated, rtol = atol = 1e-8, 101 saves, the divergence event):

- `dln_small`: bench_core's deep linear 16-32-32-8, n = 128, Tsit5, B = 16;
- `attention_small_stabilized`: Lightning Attention d = 4, 6 tokens, key/value dim 2, n = 16
  (bench_solvers' smoke flow), `solver="stabilized"`, B = 16;
- `attention_small_kvaerno5`: the same flow with Kvaerno5, B = 8;
- `attention_small_tsit5`: the same flow with Tsit5 to t1 = 1 (to t1 = 50 it is stiff), B = 16;
- `attention_stabilized`: bench_solvers' full-size attention (d = 8, 16 tokens, n = 64),
  `solver="stabilized"`, B = 8;
- `dln_mid`: deep linear 64-128-128-32 (28 672 parameters), n = 512, Tsit5, t1 = 20, B = 8;
- `dln_large`: deep linear 128-256-256-32 (106 k parameters), n = 4096, Tsit5, t1 = 20, B = 4.

For each flow and lane count: members/s (best of `--repeats` rounds, all lane counts timed
interleaved, compile apart), the ratio to one lane, steps mean/max, statuses, the largest
difference of the final parameters from the one-lane run (relative to their largest
magnitude: every member takes its own steps whichever loop runs it), and the cost per member
of one batched gradient evaluation at that width (a `fori_loop` of vmapped gradients, ~0.2 s):
lanes share a gradient's per-operation overhead and its reads of what every member reads
alike (the data's moments), and one pass of the loop's own per-iteration overhead.

Writes benchmarks/results/lanes_<backend>.json (`--quick`: lanes_quick_<backend>.json).
"""

import argparse
import time

import _harness  # noqa: F401  (pins threads before numpy/jax load)
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from bench_core import build
from bench_ensembles import _flat, bare_programs
from bench_solvers import _attention_problem

import conservation as cn

LANES = (1, 2, 4)


def _problem(name):
    """(ensemble, objective, solver, t1) of the flow `name`."""
    if name == "dln_small":
        data, ensemble = build(16)
        return ensemble, cn.make_objective(cn.MSE(), data, ensemble), "tsit5", 50.0
    if name in ("dln_mid", "dln_large"):
        widths, n, size = (([64, 128, 128, 32], 512, 8) if name == "dln_mid" else
                           ([128, 256, 256, 32], 4096, 4))
        k_teacher, k_x, k_models = jax.random.split(jax.random.PRNGKey(0), 3)
        data = cn.teacher_dataset(cn.DeepLinear.random(widths, key=k_teacher),
                                  cn.gaussian_inputs(k_x, n, (widths[0],)))
        ensemble = cn.Ensemble.init(
            lambda k: cn.DeepLinear.random(widths, key=k, init_scale=0.7), k_models, size)
        return ensemble, cn.make_objective(cn.MSE(), data, ensemble), "tsit5", 20.0
    small = name.startswith("attention_small")
    make, data, key = _attention_problem(*((4, 6, 2, 16) if small else (8, 16, 2, 64)))
    solver = name.rsplit("_", 1)[1]
    size = 8 if solver == "kvaerno5" or not small else 16
    ensemble = cn.Ensemble.init(make, key, size)
    t1 = 1.0 if solver == "tsit5" else 50.0
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble), solver, t1


def _gradient_cost(objective, ensemble, width):
    """Seconds per member of one vmapped gradient evaluation over `width` members (the bare
    gradients of bench_ensembles)."""
    y0, _, gradients, _ = bare_programs(objective, ensemble)
    y0 = y0[:width]

    def seconds(n):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(gradients(y0, n))
            best = min(best, time.perf_counter() - start)
        return best

    jax.block_until_ready(gradients(y0, 1))
    # Enough evaluations for ~0.2 s: microsecond gradients are lost in the timer's noise.
    n = max(10, int(0.2 / max(seconds(10) / 10, 1e-9)))
    return seconds(n) / (n * width)


def one_flow(name, repeats):
    ensemble, objective, solver, t1 = _problem(name)
    size = ensemble.size
    programs = {lanes: (lambda lanes=lanes: cn.gradient_flow(
        objective, ensemble, t1, rtol=1e-8, solver=solver, batch_size=lanes, progress=False))
        for lanes in LANES if lanes <= size}
    timings = _harness.timed_interleaved(programs, repeats=repeats)
    finals = {}
    out = {"problem": {"solver": solver, "members": size, "t1": t1, "rtol": 1e-8,
                       "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(
                           eqx.filter(ensemble[0], eqx.is_inexact_array))))},
           "lanes": {}}
    for lanes, timing in timings.items():
        result = timing.pop("output")
        finals[lanes] = np.asarray(_flat(result.final)[0])
        steps = np.asarray(result.num_steps)
        out["lanes"][str(lanes)] = timing | {
            "members_per_s": size / timing["run_s"],
            "steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
            "status": result.summary()["status"],
            "max_law_drift": max(float(jnp.max(d)) for d in result.max_drift.values()),
            "gradient_s_per_member": _gradient_cost(objective, ensemble, lanes)}
    one = out["lanes"]["1"]
    scale = np.max(np.abs(finals[1]))
    for lanes, entry in out["lanes"].items():
        entry["speedup_over_one_lane"] = one["run_s"] / entry["run_s"]
        entry["gradient_cost_over_one_lane"] = (entry["gradient_s_per_member"]
                                                / one["gradient_s_per_member"])
        entry["max_final_diff_to_one_lane"] = float(
            np.max(np.abs(finals[int(lanes)] - finals[1])) / scale)
    return out


FLOWS = ("dln_small", "attention_small_tsit5", "attention_small_stabilized",
         "attention_small_kvaerno5", "attention_stabilized", "dln_mid", "dln_large")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="the two smallest flows, one round, to lanes_quick_<backend>.json")
    args = parser.parse_args()
    flows = args.flows or (["dln_small", "attention_small_tsit5"] if args.quick else FLOWS)
    repeats = 1 if args.quick else args.repeats
    report = {"lanes": list(LANES), "flows": {}}
    for name in flows:
        report["flows"][name] = one_flow(name, repeats)
        print(name, {k: round(v["speedup_over_one_lane"], 2)
                     for k, v in report["flows"][name]["lanes"].items()}, flush=True)
    print("wrote", _harness.write("lanes_quick" if args.quick else "lanes", report))


if __name__ == "__main__":
    main()
