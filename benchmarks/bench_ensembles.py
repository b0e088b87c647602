"""Ensemble throughput: members/s of a deep-linear gradient flow against the ensemble size B.

    python benchmarks/bench_ensembles.py [--sizes 1 64 1024 8192] [--repeats 2] [--quick]

Problem (as bench_core): deep linear 16-32-32-8, n = 128 teacher samples, t ∈ [0, 50],
rtol = atol = 1e-8, Tsit5, the whole ensemble integrated in lockstep (`batch_size=B`) — the
GPU/TPU default. For every B it reports, compile time apart (best of warm calls,
`block_until_ready`):

- `members_per_s` of `conservation.gradient_flow` (101 saves + the divergence event);
- `bare_solve`: the same diffrax Tsit5 loop saving nothing and with no event;
- `bare_gradients`: the same number of vmapped gradient evaluations in a plain `fori_loop`
  (what the solve would cost with zero per-step overhead) and the overhead ratios;
- `sorted_chunks`: the ensemble split into chunks of members of similar difficulty (sorted by
  the number of steps each needs), which cuts the lockstep waste (mean/max steps);
- `torchdiffeq`: dopri5 with the ensemble as one batched ODE on the same device (float64, the
  same hand-written gradient as bench_core's scipy peer), when torch + torchdiffeq import.

Run it on the 2-core CPU and on a GPU: it writes benchmarks/results/ensembles_<backend>.json.
"""

import argparse
import time

import _harness  # noqa: F401  (pins threads before numpy/jax load)
import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
from bench_core import RTOL, T1, WIDTHS, N, build  # the same problem as bench_core

import conservation as cn


def _flat(ensemble):
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    y0 = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)
    _, unravel = jfu.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], params))
    return y0, unravel, static


def bare_programs(objective, ensemble):
    """(solve, gradients): a diffrax Tsit5 loop with no saving/event, and a fori_loop of the
    same vmapped gradient, both over the flat (B, P) state."""
    y0, unravel, static = _flat(ensemble)

    def grad(y):
        return jax.grad(lambda z: objective(eqx.combine(unravel(z), static)))(y)

    @jax.jit
    def solve(y0, t1, rtol):
        def one(y):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, args: -grad(y)), dfx.Tsit5(), 0.0, t1, None, y,
                saveat=dfx.SaveAt(t1=True),
                stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
                max_steps=100_000, throw=False)
            return sol.ys[-1], sol.stats["num_steps"]
        return jax.vmap(one)(y0)

    @jax.jit
    def shared(y0, t1, rtol):
        # The whole ensemble as ONE flat ODE state (B, P) with one step size: the controller
        # takes the worst member's RMS error, so every member keeps its own tolerance, and no
        # per-member while-loop predicate turns the step into selects over the whole state.
        batched = jax.vmap(grad)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -batched(y)), dfx.Tsit5(), 0.0, t1, None, y0,
            saveat=dfx.SaveAt(t1=True),
            stepsize_controller=dfx.PIDController(
                rtol=rtol, atol=rtol,
                norm=lambda e: jnp.max(jnp.sqrt(jnp.mean(e**2, axis=-1)))),
            max_steps=100_000, throw=False)
        return sol.ys[-1], sol.stats["num_steps"]

    @jax.jit
    def gradients(y0, n):
        batched = jax.vmap(grad)
        return jax.lax.fori_loop(0, n, lambda i, y: y - 1e-12 * batched(y), y0)

    return y0, solve, gradients, shared


