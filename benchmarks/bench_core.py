"""Core benchmark: gradient flow of a deep linear net 16-32-32-8 for an ensemble of 64 inits.

    python benchmarks/bench_core.py [--members 64] [--repeats 3]

Problem: n = 128 teacher samples, t ∈ [0, 50], rtol = atol = 1e-8, Tsit5 (diffrax) vs RK45
(scipy, the same Dormand–Prince order 5(4) family). Reported, each with compile time separate
from run time: conservation's ensemble on the moment fast path with the default `batch_size` (4
lanes on CPU, all side by side on GPU) and all 64 in lanes (`batch_size=64`, lockstep); the
naive per-sample loss; a Python loop of one-member calls; scipy `solve_ivp` per member with a
hand-written numpy gradient. Ratios are taken within this one run, relative to the default.
Writes benchmarks/results/core_<backend>.json.
"""

import argparse
import time

import _harness  # noqa: F401  (pins threads before numpy/jax load)
import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

import conservation as cn

WIDTHS = (16, 32, 32, 8)
N, T1, RTOL = 128, 50.0, 1e-8


def build(members: int):
    k_teacher, k_x, k_models = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random(WIDTHS, key=k_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, N, (WIDTHS[0],)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random(WIDTHS, key=k, init_scale=0.7), k_models, members)
    return data, ensemble


def digest(result) -> dict:
    drift = max(float(jnp.max(d)) for d in result.max_drift.values())
    steps = np.asarray(result.num_steps)
    return {"steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
            "max_balance_drift": drift, "status": result.summary()["status"],
            "final_loss_median": float(np.median(np.asarray(result.loss[:, -1])))}


def scipy_ensemble(data, ensemble, ts):
    """solve_ivp(RK45) member by member; the gradient in numpy through the data moments."""
    x, y = np.asarray(data.x), np.asarray(data.y)
    sxx, syx = x.T @ x / N, y.T @ x / N
    shapes = [(o, i) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    sizes = [o * i for o, i in shapes]
    splits = np.cumsum(sizes)[:-1]

    def unpack(v):
        return [p.reshape(s) for p, s in zip(np.split(v, splits), shapes)]

    def rhs(t, v):
        w1, w2, w3 = unpack(v)
        w21 = w2 @ w1
        g = 2.0 * (w3 @ w21 @ sxx - syx)  # ∂L/∂E
        return -np.concatenate(
            [((w3 @ w2).T @ g).ravel(), (w3.T @ g @ w1.T).ravel(), (g @ w21.T).ravel()])

    def balance(ws):
        return [(ws[l + 1].T @ ws[l + 1] - ws[l] @ ws[l].T,
                 np.linalg.norm(ws[l + 1].T @ ws[l + 1]) + np.linalg.norm(ws[l] @ ws[l].T))
                for l in range(len(ws) - 1)]

    drifts, steps, losses = [], [], []
    start = time.perf_counter()
    for i in range(len(ensemble)):
        v0 = np.concatenate([np.asarray(w).ravel() for w in ensemble[i].weights])
        sol = solve_ivp(rhs, (0.0, T1), v0, method="RK45", rtol=RTOL, atol=RTOL, t_eval=ts)
        reference = balance(unpack(v0))
        worst = 0.0
        for column in sol.y.T:
            for (q, _), (q0, scale) in zip(balance(unpack(column)), reference):
                worst = max(worst, float(np.max(np.abs(q - q0)) / scale))
        drifts.append(worst)
        steps.append(sol.nfev // 6)  # RK45 uses 6 evaluations per step (FSAL)
        w1, w2, w3 = unpack(sol.y[:, -1])
        e = w3 @ w2 @ w1
        losses.append(float(np.mean(np.sum((x @ e.T - y) ** 2, axis=1))))
    seconds = time.perf_counter() - start
    return {"run_s": seconds, "compile_s": 0.0, "steps_mean": float(np.mean(steps)),
            "steps_max": int(np.max(steps)), "max_balance_drift": max(drifts),
            "final_loss_median": float(np.median(losses))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-scipy", action="store_true")
    args = parser.parse_args()

    data, ensemble = build(args.members)
    fast = cn.make_objective(cn.MSE(), data, ensemble)
    naive = cn.make_objective(cn.MSE(), data, ensemble, moments=False)
    report = {"problem": {"widths": WIDTHS, "n": N, "t1": T1, "rtol": RTOL, "atol": RTOL,
                          "members": args.members, "solver": "tsit5"}}

    def flow(objective, model, batch_size=None):
        return cn.gradient_flow(objective, model, T1, rtol=RTOL, n_save=51,
                                batch_size=batch_size)

    members = [ensemble[i] for i in range(len(ensemble))]
    programs = {
        "moments": lambda: flow(fast, ensemble),
        "moments_vmap_all": lambda: flow(fast, ensemble, args.members),
        "per_sample": lambda: flow(naive, ensemble),
        "moments_one_at_a_time": lambda: [flow(fast, m) for m in members],
    }
    if not args.skip_scipy:
        programs["scipy_rk45_loop"] = lambda: scipy_ensemble(data, ensemble,
                                                             np.linspace(0.0, T1, 51))
    # Interleaved rounds, best of each (this shared VM drifts by up to ±40% over minutes).
    timings = _harness.timed_interleaved(programs, repeats=args.repeats)
    for label in ("moments", "moments_vmap_all", "per_sample"):
        timing = timings[label]
        report[label] = {k: v for k, v in timing.items() if k != "output"} | digest(
            timing["output"])
    results = timings["moments_one_at_a_time"]["output"]
    report["moments_one_at_a_time"] = {
        "run_s": timings["moments_one_at_a_time"]["run_s"],
        "max_balance_drift": max(max(float(jnp.max(d)) for d in r.max_drift.values())
                                 for r in results)}
    if not args.skip_scipy:
        # Its own clock: numpy's time, no compilation.
        report["scipy_rk45_loop"] = timings["scipy_rk45_loop"]["output"] | {
            "run_s": timings["scipy_rk45_loop"]["run_s"]}
    for label in programs:
        print(label, report[label])

    base = report["moments"]["run_s"]
    report["ratios"] = {
        "per_sample_over_moments": report["per_sample"]["run_s"] / base,
        "vmap_all_over_default": report["moments_vmap_all"]["run_s"] / base,
        "python_loop_over_default": report["moments_one_at_a_time"]["run_s"] / base,
    }
    if "scipy_rk45_loop" in report:
        report["ratios"]["scipy_over_conservation"] = report["scipy_rk45_loop"]["run_s"] / base
    print("ratios", report["ratios"])
    print("wrote", _harness.write("core", report))


if __name__ == "__main__":
    main()
