"""Device memory of a flow against the library's estimate, and the default `batch_size` it picks.

    python benchmarks/bench_memory.py [--quick] [--cases deep_linear_B8192 large_B256]

Each case runs in a fresh process, so that the allocator's peak (`peak_bytes_in_use`) is that
case's alone:

- `deep_linear_B8192`: bench_core's deep linear flow (16-32-32-8, n = 128, t1 = 50, rtol 1e-8,
  Tsit5) with 8192 members and the default `batch_size` (on an accelerator: as many lanes as
  fit in 3/4 of its free memory);
- `large_B256`: the 106 k-parameter deep linear flow of bench_solvers' `large_model`
  (128-256-256-32, n = 4096, t1 = 200) with 256 members, the stabilised solver.

Each records the lanes the default resolved to (`Result.batch_size`), the run's status and
wall time (compile included), the device's bytes in use before the flow and its peak after,
and the estimate `gradient_flow` checks before it allocates (`MemoryEstimate`, per part). On
the CPU the allocator reports nothing: there it runs only with `--quick` (a smoke run, its memory
fields null).
Writes benchmarks/results/memory_<backend>.json (`--quick`: memory_quick_<backend>.json).
"""

import argparse
import json
import subprocess
import sys
import time

import _harness

CASES = {  # name: (widths, n, members, t1, solver); --quick shrinks them
    "deep_linear_B8192": ([16, 32, 32, 8], 128, 8192, 50.0, "tsit5"),
    "large_B256": ([128, 256, 256, 32], 4096, 256, 200.0, "stabilized"),
}
QUICK = {
    "deep_linear_B8192": ([16, 32, 32, 8], 128, 16, 5.0, "tsit5"),
    "large_B256": ([16, 32, 32, 8], 256, 4, 20.0, "stabilized"),
}


def one_case(widths, n, members, t1, solver) -> dict:
    """Run one flow in this process and measure it (call in a fresh process)."""
    import equinox as eqx
    import jax
    import numpy as np

    import conservation as cn
    from conservation._dynamics.batching import check_flow_memory

    def stats():
        try:
            return jax.devices()[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 — the CPU reports none
            return {}

    k = jax.random.split(jax.random.PRNGKey(5), 3)
    teacher = cn.DeepLinear.random(widths, key=k[0])
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k[1], n, (widths[0],)))
    ensemble = cn.Ensemble.init(
        lambda key: cn.DeepLinear.random(widths, key=key, init_scale=0.7), k[2], members)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    jax.block_until_ready(ensemble.models)
    before = stats().get("bytes_in_use")
    start = time.perf_counter()
    result = cn.gradient_flow(objective, ensemble, t1, rtol=1e-8, atol=1e-8, solver=solver)
    jax.block_until_ready(result.loss)
    seconds = time.perf_counter() - start
    after = stats()
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    laws = cn.default_laws(ensemble[0])
    estimate = check_flow_memory(objective, params, static, laws, (), True, solver, 101,
                                 result.batch_size, ensemble.size)
    peak = after.get("peak_bytes_in_use")
    loss = np.asarray(result.loss)
    return {
        "widths": widths, "n": n, "members": members, "t1": t1, "solver": result.solver,
        "parameters": int(sum(a * b for a, b in zip(widths, widths[1:]))),
        "batch_size_default": result.batch_size,
        "status": result.summary()["status"], "wall_s_with_compile": seconds,
        "steps_max": int(np.max(np.asarray(result.num_steps))),
        "final_loss_over_start_max": float(np.max(loss[:, -1] / loss[:, 0])),
        "bytes_limit": after.get("bytes_limit"), "bytes_in_use_before": before,
        "peak_bytes_in_use": peak,
        "estimate_bytes": estimate.total, "estimate_parts": estimate.parts,
        "peak_minus_before_over_estimate":
            None if peak is None or before is None else (peak - before) / estimate.total,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--case-json", help=argparse.SUPPRESS)  # the child process's case
    args = parser.parse_args()
    if args.case_json:
        print(json.dumps(one_case(*json.loads(args.case_json))))
        return
    import jax

    if jax.default_backend() == "cpu" and not args.quick:
        # (run_all.py runs every benchmark: this one has nothing to measure on the CPU)
        print("bench_memory.py measures an accelerator's memory peak, which the CPU does not "
              "report: nothing to do here (--quick runs the small cases as a smoke test)")
        return
    report = {"cases": {}}
    name = "memory_quick" if args.quick else "memory"
    for case in args.cases:
        spec = (QUICK if args.quick else CASES)[case]
        done = subprocess.run([sys.executable, __file__, "--case-json", json.dumps(spec)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            report["cases"][case] = json.loads(done.stdout.strip().splitlines()[-1])
        else:  # out of memory or another failure: say so, keep the other cases
            report["cases"][case] = {"failed": done.stderr.strip().splitlines()[-1:]}
        print(case, report["cases"][case], flush=True)
        path = _harness.write(name, report)  # after every case: a timeout keeps what finished
    print("wrote", path)


if __name__ == "__main__":
    main()
