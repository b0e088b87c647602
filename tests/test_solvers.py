"""Stabilised explicit solver (ROCK4) and the automatic solver choice."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import conservation as cn


def _linear_flow(eigenvalues, seed=0):
    """dθ/dt = −Aθ with A = Q diag(λ) Qᵀ: the gradient flow of L = θᵀAθ/2."""
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * eigenvalues) @ q.T
    return a, rng.normal(size=n)


@jax.jit
def _fixed_step_solve(a, y0, dt, t1):
    term = dfx.ODETerm(lambda t, y, args: -args @ y)
    sol = dfx.diffeqsolve(term, cn.ROCK4(), 0.0, t1, dt, y0, args=a,
                          stepsize_controller=dfx.ConstantStepSize(), max_steps=4096)
    return sol.ys[-1]


def test_rock4_order_of_convergence_on_linear_gradient_flow():
    # Steps with h·ρ ≤ 4.7 all use the same (5-stage) member of the ROCK4 family: with the
    # stage count changing between step sizes, error constants change too and no clean
    # order shows (stiff accuracy is checked adaptively below).
    a, y0 = _linear_flow(np.logspace(-1, 1.5, 8))
    t1 = 1.0
    exact = scipy.linalg.expm(-a * t1) @ y0  # independent reference
    steps = (32, 64, 128, 256)
    errors = [np.linalg.norm(np.asarray(_fixed_step_solve(a, y0, t1 / k, t1)) - exact)
              for k in steps]
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(orders >= 3.8), (errors, orders)  # claimed order 4


def test_rock4_adaptive_dense_output_matches_closed_form():
    a, y0 = _linear_flow(np.logspace(-1, 3, 8), seed=1)
    ts = np.linspace(0.0, 2.0, 9)
    term = dfx.ODETerm(lambda t, y, args: -args @ y)
    rtol = 1e-8
    sol = dfx.diffeqsolve(term, cn.ROCK4(), 0.0, 2.0, None, y0, args=a,
                          stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
                          saveat=dfx.SaveAt(ts=ts), max_steps=4096)
    exact = np.stack([scipy.linalg.expm(-a * t) @ y0 for t in ts])
    # Save times between steps come from the Hermite interpolant: accurate to tolerance too.
    assert np.max(np.abs(np.asarray(sol.ys) - exact)) < 10 * rtol * np.max(np.abs(y0))


@pytest.fixture(scope="module")
def deep_linear():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    widths = (4, 6, 3)
    teacher = cn.DeepLinear.random(widths, key=k[0])
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k[1], 32, (widths[0],)))
    ensemble = cn.Ensemble.init(
        lambda key: cn.DeepLinear.random(widths, key=key, init_scale=0.6), k[2], 2)
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble)


@pytest.fixture(scope="module")
def stiff_attention():
    """Lightning attention whose flow stiffens near the minimum (Tsit5 needs ≫ 10⁴ steps)."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)

    def make(key):
        return cn.LightningAttention.random(4, key=key, key_dim=2, value_dim=2, causal=False)

    data = cn.teacher_dataset(make(k[0]), cn.gaussian_inputs(k[1], 16, (6, 4)))
    ensemble = cn.Ensemble.init(make, k[2], 1)
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble), 50.0


def _assert_laws_conserved(result, rtol):
    for name, drift in result.max_drift.items():
        assert float(jnp.max(drift)) <= 10 * rtol, (name, float(jnp.max(drift)))


def test_stabilized_conserves_deep_linear_laws(deep_linear):
    ensemble, objective = deep_linear
    rtol = 1e-9
    result = cn.gradient_flow(objective, ensemble, 20.0, rtol=rtol, solver="stabilized",
                              n_save=11)
    assert result.status_names() == ["success"] * 2
    _assert_laws_conserved(result, rtol)
    assert float(jnp.max(result.loss[:, -1] / result.loss[:, 0])) < 1e-3


def test_stabilized_conserves_quadratic_net_laws():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    teacher = cn.PolynomialNet.random((3, 2, 1), key=k[0])
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k[1], 24, (3,)))
    ensemble = cn.Ensemble.init(lambda key: cn.PolynomialNet.random((3, 3, 1), key=key),
                                k[2], 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    rtol = 1e-9
    result = cn.gradient_flow(objective, ensemble, 5.0, rtol=rtol, solver="stabilized",
                              n_save=6)
    assert result.status_names() == ["success"] * 2
    _assert_laws_conserved(result, rtol)


def test_stiff_attention_flow_reaches_t1_and_conserves_laws(stiff_attention):
    ensemble, objective, t1 = stiff_attention
    rtol = 1e-8
    result = cn.gradient_flow(objective, ensemble, t1, rtol=rtol, solver="stabilized",
                              n_save=11)
    assert result.status_names() == ["success"]
    _assert_laws_conserved(result, rtol)


def test_auto_picks_stabilized_on_stiff_attention_and_tsit5_on_deep_linear(
        stiff_attention, deep_linear):
    ensemble, objective, t1 = stiff_attention
    choice = cn.choose_solver(objective, ensemble, t1)
    assert choice.name == "stabilized", choice
    ensemble, objective = deep_linear
    choice = cn.choose_solver(objective, ensemble, 20.0)
    assert choice.name == "tsit5", choice


def test_bad_solver_name_lists_choices(deep_linear):
    ensemble, objective = deep_linear
    with pytest.raises(ValueError, match=r"`solver`.*'auto'.*'stabilized'"):
        cn.gradient_flow(objective, ensemble, 1.0, solver="rock2")
    with pytest.raises(ValueError, match="max_stages"):
        cn.ROCK4(max_stages=500)
