"""The anchor loop re-implemented in benchmarks/bench_central.py (`alex-damian/central_flows_jax`,
k = 1) is forward Euler, dt = 1/4 GD step, on the central flow with relaxation κη = 4: checked
against that equation written here from the dense Hessian and `numpy.linalg.eigh`."""

import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    # bench_central imports benchmarks/_harness.py, which sets thread and equinox variables
    # in os.environ: keep them out of the rest of the test session.
    saved_env, saved_path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("_bench_central", BENCH / "bench_central.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        sys.modules.pop("_harness", None)
    return module


def _euler_steps(loss, w, lr, substeps):
    """`substeps` Euler steps of dt = η/substeps (flow time t = η·step) on
    dθ/dt = −∇L − ½σ²∇S, σ² = max(0, −2q/‖∇S‖²), q = κ(2 − ηS)/η + ⟨∇S, ∇L⟩,
    κ = substeps/η, from the dense Hessian's top eigenpair (numpy.linalg.eigh); and the
    same steps with σ² = 0 (gradient descent at η/substeps)."""
    grad, hessian = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    # ∇S = ∇_θ(uᵀH(θ)u) with u held fixed, by forward-over-reverse inside a gradient.
    grad_s_at = jax.jit(jax.grad(lambda z, u: jax.jvp(jax.grad(loss), (z,), (u,))[1] @ u))
    kappa = substeps / lr
    ends = []
    for oscillate in (True, False):
        y = w
        for _ in range(substeps):
            evals, evecs = np.linalg.eigh(np.asarray(hessian(y)))
            s, u = evals[-1], jnp.asarray(evecs[:, -1])
            grad_s = np.asarray(grad_s_at(y, u))
            g = np.asarray(grad(y))
            q = kappa * (2 - lr * s) / lr + grad_s @ g
            sigma2 = max(0.0, -2 * q / (grad_s @ grad_s)) if oscillate else 0.0
            y = y + lr / substeps * jnp.asarray(-g - 0.5 * sigma2 * grad_s)
        ends.append(y)
    return ends


def test_anchor_gd_step_is_euler_on_the_central_flow_past_the_edge(bench):
    _, _, loss, flat = bench.problem(1, 0.5)
    w = flat[0]
    s0 = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(w)))[-1]
    # Past the edge, ηS = 2.5 (λ₂/λ₁ = 0.92 here, a gap LOBPCG resolves): σ² ≈ 0.45 > 0.
    lr = 2.5 / s0
    step = bench.anchor_step(loss, lr)
    ref = jax.random.normal(jax.random.PRNGKey(1), (w.shape[0], 1))
    w_anchor, _, matvecs = step(w, ref)
    w_euler, w_gd = _euler_steps(loss, w, lr, bench.SUBSTEPS)
    move = float(jnp.linalg.norm(w_euler - w))
    # The anchor's step equals the Euler step up to its LOBPCG tolerance (1e-5/(10P)).
    assert float(jnp.linalg.norm(w_anchor - w_euler)) <= 1e-4 * move
    # Negative control: without the oscillation the step is far from both (not vacuous).
    assert float(jnp.linalg.norm(w_gd - w_euler)) >= 0.05 * move
    assert float(jnp.linalg.norm(w_anchor - w_gd)) >= 0.05 * move
    # The anchor's count: 4 LOBPCG matvecs per iteration + 2 per substep, ≥ 1 iteration.
    assert int(matvecs) >= bench.SUBSTEPS * 6
