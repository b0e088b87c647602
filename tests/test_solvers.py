"""Stabilised explicit solvers (ROCK4, RKC, StabilizedRK) and the automatic solver choice."""

import decimal

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util
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


@eqx.filter_jit
def _fixed_step_solve(a, y0, dt, t1, solver=cn.ROCK4()):
    term = dfx.ODETerm(lambda t, y, args: -args @ y)
    sol = dfx.diffeqsolve(term, solver, 0.0, t1, dt, y0, args=a,
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


def test_rkc_order_of_convergence_on_linear_gradient_flow():
    # h·ρ·safety ≤ 1.2 keeps every step at RKC's 2-stage member (see the ROCK4 test).
    a, y0 = _linear_flow(np.logspace(-1, 1.5, 8))
    t1 = 1.0
    exact = scipy.linalg.expm(-a * t1) @ y0  # independent reference
    steps = (32, 64, 128, 256)
    errors = [np.linalg.norm(np.asarray(_fixed_step_solve(a, y0, t1 / k, t1, cn.RKC())) - exact)
              for k in steps]
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(orders >= 1.9), (errors, orders)  # claimed order 2


def _chebyshev(s, x):
    """T_s(x), T_s'(x), T_s''(x) by the three-term recurrence, in x's arithmetic."""
    t, t_prev, d, d_prev, dd, dd_prev = x, 1, 1, 0, 0, 0
    for _ in range(s - 1):
        t, t_prev, d, d_prev, dd, dd_prev = (2 * x * t - t_prev, t, 2 * x * d - d_prev + 2 * t,
                                            d, 2 * x * dd - dd_prev + 4 * d, dd)
    return t, d, dd


@eqx.filter_jit
def _one_step(solver, a, y, h, b):
    """One step of `solver` from t = 0 with step `h` on the flow of L = ½(θ − b)ᵀA(θ − b),
    the gradient evaluated as Aθ − Ab (so it carries float64 rounding ~ε·ρ·|b| at the minimum
    θ = b): (y1, solver state). Compiled once per solver; pass `h` as an array."""
    ab = a @ b
    term = dfx.ODETerm(lambda t, y, args: -(a @ y - ab))
    state = solver.init(term, 0.0, h, y, None)
    y1, _, _, state, _ = solver.step(term, 0.0, h, y, None, state, False)
    return y1, state


def test_rkc_step_is_the_damped_chebyshev_polynomial():
    # One RKC step on dθ/dt = −diag(λ)θ multiplies each component by R_s(−hλ),
    # R_s(z) = 1 − b_s T_s(w0) + b_s T_s(w0 + w1 z), w0 = 1 + ε/s², ε = 2/13,
    # w1 = T_s'(w0)/T_s''(w0), b_s = T_s''(w0)/T_s'(w0)² (Sommeijer et al. 1997, eq. 2.2):
    # evaluated here in 50-digit decimal arithmetic, not by the solver's stage recurrence.
    lam = np.array([1.0, 0.7, 0.5, 0.3, 0.1, 0.03, 1e-2, 1e-3])
    for stages in (2, 7, 40, 150):
        # RKC's rule s = 1 + ⌊√(1 + 1.54·h·ρ)⌋ with ρ = 1.2·λ_max: aim mid-interval.
        h = ((stages - 0.5) ** 2 - 1.0) / (1.54 * 1.2 * lam[0])
        y1, state = _one_step(cn.RKC(init_iterations=200), np.diag(lam), np.ones(8),
                              jnp.asarray(h), np.zeros(8))
        assert int(state[3]) == stages  # s − 1 stages and f(y1)
        with decimal.localcontext(decimal.Context(prec=50)):
            w0 = 1 + decimal.Decimal(2) / 13 / stages**2
            t0, d1, d2 = _chebyshev(stages, w0)
            w1, b_s = d1 / d2, d2 / d1**2
            expected = np.array([
                float(1 - b_s * t0 + b_s * _chebyshev(stages, w0 - w1 * decimal.Decimal(
                    h) * decimal.Decimal(x))[0]) for x in lam])
        # Rounding in the s-stage recurrence grows like s²·ε (Verwer et al. 1990).
        np.testing.assert_allclose(np.asarray(y1), expected, rtol=0,
                                   atol=10 * stages**2 * np.finfo(float).eps)
        assert np.all(np.abs(expected) <= 1.0)  # inside the stability interval


def _rkc_reference_step(f, t0, y0, h, s, damping=2.0 / 13.0):
    """One RKC step in numpy, from the method's definition (Sommeijer, Shampine & Verwer 1998,
    eqs. 2.1–2.4; Verwer 1996): w0 = 1 + ε/s², w1 = T_s'(w0)/T_s''(w0), b_j =
    T_j''(w0)/T_j'(w0)² (j ≥ 2), b_0 = b_1 = b_2, a_j = 1 − b_j T_j(w0), stage times
    c_1 = w1·b_1, c_j = w1·T_j''(w0)/T_j'(w0); μ̃_1 = b_1 w1 and, for j ≥ 2, μ_j = 2 b_j w0 /
    b_{j−1}, ν_j = −b_j / b_{j−2}, μ̃_j = 2 b_j w1 / b_{j−1}, γ̃_j = −a_{j−1} μ̃_j:
    Y_1 = y0 + μ̃_1 h F_0, Y_j = (1 − μ_j − ν_j) y0 + μ_j Y_{j−1} + ν_j Y_{j−2}
    + μ̃_j h F(t0 + c_{j−1} h, Y_{j−1}) + γ̃_j h F_0, y1 = Y_s. The Chebyshev values come from
    numpy's Chebyshev series (Clenshaw), not from the solver's recurrence in w0.
    Returns (y1, f(t0 + h, y1), RKC's error estimate 0.8(y0 − y1) + 0.4 h (F_0 + F(y1)))."""
    from numpy.polynomial import Chebyshev

    w0 = 1.0 + damping / s**2
    t = [Chebyshev.basis(j) for j in range(s + 1)]
    value, first, second = (np.array([p.deriv(k)(w0) if k else p(w0) for p in t])
                            for k in (0, 1, 2))
    w1 = first[s] / second[s]
    b = np.empty(s + 1)
    b[2:] = second[2:] / first[2:] ** 2
    b[0] = b[1] = b[2]
    a = 1.0 - b * value
    c = np.empty(s + 1)
    c[0], c[1], c[2:] = 0.0, w1 * b[1], w1 * second[2:] / first[2:]
    f0 = f(t0, y0)
    stages = [y0, y0 + b[1] * w1 * h * f0]
    for j in range(2, s + 1):
        mu, nu = 2.0 * b[j] * w0 / b[j - 1], -b[j] / b[j - 2]
        mu_tilde = 2.0 * b[j] * w1 / b[j - 1]
        gamma_tilde = -a[j - 1] * mu_tilde
        stages.append((1.0 - mu - nu) * y0 + mu * stages[-1] + nu * stages[-2]
                      + mu_tilde * h * f(t0 + c[j - 1] * h, stages[-1]) + gamma_tilde * h * f0)
    y1 = stages[-1]
    f1 = f(t0 + h, y1)
    assert abs(c[s] - 1.0) < 1e-14  # the last stage is at t0 + h (the definition of w1)
    return y1, f1, 0.8 * (y0 - y1) + 0.4 * h * (f0 + f1)


_DECAY = np.array([100.0, 10.0, 3.0, 1.0])
_FORCE = np.array([0.0, 0.0, 1.0, 0.0])


def _nonlinear_field(t, y, args):
    """y' = −d⊙y − y⊙y + cos(3t)·e₂: a nonlinear, time-dependent field whose Jacobian
    diag(−d − 2y) has the spectral radius max(d + 2y) (101 at y₀ below)."""
    del args
    return -_DECAY * y - y * y + jnp.cos(3.0 * t) * _FORCE


@eqx.filter_jit
def _rkc_nonlinear_step(h):
    term = dfx.ODETerm(_nonlinear_field)
    y0 = jnp.array([0.5, 1.0, 1.5, 2.0])
    solver = cn.RKC(init_iterations=200)
    state = solver.init(term, 0.1, 0.1 + h, y0, None)
    y1, error, dense, state, _ = solver.step(term, 0.1, 0.1 + h, y0, None, state, False)
    return y1, error, dense["k1"] / h, state


@pytest.mark.parametrize("stages", [2, 3, 6, 13, 40])
def test_rkc_step_on_a_nonlinear_field_matches_the_definition(stages):
    """On a nonlinear field the internal stages matter (on a linear one only the stability
    polynomial R_s does, which is the same for any b_0 = b_1): a wrong b_1, μ_j, ν_j or
    stage time keeps RKC of order 2 (so order tests pass) but changes its error constant,
    e.g. 1.5× for b_1 = 1/(3w0)² on y' = −y². So one step is compared, to round-off, with
    numpy's evaluation of the definition: y1, f(y1) and the error estimate."""
    rho = float(np.max(_DECAY + 2.0 * np.array([0.5, 1.0, 1.5, 2.0])))  # 101
    # RKC's rule s = 1 + ⌊√(1 + 1.54·h·ρ)⌋ with ρ × safety 1.2: aim mid-interval.
    h = ((stages - 0.5) ** 2 - 1.0) / (1.54 * 1.2 * rho)
    y1, error, f1, state = _rkc_nonlinear_step(jnp.asarray(h))
    assert int(state[3]) == stages  # s − 1 stages and f(y1): the step had s stages

    def field(t, y):
        return -_DECAY * y - y * y + np.cos(3.0 * t) * _FORCE

    expected, f1_expected, error_expected = _rkc_reference_step(
        field, 0.1, np.array([0.5, 1.0, 1.5, 2.0]), h, stages)
    # Rounding in the s-stage recurrence grows like s²·ε (Verwer et al. 1990); |y| ≤ 2.
    atol = 10 * stages**2 * np.finfo(float).eps * 2.0
    np.testing.assert_allclose(np.asarray(y1), expected, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(f1), f1_expected, rtol=0, atol=atol * np.max(_DECAY))
    np.testing.assert_allclose(np.asarray(error), error_expected, rtol=0,
                               atol=atol * (1.0 + h * np.max(_DECAY)))
    # The step really is nonlinear and inexact: the error estimate is far above the
    # tolerance used above (otherwise a wrong stage could hide below it).
    assert np.max(np.abs(error_expected)) > 1e6 * atol


@pytest.mark.parametrize("solver", [cn.ROCK4(), cn.StabilizedRK()], ids=["rock4", "stabilized"])
def test_adaptive_dense_output_matches_closed_form(solver):
    a, y0 = _linear_flow(np.logspace(-1, 3, 8), seed=1)
    ts = np.linspace(0.0, 2.0, 9)
    term = dfx.ODETerm(lambda t, y, args: -args @ y)
    rtol = 1e-8
    sol = dfx.diffeqsolve(term, solver, 0.0, 2.0, None, y0, args=a,
                          stepsize_controller=cn.step_size_controller(solver, rtol, rtol),
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


@pytest.mark.parametrize("solver", ["stabilized", "kvaerno5"])
def test_stiff_solvers_in_lanes_equal_one_member_at_a_time(deep_linear, solver):
    """Three members in the default lanes (on the CPU 2, refilled, for the stabilised solver
    and 3 for Kvaerno5): the stabilised solver's per-member stage counts, Kvaerno5's
    Newton solves (its root finder takes the controller's tolerances, as in `diffeqsolve`),
    steps and saves are those of each member's own solve."""
    ensemble, objective = deep_linear
    third = cn.DeepLinear([1.3 * w for w in ensemble[0].weights])
    members = cn.Ensemble.stack([ensemble[0], ensemble[1], third])
    runs = [cn.gradient_flow(objective, members, 20.0, rtol=1e-9, solver=solver,
                             n_save=11, batch_size=b) for b in (1, None)]
    # On the CPU a Chebyshev solver's lanes wait for the stiffest one's stages: 2 lanes
    # (bench_lanes.py). An accelerator takes every member that fits in its memory: all 3.
    expected = {"stabilized": 2, "kvaerno5": 3}[solver] if jax.default_backend() == "cpu" else 3
    assert runs[1].batch_size == expected
    assert runs[0].status_names() == runs[1].status_names() == ["success"] * 3
    np.testing.assert_array_equal(runs[1].num_steps, runs[0].num_steps)
    # Near the minimum the loss itself is exact to ~1e-16 of its scale (moment fast path).
    np.testing.assert_allclose(runs[1].loss, runs[0].loss, rtol=1e-10,
                               atol=1e-14 * float(jnp.max(runs[0].loss[:, 0])))


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


def _least_squares(realizable, loss=cn.MSE()):
    """A stiff linear regression (input scales 1…300: Hessian eigenvalues 2.6…1.5e5), its data
    and its minimum MSE from numpy's least squares (exact targets: 0)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 4)) * np.array([1.0, 10.0, 100.0, 300.0])
    y = x @ rng.normal(size=(2, 4)).T + (0.0 if realizable else rng.normal(size=(24, 2)))
    model = cn.DeepLinear.random((4, 2), key=jax.random.PRNGKey(1))
    objective = cn.make_objective(loss, cn.Dataset(jnp.asarray(x), jnp.asarray(y)), model)
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return model, objective, x, y, float(np.sum(residual**2) / len(x))


@pytest.mark.parametrize("solver", [cn.RKC(), cn.StabilizedRK()], ids=["rkc", "stabilized"])
def test_steps_past_the_stability_interval_are_rejected_not_accepted(solver):
    # Once the flow sits at its (non-zero) minimum the controller grows h until h·ρ needs more
    # than 1000 RKC stages; such a step overflows to inf, and was accepted (diffrax scales the
    # error by |y1| = inf), so the member "diverged" at its minimum.
    model, objective, _, _, minimum = _least_squares(realizable=False)
    result = cn.gradient_flow(objective, model, 100.0, solver=solver, rtol=1e-4, n_save=5)
    assert result.status_names() == ["success"], result.status_names()
    loss = np.asarray(result.loss[0])
    assert np.all(np.diff(loss) <= 1e-9 * loss[:-1]), loss  # gradient flow never climbs
    assert abs(loss[-1] - minimum) <= 1e-8 * minimum, (loss[-1], minimum)


def test_rock4_saves_are_its_step_ends_within_tolerance_of_the_exact_flow():
    """ROCK4 leaves stiff noise of size ~rtol at its step ends, which the Hermite interpolant
    multiplies by ~h·ρ/4 between them (losses saved there read up to 10 746 against a minimum
    of 1.8); `gradient_flow` makes its steps end on the save times, so every saved value is a
    step end: the weights within rtol of the exact flow W(t) = W* + (W₀ − W*)·e^{−2Σt}."""
    model, objective, x, y, minimum = _least_squares(realizable=False)
    weights = cn.FunctionLaw(lambda m: m.weights[0], "W")
    rtol = 1e-4
    result = cn.gradient_flow(objective, model, 100.0, solver=cn.ROCK4(), rtol=rtol,
                              n_save=101, laws=[weights], values="all")
    assert result.status_names() == ["success"]
    sigma, cross = x.T @ x / len(x), y.T @ x / len(x)
    optimum = cross @ np.linalg.inv(sigma)
    w0 = np.asarray(model.weights[0])
    exact = np.stack([optimum + (w0 - optimum) @ scipy.linalg.expm(-2.0 * sigma * t)
                      for t in np.asarray(result.t)])  # independent reference
    error = np.abs(np.asarray(result.values["W"][0]) - exact).max() / np.abs(exact).max()
    assert error <= 10 * rtol, error
    # (The loss itself is off by ~ρ·(rtol·|W|)², 0.6% here: stiff directions are steep.)
    assert np.asarray(result.loss[0]).max() <= np.asarray(result.loss[0, 0])
    assert np.asarray(result.loss[0]).min() >= (1 - 1e-12) * minimum


@pytest.mark.parametrize("realizable", [True, False], ids=["converges", "noisy_targets"])
def test_auto_probe_stops_at_a_minimum_with_the_hessians_radius(realizable):
    # Linear regression: a constant Hessian, so ρ is exact (numpy) all along the probe. With
    # exact targets the loss falls 1e-12 long before t1 and the probe stops there; noisy
    # targets keep the loss up (negative control: to t1).
    model, objective, x, _, _ = _least_squares(realizable)
    t1 = 100.0
    choice = cn.choose_solver(objective, model, t1)
    # L(W) = Σ_samples ‖W x − y‖² / n: Hessian 2 XᵀX/n on each output row.
    rho = 2.0 * np.linalg.eigvalsh(x.T @ x / len(x)).max()
    assert choice.name == "stabilized", choice
    assert 0.99 * rho <= choice.rho_max <= (1 + 1e-9) * rho, (choice.rho_max, rho)
    if realizable:
        assert choice.probe_t < 0.1 * t1, choice.probe_t
    else:
        assert choice.probe_t == t1, choice.probe_t


class _ShiftedMSE(cn.AbstractLoss):
    """MSE − 1e6: the same flow, a loss below zero from the start."""

    @property
    def name(self):
        return "shifted_mse"

    def __call__(self, prediction, target):
        return jnp.sum((prediction - target) ** 2) - 1e6


def test_auto_probe_of_a_loss_starting_below_zero_runs_to_t1():
    # "Below 1e-12 of its start" means nothing for a start ≤ 0 (it held at once, and the
    # probe stopped after one step): the probe then runs to t1 and still finds ρ.
    model, objective, x, _, _ = _least_squares(True, _ShiftedMSE())
    choice = cn.choose_solver(objective, model, 100.0)
    rho = 2.0 * np.linalg.eigvalsh(x.T @ x / len(x)).max()
    assert choice.probe_t == 100.0, choice.probe_t
    assert 0.99 * rho <= choice.rho_max <= (1 + 1e-9) * rho, (choice.rho_max, rho)


class _Point(eqx.Module):
    theta: jax.Array  # (u, v)


class _Ramp(eqx.Module):
    """L(u, v) = −c·u + ½(a + k·tanh u)·v², exactly 0 at (u, v) = (0, 0). With c = 1 the flow
    from there is u = t, v = 0 (L = −t < 0) and the Hessian's radius grows along it as
    ρ(t) = a + k·tanh t; with c = 0, (0, 0) is a stationary minimum (∇L = 0, ρ = a).
    Array fields: both cases share one compiled probe."""

    c: jax.Array
    a: jax.Array
    k: jax.Array

    def __call__(self, model):
        u, v = model.theta
        return -self.c * u + 0.5 * (self.a + self.k * jnp.tanh(u)) * v**2


def test_auto_probe_of_a_loss_starting_at_exactly_zero_runs_to_t1():
    # "Below 1e-12 of its start" gives no scale for a start of exactly 0 either: the probe
    # runs to t1. Stopping at once instead (L ≤ 0 holds after one step) would miss a flow
    # that leaves its zero-loss start and stiffens later: here ρ grows from 1 to 1001, so the
    # probe must see t1·ρ_max/3.5 ≈ 2.9e4 > 5000 Tsit5 steps and pick the stabilised solver,
    # where a probe stopped at t ≈ 0 sees ρ = 1 (29 steps) and picks Tsit5.
    model = _Point(jnp.zeros(2))
    moving = _Ramp(jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(1000.0))
    assert float(moving(model)) == 0.0
    t1 = 100.0
    choice = cn.choose_solver(moving, model, t1)
    assert choice.probe_t == t1, choice
    assert choice.rho0 == pytest.approx(1.0, rel=1e-12), choice
    # The probe's power iterations run at its step starts, the last one past t = 1 (steps
    # grow ≤ 10× from a small first one): ρ_max ∈ [ρ(1), ρ(t1)], ρ(t1) = 1 + 1000·tanh 100.
    assert 1.0 + 1000.0 * np.tanh(1.0) <= choice.rho_max <= (1 + 1e-12) * 1001.0, choice
    assert choice.name == "stabilized", choice
    # The member already at a (zero-loss) minimum: the flow stays at θ₀, so the probe's way
    # to t1 is cheap and ρ is the Hessian's there, a = 4 (t1·ρ/3.5 ≈ 114: Tsit5).
    resting = _Ramp(jnp.asarray(0.0), jnp.asarray(4.0), jnp.asarray(1000.0))
    assert float(resting(model)) == 0.0
    choice = cn.choose_solver(resting, model, t1)
    assert choice.probe_t == t1, choice
    assert choice.rho0 == pytest.approx(4.0, rel=1e-12), choice
    assert choice.rho_max == pytest.approx(4.0, rel=1e-12), choice
    assert choice.name == "tsit5", choice


def _diffrax_probe(objective, model, t1):
    """The probe written as one `diffrax.diffeqsolve` (how it was before its hand-written
    loop): StabilizedRK at rtol = atol = 1e-4 from t = 0 to t1 (dt0=None), stopped by an event
    at 1e-12 of the starting loss; (ρ₀, ρ_max, where it stopped)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y0, unravel = jax.flatten_util.ravel_pytree(params)

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    term = dfx.ODETerm(lambda t, y, args: -jax.grad(loss)(y))
    solver = cn.StabilizedRK()
    loss0 = loss(y0)
    rho0 = solver.init(term, 0.0, t1, y0, None)[1]
    sol = dfx.diffeqsolve(
        term, solver, 0.0, t1, None, y0, saveat=dfx.SaveAt(t1=True, solver_state=True),
        stepsize_controller=cn.step_size_controller(solver, 1e-4, 1e-4), max_steps=2_000,
        throw=False, event=dfx.Event(lambda t, y, args, **kwargs: (
            (loss0 > 0) & (loss(y) <= 1e-12 * loss0) | ~jnp.all(jnp.isfinite(y)))))
    return float(rho0), float(jnp.maximum(rho0, sol.solver_state[2])), float(sol.ts[-1])


def test_the_probe_takes_the_steps_of_diffrax():
    """`choose_solver`'s probe is a hand-written loop of the solver's `step` and the
    controller's `adapt_step_size` (a third less to compile than `diffeqsolve`): its ρ₀, ρ_max
    and stopping time equal those of the same probe run by `diffrax.diffeqsolve`, bit for bit,
    on a flow that converges early (stops at the event), one that runs to t1, and one whose ρ
    grows along the way."""
    cases = [(*_least_squares(True)[:2], 100.0), (*_least_squares(False)[:2], 100.0),
             (_Point(jnp.zeros(2)), _Ramp(jnp.asarray(1.0), jnp.asarray(1.0),
                                          jnp.asarray(1000.0)), 100.0)]
    for model, objective, t1 in cases:
        choice = cn.choose_solver(objective, model, t1)
        reference = _diffrax_probe(objective, model, t1)
        assert (choice.rho0, choice.rho_max, choice.probe_t) == reference, (choice, reference)


def test_bad_solver_name_lists_choices(deep_linear):
    ensemble, objective = deep_linear
    with pytest.raises(ValueError, match=r"`solver`.*'auto'.*'stabilized'"):
        cn.gradient_flow(objective, ensemble, 1.0, solver="rock2")
    with pytest.raises(ValueError, match="max_stages"):
        cn.ROCK4(max_stages=500)
    with pytest.raises(ValueError, match="max_stages"):
        cn.RKC(max_stages=1)
    with pytest.raises(ValueError, match="switch"):
        cn.StabilizedRK(switch=0.0)


def test_stabilized_takes_rock4_steps_below_switch_and_rkc_steps_above():
    a, y0 = _linear_flow(np.logspace(-1, 3, 8), seed=2)
    b = np.zeros_like(y0)
    rho = 1e3 * cn.StabilizedRK().safety
    for h, expected, other in ((40.0 / rho, cn.ROCK4(), cn.RKC()),
                               (400.0 / rho, cn.RKC(), cn.ROCK4())):
        h = jnp.asarray(h)
        y_hybrid, state = _one_step(cn.StabilizedRK(), a, y0, h, b)
        y_alone, state_alone = _one_step(expected, a, y0, h, b)
        y_other, _ = _one_step(other, a, y0, h, b)
        # Equal up to the compiler's operation order; the other method's step differs by its
        # truncation error (≳ 1e-6 at these step sizes).
        np.testing.assert_allclose(np.asarray(y_hybrid), np.asarray(y_alone), rtol=0, atol=1e-12)
        assert np.max(np.abs(np.asarray(y_hybrid) - np.asarray(y_other))) > 1e-6
        assert int(state[3]) == int(state_alone[3])  # the same f-evaluations


def test_rkc_steps_do_not_amplify_rounding_at_a_minimum():
    # At the minimum θ = b only rounding moves θ. ROCK4's finishing procedure amplifies it
    # like (h·ρ)⁴ (the negative control: ≳ 1e-9 at h·ρ = 440); RKC's recurrence only like
    # its stage count squared, even at h·ρ = 1e5 (~390 stages).
    a, _ = _linear_flow(np.logspace(-2, 4, 8), seed=3)
    b = np.random.default_rng(4).normal(size=8)
    rho = 1e4 * 1.2
    moved = {}
    for name, solver, h_rho in (("rock4", cn.ROCK4(), 440.0), ("rkc", cn.RKC(), 1e5)):
        y1, state = _one_step(solver, a, b, jnp.asarray(h_rho / rho), b)
        moved[name] = float(np.max(np.abs(np.asarray(y1) - b)))
    stages = 1 + int(np.sqrt(1 + 1.54 * 1e5))
    assert moved["rkc"] < stages**2 * np.finfo(float).eps * np.max(np.abs(b)), moved
    assert moved["rock4"] > 100 * moved["rkc"], moved


@pytest.mark.parametrize("name", ["tsit5", "dopri5", "dopri8"])
def test_unrolled_explicit_solvers_equal_diffrax_steps_and_match_the_closed_form(name):
    """`solver="tsit5"` etc. are diffrax's tableaus with the stages unrolled: one step on a
    nonlinear field gives diffrax's y₁, error estimate, dense output and next f to round-off;
    on a linear gradient flow the adaptive solve's saved values (dense output between steps
    included) are within 10·rtol of expm."""
    from conservation._dynamics.flow import SOLVERS
    from conservation._dynamics.unrolled import AbstractUnrolledERK

    unrolled = SOLVERS[name]()
    assert isinstance(unrolled, AbstractUnrolledERK)
    reference = getattr(dfx, type(unrolled).__name__)()
    a, y0 = _linear_flow(np.logspace(-1, 2, 6), seed=2)
    term = dfx.ODETerm(lambda t, y, args: -a @ y - 0.3 * jnp.sin(y))
    steps = [solver.step(term, 0.0, 0.02, y0, None, solver.init(term, 0.0, 0.02, y0, None),
                         False) for solver in (unrolled, reference)]
    (y1, error, dense, f1, _), (y1_, error_, dense_, (_, f1_), _) = steps
    # Round-off is absolute, a few ulps of the magnitude of what is summed: |y| for y₁ and
    # the error estimate Σ eᵢkᵢ (a difference of O(|y|) numbers), h|A||y| for the stages
    # kᵢ = h·(−Ayᵢ − 0.3 sin yᵢ), |A||y| for f₁. A GPU's fused multiply-adds moved one
    # element of the error estimate by 1.2e-16.
    y_scale = np.max(np.abs(y0))
    f_scale = np.max(np.abs(a) @ np.abs(y0)) + 0.3
    for x, y, scale in ((y1, y1_, y_scale), (error, error_, y_scale),
                        (dense["k"], dense_["k"], 0.02 * f_scale), (f1, f1_, f_scale)):
        np.testing.assert_allclose(x, y, rtol=1e-14, atol=1e-15 * scale)

    ts = np.linspace(0.0, 3.0, 13)
    rtol = 1e-9
    sol = dfx.diffeqsolve(dfx.ODETerm(lambda t, y, args: -args @ y), unrolled, 0.0, 3.0, 0.01,
                          y0, args=a, saveat=dfx.SaveAt(ts=ts),
                          stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
                          max_steps=10_000)
    exact = np.stack([scipy.linalg.expm(-a * t) @ y0 for t in ts])  # independent reference
    assert np.max(np.abs(np.asarray(sol.ys) - exact)) < 10 * rtol * np.max(np.abs(y0))


@pytest.mark.parametrize("name", ["tsit5", "dopri8"])
def test_the_lanes_take_an_unrolled_step_without_stacking_its_stages(name):
    """In the lanes a step's field values stay apart (`step_stages`: a tuple of f(yᵢ) and
    the step h), so that no step copies them into one (stages, P) array nor keeps each
    h·f(yᵢ) beside f(yᵢ): stacked and scaled, they are `step`'s dense output, bit for bit; the
    first is the solver state (first same as last); the lanes' step attempt has no
    concatenation of stage-many vectors (it had one before, at every step). The saves
    evaluate them with the interpolation's weights (`test_the_lanes_interpolation_is_diffraxs_
    dense_output`; `test_lanes_take_each_members_own_steps` compares the saved values with
    one diffrax solve per member)."""
    from conservation._dynamics.flow import SOLVERS
    from conservation._dynamics.lockstep import attempt_step
    from conservation._dynamics.unrolled import dense_output

    solver = SOLVERS[name]()
    stages = len(solver.method.tableau.c) + 1
    a, y0 = _linear_flow(np.logspace(-1, 2, 6), seed=3)
    term = dfx.ODETerm(lambda t, y, args: -a @ y - 0.3 * jnp.sin(y))
    state = solver.init(term, 0.0, 0.02, y0, None)
    _, _, dense, _, _ = solver.step_stages(term, 0.0, 0.02, y0, None, state, False)
    _, _, stacked, _, _ = solver.step(term, 0.0, 0.02, y0, None, state, False)
    assert isinstance(dense["f"], tuple) and len(dense["f"]) == stages
    np.testing.assert_array_equal(dense["f"][0], state)
    np.testing.assert_array_equal(dense["f"][-1], term.vf(0.02, dense["y1"], None))
    for key, value in dense_output(dense).items():
        np.testing.assert_array_equal(value, stacked[key])

    controller = dfx.PIDController(rtol=1e-8, atol=1e-8)

    def attempt(y):
        return attempt_step(solver, controller, term, 5, jnp.asarray(1.0), jnp.asarray(0.99),
                            y, jnp.asarray(0.0), jnp.asarray(0.02), state,
                            controller.init(term, 0.0, 1.0, y, 0.02, None, solver.func, 5)[1])

    def concatenations(jaxpr):  # output shapes, nested programs (jnp.stack's) included
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("concatenate", "stack"):
                yield eqn.outvars[0].aval.shape
            for value in eqn.params.values():
                for item in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(item, jax.extend.core.ClosedJaxpr):
                        yield from concatenations(item.jaxpr)

    shapes = list(concatenations(jax.make_jaxpr(attempt)(y0).jaxpr))
    assert all(shape[0] != stages for shape in shapes), shapes


def test_the_clip_floor_is_100_ulps_below_t1_as_numpy_counts_them():
    """A step ending above the clip floor ends at t1 (diffrax's `_clip_to_end`); the floor,
    computed as a loop, is t1 moved 100 floating-point numbers down by `numpy.nextafter`, bit
    for bit, across binades (1.0 and 2.0 have 100 numbers below them of half the spacing)."""
    from conservation._dynamics.lockstep import _clip_floor

    # (Normal numbers only: XLA on the CPU flushes subnormals to zero.)
    for t1 in (20.0, 1.0, 2.0, 1e-3, 3.0e300, 1e-300, float(np.nextafter(1.0, 2.0))):
        expected = np.float64(t1)
        for _ in range(100):
            expected = np.nextafter(expected, -np.inf)
        got = jax.jit(_clip_floor)(jnp.asarray(t1))
        assert np.asarray(got).view(np.int64) == expected.view(np.int64), (t1, got, expected)
    # One traced loop, not 100 unrolled steps (~500 equations, 40 % of the probe's program,
    # traced and lowered at every first call).
    assert len(jax.make_jaxpr(_clip_floor)(1.0).eqns) < 5


@pytest.mark.parametrize("name", ["tsit5", "dopri5", "dopri8"])
def test_the_lanes_interpolation_is_diffraxs_dense_output(name):
    """In the lanes an unrolled method's dense output is evaluated as w₀y₀ + w₁y₁ + Σᵢ bᵢkᵢ
    with the weights of diffrax's interpolation (its transpose; Dopri5's weighs y₁ too),
    without stacking the stages: at every t of a step, diffrax's own evaluation to
    round-off, and Tsit5's at the step's start exactly (w₀ = 1, every other weight 0)."""
    from conservation._dynamics.flow import SOLVERS

    solver = SOLVERS[name]()
    a, y0 = _linear_flow(np.logspace(-1, 2, 6), seed=4)
    y0 = jnp.asarray(y0)
    term = dfx.ODETerm(lambda t, y, args: -a @ y - 0.3 * jnp.sin(y))
    t0, t1 = 0.3, 0.32
    state = solver.init(term, t0, t1, y0, None)
    _, _, dense, _, _ = solver.step_stages(term, t0, t1, y0, None, state, False)
    _, _, stacked, _, _ = solver.step(term, t0, t1, y0, None, state, False)
    reference = solver.interpolation_cls(t0=t0, t1=t1, **stacked)
    for t in np.linspace(t0, t1, 7):
        ours = solver.interpolate(dense, jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(t))
        np.testing.assert_allclose(ours, reference.evaluate(t), rtol=1e-14,
                                   atol=1e-15 * np.max(np.abs(y0)))
    if name == "tsit5":
        start = solver.interpolate(dense, jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(t0))
        np.testing.assert_array_equal(start, y0)


class _Negated(cn.AbstractVectorField):
    """−∇L, negated after the gradient (what `GradientField` did before it took the
    gradient of −L)."""

    def __call__(self, grad, y):
        return -grad(y)


def test_the_flow_field_is_minus_the_gradient_bit_for_bit():
    """`GradientField` takes the gradient of −L (the sign on the cotangent, so that the
    joined parameter vector is the field itself, with no negation pass): every backward
    operation is linear in the cotangent and IEEE negation exact, so the flow is the one of
    −∇L negated afterwards to the bit: the same steps, saved losses, laws and final
    parameters, for a deep linear net (moments) and a ReLU MLP (per sample)."""
    key = jax.random.PRNGKey(7)
    x = jax.random.normal(key, (9, 3))
    for widths, make in (([3, 4, 2], cn.DeepLinear.random),
                         ([3, 5, 2], lambda w, key: cn.MLP.random(w, key=key,
                                                                  activation="relu"))):
        ensemble = cn.Ensemble.init(lambda k, w=widths, f=make: f(w, key=k), key, 3)
        objective = cn.make_objective(cn.MSE(), cn.Dataset(x, jnp.tanh(x[:, :2])), ensemble)
        runs = [cn.gradient_flow(objective, ensemble, 2.0, n_save=5, solver="tsit5",
                                 field=field, progress=False)
                for field in (cn.GradientField(), _Negated())]
        for ours, plain in zip(*(jax.tree_util.tree_leaves((r.num_steps, r.loss, r.drift,
                                                              r.final)) for r in runs)):
            np.testing.assert_array_equal(ours, plain)
