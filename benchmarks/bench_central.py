"""The central flow for an ensemble in one compiled program against the anchor's method, one
seed at a time, on the same problem (issue 25's benchmark).

The anchor is `alex-damian/central_flows_jax` (`Flow.central`, `central_flow_substep`,
`compute_eigs`, `sdcp.py`). It cannot be installed here (it needs cvxpy and flax), so its
loop for gradient descent is re-implemented below, step for step: per GD step a jitted
`lax.scan` over 4 Euler substeps (dt = 1/4 step); in each substep the gradient, the top
eigenpair of the effective Hessian ηH by `jax.experimental.sparse.linalg.lobpcg_standard`
warm-started from the previous substep's eigenvector (the anchor's tolerance 1e-5 / (10 P)),
the third derivative ∇(uᵀHu), and the complementarity problem of the projected Euler step
(for k = 1 the anchor's cvxpy program min ½βx² + αx over x ≥ 0 has the answer
x = max(0, −α/β), used here); a Python loop over steps with `jax.device_get` of the step's
outputs, as the anchor's example does. Differences from the anchor, on purpose: float64 (the
anchor runs float32) and k = 1 (no cvxpy).

The library integrates `CentralFlowField(lr, relaxation=4)` (the anchor's projection over a
substep dt holds the eigenvalue with rate 1/dt = 4 per step: the same flow) with Tsit5 for the
whole ensemble at once, at several tolerances, with the dense Hessian and with Lanczos
(`--lanczos-steps`). All runs are measured against a tight reference (the library's flow at
rtol 1e-10, dense) at t1, and timed interleaved in one process
(`_harness.timed_interleaved`; compile time apart). The JSON also records where the members
are relative to the edge along the reference (ηS, σ², the steps with the oscillation on),
the work counts, the ratios to the anchor (also at matched accuracy) and the load average.
tests/test_bench_central.py checks that one anchor step is 4 Euler steps of the field.

    python benchmarks/bench_central.py [--members 64] [--steps 30] [--rtols 1e-3 1e-4 1e-6]

Writes benchmarks/results/central_cpu.json (about 6 minutes on 2 loaded cores); then
`python benchmarks/docs_tables.py` refreshes benchmarks/results/tables/central.md.
"""

import argparse
import json
import os
import time

import _harness
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse.linalg import lobpcg_standard

import conservation as cn

SUBSTEPS = 4  # the anchor's default `substeps`
EIG_TOL = 1e-5  # the anchor's `compute_eigs` default
OUTPUTS = 1


def problem(members: int, init_scale: float, outputs: int = OUTPUTS):
    """A 4-5-5-`outputs` deep linear net (init `init_scale`), a 4→`outputs` linear teacher of
    scale 2, 32 Gaussian inputs: gradient flow sharpens it past 2/η for lr = 0.12. With one
    output (the default) the top Hessian eigenvalue stays well separated at the edge (ηλ₂ ≈
    0.8 while ηλ₁ = 2); with two (the net of tests/test_central_flow.py) ηλ₂ rises to ≈ 1.98,
    the top two eigenvalues cross, the k = 1 field jumps between eigenvectors and no adaptive
    solver reaches a tight reference (steps grow ×10 per decade of rtol)."""
    kt, kx, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random([4, outputs], key=kt, init_scale=2.0)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 32, (4,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([4, 5, 5, outputs], key=k, init_scale=init_scale),
        ki,
        members)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    params, static = eqx.partition(ensemble[0], eqx.is_inexact_array)
    unravel = jfu.ravel_pytree(params)[1]

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    flat = jnp.stack([jfu.ravel_pytree(eqx.filter(ensemble[b], eqx.is_inexact_array))[0]
                      for b in range(members)])
    return objective, ensemble, loss, flat


