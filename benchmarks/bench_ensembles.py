"""Ensemble throughput: members/s of a deep-linear gradient flow against the ensemble size B.

    python benchmarks/bench_ensembles.py [--sizes 1 64 1024 8192] [--repeats 2] [--quick]

Problem (as bench_core): deep linear 16-32-32-8, n = 128 teacher samples, t ∈ [0, 50],
rtol = atol = 1e-8, Tsit5, 101 saves of the loss and every law's drift and condition, the
divergence event. For every B it reports, compile time apart (best of warm calls,
`block_until_ready`):

- `lanes`: `conservation.gradient_flow` with all B members side by side (`batch_size=B`,
  the GPU/TPU default while they fit), its members/s, steps mean/max and lockstep
  efficiency (mean/max steps: the loop runs the slowest member's steps);
- `refill`: B/4 lanes, each loading the next member when its own finishes;
- `one_at_a_time`: `batch_size=1` (CPU only: on a GPU it is B × the B = 1 row; the CPU
  default is 4 lanes for Tsit5, see bench_lanes.py);
- `lanes_diffrax_tsit5`, `one_at_a_time_diffrax_tsit5`: the same with diffrax's own Tsit5
  (its stages in a loop) instead of the library's unrolled one;
- `diffrax_vmap`: the loop the library used before, `jax.vmap` of one `diffrax.diffeqsolve`
  per member with diffrax's Tsit5 and the same saves and event, in the same run;
- `bare_solve`: that vmapped diffrax Tsit5 loop saving nothing and with no event;
- `bare_gradients`: the same number of vmapped gradient evaluations as the loop makes
  (6 per step of the slowest member) in a plain `fori_loop`: what the flow would cost with
  zero per-step overhead, and the overhead ratios;
- `torchdiffeq`: dopri5 with the ensemble as one batched ODE on the same device (float64, the
  same hand-written gradient as bench_core's scipy peer), when torch + torchdiffeq import.

Run it on the 2-core CPU and on a GPU: it writes benchmarks/results/ensembles_<backend>.json
(`--quick`: ensembles_quick_<backend>.json).
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
from conservation._dynamics.monitor import LawMonitor


def _flat(ensemble):
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    y0 = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)
    _, unravel = jfu.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], params))
    return y0, unravel, static


def bare_programs(objective, ensemble):
    """(y0, solve, gradients, previous) over the flat (B, P) state: a vmapped diffrax Tsit5
    loop with no saving or event; a fori_loop of the same vmapped gradient; and the loop the
    library ran before the lanes (vmapped diffeqsolve, diffrax's Tsit5, the same saves of
    loss, drifts and conditions, and the divergence event)."""
    y0, unravel, static = _flat(ensemble)
    monitor = LawMonitor(tuple(cn.default_laws(ensemble[0])))

    def as_model(y):
        return eqx.combine(unravel(y), static)

    def grad(y):
        return jax.grad(lambda z: objective(as_model(z)))(y)

    def diffrax_solve(y, t1, rtol, saveat, event=None):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -grad(y)), dfx.Tsit5(), 0.0, t1, 0.01, y,
            saveat=saveat, stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            max_steps=100_000, throw=False, event=event)

    @jax.jit
    def solve(y0, t1, rtol):
        def one(y):
            sol = diffrax_solve(y, t1, rtol, dfx.SaveAt(t1=True))
            return sol.ys[-1], sol.stats["num_steps"]
        return jax.vmap(one)(y0)

    @jax.jit
    def previous(y0, t1, rtol):
        ts = jnp.linspace(0.0, t1, 101)

        def one(y):
            reference = monitor.reference(as_model(y))

            def observe(t, y, args):
                values = monitor.values(as_model(y))
                return (objective(as_model(y)), monitor.drifts(values, reference),
                        monitor.conditions(as_model(y)))

            sol = diffrax_solve(
                y, t1, rtol, dfx.SaveAt(subs=[dfx.SubSaveAt(ts=ts, fn=observe),
                                              dfx.SubSaveAt(t1=True)]),
                dfx.Event(lambda t, y, args, **kwargs: ~(jnp.linalg.norm(y) < 1e8)))
            return sol.ys[0][0], sol.stats["num_steps"]
        return jax.vmap(one)(y0)

    @jax.jit
    def gradients(y0, n):
        batched = jax.vmap(grad)
        return jax.lax.fori_loop(0, n, lambda i, y: y - 1e-12 * batched(y), y0)

    return y0, solve, gradients, previous


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


def one_size(b, repeats, with_torch, cpu):
    data, ensemble = build(b)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    out = {}

    def flow(batch, solver="tsit5"):
        return cn.gradient_flow(objective, ensemble, T1, rtol=RTOL, atol=RTOL, solver=solver,
                                batch_size=batch)

    # label: (lanes, solver); "tsit5" is diffrax's tableau with its stages unrolled, the
    # `_diffrax_tsit5` rows run diffrax's own Tsit5 (its stage loop) in the same loop.
    variants = {"lanes": (b, "tsit5"), "lanes_diffrax_tsit5": (b, dfx.Tsit5())}
    if b >= 16:
        variants["refill"] = (b // 4, "tsit5")
    if cpu and b > 1:
        variants["one_at_a_time"] = (1, "tsit5")
        variants["one_at_a_time_diffrax_tsit5"] = (1, dfx.Tsit5())
    y0, solve, gradients, previous = bare_programs(objective, ensemble)
    t1, rtol = jnp.asarray(T1), jnp.asarray(RTOL)
    # The bare gradients replay the evaluations of the slowest member's steps.
    bare_steps = int(np.max(np.asarray(jax.block_until_ready(solve(y0, t1, rtol))[1])))
    evaluations = 6 * bare_steps + 1  # Tsit5 is FSAL: 6 new gradients per step
    programs = {label: (lambda batch=batch, solver=solver: flow(batch, solver))
                for label, (batch, solver) in variants.items()}
    programs |= {"diffrax_vmap": lambda: previous(y0, t1, rtol),
                 "bare_solve": lambda: solve(y0, t1, rtol),
                 "bare_gradients": lambda: gradients(y0, evaluations)}
    timings = _harness.timed_interleaved(programs, repeats=repeats)

    losses = {}
    for label, (batch, _) in variants.items():
        timing = timings[label]
        result = timing.pop("output")
        steps = np.asarray(result.num_steps)
        losses[label] = np.asarray(result.loss)
        out[label] = timing | {
            "lanes": batch, "members_per_s": b / timing["run_s"],
            "steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
            "status": result.summary()["status"],
            "max_balance_drift": max(float(jnp.max(d)) for d in result.max_drift.values())}
    losses["diffrax_vmap"] = np.asarray(timings["diffrax_vmap"].pop("output")[0])
    old = timings["diffrax_vmap"]
    out["diffrax_vmap"] = old | {"members_per_s": b / old["run_s"]}
    for label in losses:  # every variant integrates every member with its own steps
        out[label]["max_rel_loss_diff_to_lanes"] = float(np.max(
            np.abs(losses[label] - losses["lanes"]) / losses["lanes"][:, :1]))
    bare, grads = timings["bare_solve"], timings["bare_gradients"]
    bare.pop("output"), grads.pop("output")
    out["bare_solve"] = bare | {"steps_max": bare_steps}
    out["bare_gradients"] = grads | {"evaluations": evaluations}
    lanes = out["lanes"]
    # All B members start together: the loop runs the slowest member's steps.
    lanes["lockstep_efficiency"] = lanes["steps_mean"] / lanes["steps_max"]
    out["overhead"] = {
        "bare_solve_over_gradients": bare["run_s"] / grads["run_s"],
        "flow_over_gradients": lanes["run_s"] / grads["run_s"],
        "diffrax_vmap_over_lanes": old["run_s"] / lanes["run_s"],
        "seconds_per_step_beyond_gradients":
            (lanes["run_s"] - grads["run_s"]) / lanes["steps_max"]}
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
    cpu = jax.default_backend() == "cpu"
    sizes = args.sizes or ([8, 64] if args.quick else
                           [1, 16, 64] if cpu else [1, 64, 1024, 8192])
    report = {"problem": {"widths": WIDTHS, "n": N, "t1": T1, "rtol": RTOL, "atol": RTOL,
                          "solver": "tsit5", "lockstep": True}, "sizes": {}}
    name = "ensembles_quick" if args.quick else "ensembles"
    for b in sizes:
        report["sizes"][str(b)] = one_size(b, args.repeats, with_torch=not args.no_torch,
                                           cpu=cpu)
        print(b, {k: (v.get("members_per_s"), v.get("run_s")) if isinstance(v, dict) else v
                  for k, v in report["sizes"][str(b)].items()}, flush=True)
        path = _harness.write(name, report)  # after every size: a timeout keeps what finished
    print("wrote", path)


if __name__ == "__main__":
    main()