def torchdiffeq_run(data, ensemble, members_per_s_only=False):
    try:
        import torch
        from torchdiffeq import odeint
    except ImportError as e:
        return {"skipped": f"torchdiffeq unavailable ({e.name})"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.tensor(np.asarray(data.x), dtype=torch.float64, device=device)
    y = torch.tensor(np.asarray(data.y), dtype=torch.float64, device=device)
    sxx, syx = x.T @ x / N, y.T @ x / N
    shapes = [(o, i) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    sizes = [o * i for o, i in shapes]
    v0 = torch.tensor(np.asarray(_flat(ensemble)[0]), dtype=torch.float64, device=device)
    batch = v0.shape[0]

    def rhs(t, v):
        parts = torch.split(v, sizes, dim=1)
        w1, w2, w3 = (p.reshape(batch, *s) for p, s in zip(parts, shapes))
        w21 = w2 @ w1
        g = 2.0 * (w3 @ w21 @ sxx - syx)
        return -torch.cat([((w3 @ w2).transpose(1, 2) @ g).reshape(batch, -1),
                           (w3.transpose(1, 2) @ g @ w1.transpose(1, 2)).reshape(batch, -1),
                           (g @ w21.transpose(1, 2)).reshape(batch, -1)], dim=1)

    ts = torch.linspace(0.0, T1, 101, dtype=torch.float64, device=device)
    try:
        odeint(rhs, v0, ts[:2], rtol=RTOL, atol=RTOL, method="dopri5")  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        odeint(rhs, v0, ts, rtol=RTOL, atol=RTOL, method="dopri5")
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except RuntimeError as e:  # CUDA out of memory
        return {"failed": str(e).splitlines()[0][:200]}
    return {"run_s": seconds, "members_per_s": batch / seconds, "device": device}


def one_size(b, repeats, with_torch):
    data, ensemble = build(b)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    out = {}

    def flow(members=ensemble):
        return cn.gradient_flow(objective, members, T1, rtol=RTOL, atol=RTOL, solver="tsit5",
                                batch_size=len(members))

    timing = _harness.timed(flow, repeats=repeats)
    result = timing.pop("output")
    steps = np.asarray(result.num_steps)
    out["gradient_flow"] = timing | {
        "members_per_s": b / timing["run_s"], "steps_mean": float(steps.mean()),
        "steps_max": int(steps.max()), "lockstep_efficiency": float(steps.mean() / steps.max()),
        "status": result.summary()["status"],
        "max_balance_drift": max(float(jnp.max(d)) for d in result.max_drift.values())}

    y0, solve, gradients, shared = bare_programs(objective, ensemble)
    t1, rtol = jnp.asarray(T1), jnp.asarray(RTOL)
    bare = _harness.timed(lambda: solve(y0, t1, rtol), repeats=repeats)
    bare_steps = int(np.max(np.asarray(bare.pop("output")[1])))
    evaluations = 6 * bare_steps + 1  # Tsit5 is FSAL: 6 new gradients per step
    grads = _harness.timed(lambda: gradients(y0, evaluations), repeats=repeats)
    grads.pop("output")
    out["bare_solve"] = bare | {"steps_max": bare_steps}
    flat = _harness.timed(lambda: shared(y0, t1, rtol), repeats=repeats)
    flat_y, flat_steps = flat.pop("output")
    out["shared_step_bare_solve"] = flat | {
        "steps": int(flat_steps), "members_per_s": b / flat["run_s"],
        "max_abs_diff_to_lockstep": float(jnp.max(jnp.abs(flat_y - solve(y0, t1, rtol)[0])))}
    out["bare_gradients"] = grads | {"evaluations": evaluations}
    out["overhead"] = {
        "bare_solve_over_gradients": bare["run_s"] / grads["run_s"],
        "flow_over_bare_solve": timing["run_s"] / bare["run_s"],
        "flow_over_gradients": timing["run_s"] / grads["run_s"],
        "seconds_per_step_beyond_gradients": (bare["run_s"] - grads["run_s"]) / bare_steps}

    if b >= 64:
        # Members of similar difficulty together: sort by the steps each needed, run chunks.
        order = np.argsort(steps)
        chunks = 4 if b >= 1024 else 2
        parts = [cn.Ensemble.stack([ensemble[int(i)] for i in part])
                 for part in np.array_split(order, chunks)]

        def chunked():
            return [flow(p).num_steps for p in parts]

        sorted_timing = _harness.timed(chunked, repeats=repeats)
        sorted_timing.pop("output")
        out["sorted_chunks"] = sorted_timing | {"chunks": chunks,
                                                "members_per_s": b / sorted_timing["run_s"]}
    if with_torch:
        out["torchdiffeq"] = torchdiffeq_run(data, ensemble)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    gpu = jax.default_backend() != "cpu"
    sizes = args.sizes or ([8, 64] if args.quick else
                           [1, 64, 1024, 8192] if gpu else [1, 16, 64])
    report = {"problem": {"widths": WIDTHS, "n": N, "t1": T1, "rtol": RTOL, "atol": RTOL,
                          "solver": "tsit5", "lockstep": True}, "sizes": {}}
    for b in sizes:
        report["sizes"][str(b)] = one_size(b, args.repeats, with_torch=not args.no_torch)
        print(b, {k: (v.get("members_per_s"), v.get("run_s")) if isinstance(v, dict) else v
                  for k, v in report["sizes"][str(b)].items()}, flush=True)
    print("wrote", _harness.write("ensembles", report))


if __name__ == "__main__":
    main()