def anchor_step(loss, lr):
    """One GD step of the anchor's central flow (`Flow.central` with k = 1): a jitted scan
    over `SUBSTEPS` projected Euler substeps. Returns (w, V), (HVPs, third derivatives)."""
    grad = jax.grad(loss)
    dt = 1.0 / SUBSTEPS

    def hvp_at(w):
        return lambda v: jax.jvp(grad, (w,), (v,))[1]

    def substep(carry, _):
        w, ref = carry
        g = grad(w)
        hvp = hvp_at(w)
        # The effective Hessian P^{-1/2} H P^{-1/2} = ηH for GD (P = I/η).
        evals, v, iters = lobpcg_standard(jax.vmap(lambda x: lr * hvp(x), 1, 1), ref,
                                          tol=EIG_TOL / (10 * w.shape[0]))
        u = jnp.sqrt(lr) * v[:, 0]  # U = P^{-1/2} V
        d_h = jax.grad(lambda z: jnp.vdot(u, hvp_at(z)(u)))(w)  # ∇(uᵀHu)
        dw_stable, dw_x = -lr * g, -0.5 * lr * d_h
        alpha = (2 - evals[0]) + dt * (-(d_h @ dw_stable))
        beta = dt * (-(d_h @ dw_x))
        x = jnp.where(alpha >= 0, 0.0, jnp.maximum(0.0, -alpha / beta))
        matvecs = 4 * iters + 2  # the anchor's count k(4·iters + 1) + 1, k = 1
        return (w + dt * (dw_stable + dw_x * x), v), matvecs

    @jax.jit
    def step(w, ref):
        (w, ref), matvecs = jax.lax.scan(substep, (w, ref), None, length=SUBSTEPS)
        return w, ref, jnp.sum(matvecs)

    return step


def run_anchor(step, flat, steps, key):
    """The anchor's driver: one seed at a time, a Python loop over GD steps."""
    finals, hvps = [], 0
    for b in range(flat.shape[0]):
        w = flat[b]
        ref = jax.random.normal(jax.random.fold_in(key, b), (w.shape[0], 1))
        for _ in range(steps):
            w, ref, matvecs = step(w, ref)
            hvps += int(jax.device_get(matvecs))
        finals.append(w)
    return jnp.stack(finals), hvps


def _flat(model):
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


# θ itself as a law, kept at every save of the reference: where the edge of stability is.
PARAMETERS = cn.FunctionLaw(_flat, "parameters")


def edge_report(field, loss, trajectory, lr):
    """Where the members are relative to the edge along the reference (B, T, P) at the GD
    steps 0..T−1: ηS, the oscillation X, the first step with ηS ≥ 1.99 and the steps with
    the oscillation on (X > 0), per member."""
    grad = jax.grad(loss)
    b, t, p = trajectory.shape
    seen = jax.jit(lambda ys: jax.lax.map(lambda y: field.oscillation(grad, y, loss), ys))(
        trajectory.reshape(b * t, p))
    eta_s = np.asarray(lr * seen.eigenvalues[:, 0]).reshape(b, t)
    x = np.asarray(seen.covariance[:, 0, 0]).reshape(b, t)
    at_edge = eta_s >= 1.99
    first = np.where(at_edge.any(axis=1), np.argmax(at_edge, axis=1), -1)
    reached = first >= 0
    return {
        "eta_sharpness_start": _stats(eta_s[:, 0]),
        "eta_sharpness_end": _stats(eta_s[:, -1]),
        "members_reaching_edge": int(reached.sum()),
        "members_oscillating_at_t1": int(np.sum(x[:, -1] > 0)),
        "first_edge_step": _stats(first[reached]) if reached.any() else None,
        "steps_oscillating": _stats(np.sum(x[:, 1:] > 0, axis=1)),
        "sigma2_end": _stats(x[:, -1]),
        "note": "ηS and the oscillation X = σ² of the central flow along the reference at "
                "every GD step; 'at the edge' = ηS ≥ 1.99; steps_oscillating counts the GD "
                "steps with X > 0 (the central flow differs from gradient flow there)",
    }


