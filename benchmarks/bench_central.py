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
whole ensemble at once. Both are measured against a tight reference (the library's flow at
rtol 1e-10) at t1, and timed interleaved in one process (`_harness.timed_interleaved`).

    python benchmarks/bench_central.py [--members 64] [--steps 30] [--rtol 1e-6]

Writes benchmarks/results/central_cpu.json.
"""

import argparse
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


def problem(members: int, init_scale: float):
    """The deep linear net of tests/test_central_flow.py (4-5-5-2, a 4→2 linear teacher of
    scale 2, 32 Gaussian inputs): gradient flow sharpens it past 2/η for lr = 0.12."""
    kt, kx, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random([4, 2], key=kt, init_scale=2.0)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 32, (4,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([4, 5, 5, 2], key=k, init_scale=init_scale), ki,
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.12)
    parser.add_argument("--init-scale", type=float, default=0.2)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--loose-rtol", type=float, default=1e-3,
                        help="a second library run at about the anchor's accuracy")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-rtol", type=float, default=1e-10)
    args = parser.parse_args()
    objective, ensemble, loss, flat = problem(args.members, args.init_scale)
    lr, steps, t1 = args.lr, args.steps, args.lr * args.steps
    p = flat.shape[1]
    field = cn.CentralFlowField(lr, relaxation=float(SUBSTEPS))

    def library(rtol):
        result = cn.gradient_flow(objective, ensemble, t1, n_save=2, solver="tsit5",
                                  rtol=rtol, field=field, laws=[], progress=False)
        final = jnp.stack([jfu.ravel_pytree(eqx.filter(result.final[b],
                                                       eqx.is_inexact_array))[0]
                           for b in range(args.members)])
        return final, result.num_steps, result.status

    start = time.perf_counter()
    reference, _, ref_status = library(args.reference_rtol)
    reference_s = time.perf_counter() - start
    print(f"reference: {reference_s:.1f} s", flush=True)
    step = anchor_step(loss, lr)
    hvp_count = {}

    def anchor():
        final, hvps = run_anchor(step, flat, steps, jax.random.PRNGKey(1))
        hvp_count["hvps"] = hvps
        return final

    timing = _harness.timed_interleaved(
        {"library": lambda: library(args.rtol), "library_loose": lambda: library(
            args.loose_rtol), "anchor": anchor}, repeats=args.repeats)
    anchor_final = timing["anchor"]["output"]

    def error(final):  # per member: ‖θ − θ_ref‖ / ‖θ_ref‖ at t1
        return np.asarray(jnp.linalg.norm(final - reference, axis=1)
                          / jnp.linalg.norm(reference, axis=1))

    # Work counts (each an autodiff pass: a gradient, a Hessian-vector product or the
    # gradient of one, the third derivative). Tsit5: 6 field evaluations per solver step
    # (7 stages, first same as last); each evaluation of the field (dense eigensolver up
    # to 400 parameters) takes 1 gradient + P HVPs + 1 third derivative.
    def library_work(solver_steps):
        evaluations = 6 * int(np.sum(np.asarray(solver_steps)))
        return {"gradients": evaluations, "hvps": evaluations * p, "third": evaluations}

    anchor_substeps = args.members * steps * SUBSTEPS
    anchor_work = {"gradients": anchor_substeps, "hvps": hvp_count["hvps"],
                   "third": anchor_substeps}
    report = {"problem": {"model": "DeepLinear [4, 5, 5, 2]", "parameters": p,
                          "init_scale": args.init_scale, "data": "32 Gaussian inputs, "
                          "linear teacher of scale 2", "lr": lr, "gd_steps": steps, "t1": t1,
                          "members": args.members, "k": 1, "relaxation": SUBSTEPS,
                          "library_rtol": args.rtol, "library_loose_rtol": args.loose_rtol,
                          "anchor_substeps": SUBSTEPS,
                          "anchor_eig_tol": EIG_TOL},
              "reference": {"rtol": args.reference_rtol, "run_s": reference_s,
                            "status": np.asarray(ref_status).tolist()}}
    runs = [("anchor", anchor_work, anchor_final, {})]
    for name in ("library", "library_loose"):
        final, solver_steps, status = timing[name]["output"]
        runs.append((name, library_work(solver_steps), final,
                     {"solver_steps_mean": float(np.mean(np.asarray(solver_steps))),
                      "status": np.asarray(status).tolist()}))
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
    report["ratios"] = {
        f"{what}_{name}_over_anchor": report[name][key] / report["anchor"][key]
        for name in ("library", "library_loose")
        for what, key in (("members_per_s", "members_per_s"), ("error_max", "error_max"),
                          ("autodiff_passes_per_s", "autodiff_passes_per_s"))}
    path = _harness.write("central", report)
    print(path)
    for name in ("library", "library_loose", "anchor"):
        r = report[name]
        print(f"{name}: {r['run_s']:.2f} s, {r['members_per_s']:.2f} members/s, "
              f"error max {r['error_max']:.2e}, work {r['work']}")
    print(report["ratios"])


if __name__ == "__main__":
    main()