def _stats(a):
    a = np.asarray(a, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.12)
    parser.add_argument("--init-scale", type=float, default=0.2)
    parser.add_argument("--rtols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-6],
                        help="the library's tolerances, timed interleaved with the anchor")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lanczos-steps", type=int, default=12)
    parser.add_argument("--reference-rtol", type=float, default=1e-10)
    args = parser.parse_args()
    load_start = os.getloadavg()
    objective, ensemble, loss, flat = problem(args.members, args.init_scale)
    lr, steps, t1 = args.lr, args.steps, args.lr * args.steps
    p = flat.shape[1]
    field = cn.CentralFlowField(lr, relaxation=float(SUBSTEPS))
    # The same field with the top eigenpair from `lanczos_steps` Lanczos steps instead of the
    # dense Hessian (P products): closer to the anchor's LOBPCG in work per evaluation.
    lanczos = cn.CentralFlowField(lr, relaxation=float(SUBSTEPS), eigensolver="lanczos",
                                  lanczos_steps=args.lanczos_steps)

    def library(rtol, n_save=2, values="final", f=field):
        result = cn.gradient_flow(objective, ensemble, t1, n_save=n_save, solver="tsit5",
                                  rtol=rtol, field=f, laws=[PARAMETERS], values=values,
                                  progress=False)
        return result.final_values[PARAMETERS.name], result.num_steps, result.status, result

    step = anchor_step(loss, lr)
    hvp_count = {}

    def anchor():
        final, hvps = run_anchor(step, flat, steps, jax.random.PRNGKey(1))
        hvp_count["hvps"] = hvps
        return final

    variants = {f"library_rtol_{rtol:g}": (lambda rtol=rtol: library(rtol)[:3])
                for rtol in args.rtols}
    variants |= {f"library_lanczos_rtol_{rtol:g}": (
        lambda rtol=rtol: library(rtol, f=lanczos)[:3]) for rtol in args.rtols}
    hvps_per_evaluation = {name: (args.lanczos_steps if "lanczos" in name else p)
                           for name in variants}
    rtol_of = {name: rtol for name, rtol in zip(variants, 2 * args.rtols)}
    # The first call of the first library variant compiles the flow (rtol is traced: one
    # program for every tolerance, the reference's included).
    timing = _harness.timed_interleaved({**variants, "anchor": anchor}, repeats=args.repeats)
    print("timed", flush=True)
    start = time.perf_counter()
    reference, ref_steps, ref_status, ref_result = library(
        args.reference_rtol, n_save=steps + 1, values=[PARAMETERS.name])
    jax.block_until_ready(reference)
    reference_s = time.perf_counter() - start
    print(f"reference: {reference_s:.1f} s", flush=True)
    edge = edge_report(field, loss, ref_result.values[PARAMETERS.name], lr)
    anchor_final = timing["anchor"]["output"]

    def error(final):  # per member: ‖θ − θ_ref‖ / ‖θ_ref‖ at t1
        return np.asarray(jnp.linalg.norm(final - reference, axis=1)
                          / jnp.linalg.norm(reference, axis=1))

    # Work counts (each an autodiff pass: a gradient, a Hessian-vector product or the
    # gradient of one, the third derivative). Tsit5: 6 field evaluations per accepted or
    # rejected solver step (7 stages, first same as last); each evaluation of the field
    # (dense eigensolver up to 400 parameters) takes 1 gradient + P HVPs + 1 third
    # derivative.
    def library_work(solver_steps, hvps):
        evaluations = 6 * int(np.sum(np.asarray(solver_steps)))
        return {"gradients": evaluations, "hvps": evaluations * hvps, "third": evaluations}

    anchor_substeps = args.members * steps * SUBSTEPS
    anchor_work = {"gradients": anchor_substeps, "hvps": hvp_count["hvps"],
                   "third": anchor_substeps}
    report = {
        "problem": {"model": f"DeepLinear [4, 5, 5, {OUTPUTS}]", "parameters": p,
                    "init_scale": args.init_scale, "data": "32 Gaussian inputs, "
                    f"linear teacher 4→{OUTPUTS} of scale 2", "lr": lr, "two_over_lr": 2 / lr,
                    "gd_steps": steps, "t1": t1, "members": args.members, "k": 1,
                    "relaxation": SUBSTEPS, "library_solver": "tsit5",
                    "library_rtols": args.rtols,
                    "library_lanczos_steps": args.lanczos_steps, "anchor_substeps": SUBSTEPS,
                    "anchor_eig_tol": EIG_TOL, "repeats": args.repeats},
        "edge_of_stability": edge,
        "reference": {"rtol": args.reference_rtol, "run_s": reference_s,
                      "solver_steps_mean": float(np.mean(np.asarray(ref_steps))),
                      "status": sorted(set(ref_result.status_names()))},
        "error": "per member ‖θ(t1) − θ_ref(t1)‖ / ‖θ_ref(t1)‖ against the reference "
                 "(the library's flow at the reference rtol); the anchor is forward Euler "
                 "with dt = η/4 on the same field, an O(dt) error",
    }
    runs = [("anchor", anchor_work, anchor_final, {})]
    for name in variants:
        final, solver_steps, status = timing[name]["output"]
        names = sorted({cn.STATUS_NAMES[int(s)] for s in np.asarray(status)})
        runs.append((name, library_work(solver_steps, hvps_per_evaluation[name]), final,
                     {"solver_steps_mean": float(np.mean(np.asarray(solver_steps))),
                      "rtol": rtol_of[name], "status": names}))
    for name, work, final, extra in runs:
        run_s = timing[name]["run_s"]
        err = error(final)
        passes = sum(work.values())
        report[name] = {"run_s": run_s, "first_call_s": timing[name]["first_call_s"],
                        "compile_s": timing[name]["compile_s"],
                        "members_per_s": args.members / run_s, "work": work,
                        "autodiff_passes_per_s": passes / run_s,
                        "gradients_per_s": work["gradients"] / run_s,
                        "error_max": float(err.max()), "error_median": float(np.median(err)),
                        **extra}
    anchor_r = report["anchor"]
    report["ratios"] = {name: {
        "members_per_s_over_anchor": report[name]["members_per_s"] / anchor_r["members_per_s"],
        "gradients_per_s_over_anchor": report[name]["gradients_per_s"]
        / anchor_r["gradients_per_s"],
        "autodiff_passes_per_s_over_anchor": report[name]["autodiff_passes_per_s"]
        / anchor_r["autodiff_passes_per_s"],
        "error_max_over_anchor": report[name]["error_max"] / anchor_r["error_max"]}
        for name in variants}
    # Equal accuracy: the loosest library tolerance whose worst member is at least as close
    # to the reference as the anchor's worst member.
    report["matched_accuracy"] = {}
    for eig in ("dense", "lanczos"):
        matched = [name for name in variants if ("lanczos" in name) == (eig == "lanczos")
                   and report[name]["error_max"] <= anchor_r["error_max"]]
        loosest = max(matched, key=rtol_of.get, default=None)
        report["matched_accuracy"][eig] = None if loosest is None else {
            "library": loosest, **report["ratios"][loosest]}
    report["load_average"] = {"start": list(load_start), "end": list(os.getloadavg()),
                              "cores": os.cpu_count()}
    path = _harness.write("central", report)
    print(path)
    for name in (*variants, "anchor"):
        r = report[name]
        print(f"{name}: {r['run_s']:.2f} s, {r['members_per_s']:.2f} members/s, "
              f"error max {r['error_max']:.2e}, work {r['work']}")
    print(json.dumps({"edge": edge, "matched": report["matched_accuracy"],
                      "load": report["load_average"]}, indent=1))


if __name__ == "__main__":
    main()
