"""Flows beyond Euclidean gradient flow: heavy-ball and Nesterov ODEs (phase space), sign,
preconditioned (per-leaf learning rates) and mirror flows, and the laws each keeps.

References are independent of the library: closed forms (the heavy-ball ODE on a quadratic),
scipy `solve_ivp` on the same equations with gradients written in numpy, a numpy heavy ball,
and the derivative of each law along a field written by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import conservation as cn
from conservation._experiments import runner
from conservation._experiments.config import parse_config

D, H, M, N = 3, 4, 2, 12


@pytest.fixture(scope="module")
def problem():
    """A 3-4-2 deep linear net (two members), its data, and numpy copies of everything."""
    rng = np.random.default_rng(0)
    x = 0.5 * rng.standard_normal((D, N))
    y = rng.standard_normal((M, N))
    weights = [[0.7 * rng.standard_normal((H, D)), 0.7 * rng.standard_normal((M, H))]
               for _ in range(2)]
    velocities = [[rng.standard_normal((H, D)), rng.standard_normal((M, H))] for _ in range(2)]
    stack = lambda ws: cn.Ensemble(  # noqa: E731
        jax.tree.map(lambda *a: jnp.stack(a), *[cn.DeepLinear(w) for w in ws]), 2)
    ensemble, velocity = stack(weights), stack(velocities)
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x.T, y.T), ensemble)
    # The numpy references below use the library's loss convention (checked once here).
    w1, w2 = weights[0]
    loss = np.sum((w2 @ w1 @ x - y) ** 2) / N
    assert float(objective(ensemble[0])) == pytest.approx(loss, rel=1e-13)
    return dict(x=x, y=y, weights=weights, velocities=velocities, ensemble=ensemble,
                velocity=velocity, objective=objective)


def _grads(w1, w2, x, y):
    """∇L of L = (1/n)‖W₂W₁X − Y‖² (the library's MSE: summed over outputs, mean over
    samples), in numpy."""
    gp = 2.0 / x.shape[1] * (w2 @ w1 @ x - y) @ x.T
    return w2.T @ gp, gp @ w1.T


def _split(z):
    return z[: H * D].reshape(H, D), z[H * D:].reshape(M, H)


# One law object for every run: the same function keys the same compiled program.
THETA = cn.FunctionLaw(lambda net: jnp.concatenate([w.ravel() for w in net.weights]), "theta")


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_heavy_ball_follows_the_momentum_ode_at_second_order(problem):
    """The discrete heavy ball (numpy, PyTorch convention, v₀ = 0) against the ODE of
    `MomentumField.heavy_ball` (μ = η(1+β)/(2(1−β)²), time kη/(1−β), v₀ = −(1−β)g/(1+β)):
    measured max error over saves s ≥ 0.8 (after the initial layer) fits order 2.2 (2.41,
    2.15, 2.08 pairwise) over η = 0.04…0.005; from rest (c = 0) the order is 1.05, and the
    first-order mass η/(1−β)² gives 1.09."""
    beta, span, saves = 0.5, 8.0, 20
    x, y = problem["x"], problem["y"]
    w1, w2 = problem["weights"][0]
    model = problem["ensemble"][0]

    def heavy_ball(eta):
        steps = int(round(span * (1 - beta) / eta))
        a, b, va, vb = w1.copy(), w2.copy(), 0 * w1, 0 * w2
        out = [np.concatenate([a.ravel(), b.ravel()])]
        for k in range(steps):
            ga, gb = _grads(a, b, x, y)
            va, vb = beta * va + ga, beta * vb + gb
            a, b = a - eta * va, b - eta * vb
            if (k + 1) % (steps // saves) == 0:
                out.append(np.concatenate([a.ravel(), b.ravel()]))
        return np.array(out)

    etas = np.array([0.04, 0.02, 0.01, 0.005])
    errors = {"matched": [], "rest": []}
    for eta in etas:
        matched = cn.MomentumField.heavy_ball(eta, beta)
        np.testing.assert_allclose(matched.mass, eta * (1 + beta) / (2 * (1 - beta) ** 2))
        for name, field in (("matched", matched),
                            ("rest", cn.MomentumField(matched.mass, 0.0, 0.0))):
            result = cn.gradient_flow(problem["objective"], model, span, field=field,
                                      laws=[THETA], values="all", n_save=saves + 1,
                                      rtol=1e-12, atol=1e-12, solver="tsit5")
            ode = np.asarray(result.values["theta"][0])
            errors[name].append(np.max(np.abs(ode - heavy_ball(eta))[2:]))
    order = {k: np.polyfit(np.log(etas), np.log(v), 1)[0] for k, v in errors.items()}
    assert 1.9 <= order["matched"] <= 2.5, (order, errors)
    assert 0.9 <= order["rest"] <= 1.2, (order, errors)
    # Two-sided: the matched ODE is close (3e-6 at η = 0.005), the one from rest is not.
    assert errors["matched"][-1] < 1e-5 < 1e-3 < errors["rest"][-1], errors


def _closed_form(w0, v0, target_map, sigma, mass, decay, t):
    """μẄ + Ẇ = −∇L − λW for L = (1/n)‖WX − Y‖² = tr((W−W*)Σ(W−W*)ᵀ)·… : per eigenvector
    u_j of K = 2Σ + λI, z_j = (W − W∞)u_j solves μz̈ + ż + κ_j z = 0."""
    kappa, u = np.linalg.eigh(2 * sigma + decay * np.eye(len(sigma)))
    w_inf = 2 * target_map @ sigma @ np.linalg.inv(2 * sigma + decay * np.eye(len(sigma)))
    z0, dz0 = (w0 - w_inf) @ u, v0 @ u
    root = np.sqrt((1 - 4 * mass * kappa).astype(complex))
    s1, s2 = (-1 + root) / (2 * mass), (-1 - root) / (2 * mass)
    a = (dz0 - s2 * z0) / (s1 - s2)
    b = z0 - a
    z = a[None] * np.exp(s1 * t[:, None, None]) + b[None] * np.exp(s2 * t[:, None, None])
    return np.real(z) @ u.T + w_inf


# Lanes (default suite), and one solve per member (slow: its own compile).
@pytest.mark.parametrize("batch_size", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_momentum_ode_matches_its_closed_form_on_a_quadratic(batch_size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((D, 20))
    target_map = rng.standard_normal((M, D))
    sigma = x @ x.T / 20
    w0, v0 = rng.standard_normal((2, M, D)), rng.standard_normal((2, M, D))
    model, velocity = (cn.Ensemble(jax.tree.map(lambda *a: jnp.stack(a),
                                                *[cn.DeepLinear([w]) for w in ws]), 2)
                       for ws in (w0, v0))
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x.T, (target_map @ x).T), model)
    # κ spans the under- and overdamped regimes at μ = 0.3 (4μκ from < 1 to > 1).
    mass, decay = 0.3, 0.1
    kappa = np.linalg.eigvalsh(2 * sigma + decay * np.eye(D))
    assert 4 * mass * kappa.min() < 1 < 4 * mass * kappa.max()
    field = cn.MomentumField(mass, weight_decay=decay)
    result = cn.gradient_flow(objective, model, 4.0, field=field, velocity=velocity,
                              laws=[THETA], values="all", n_save=21, rtol=1e-11, atol=1e-11,
                              batch_size=batch_size)
    assert result.status_names() == ["success"] * 2
    t = np.asarray(result.t)
    for i in range(2):
        exact = _closed_form(w0[i], v0[i], target_map, sigma, mass, decay, t)
        got = np.asarray(result.values["theta"][i]).reshape(-1, M, D)
        error = np.max(np.abs(got - exact))
        assert error < 1e-8, error
        # The motion is large compared with the tolerance (not a trivially still flow).
        assert np.max(np.abs(exact[-1] - exact[0])) > 0.1
    np.testing.assert_allclose(np.asarray(result.final.models.weights[0]),
                               np.asarray(result.values["theta"][:, -1]).reshape(2, M, D),
                               rtol=0, atol=1e-14)


def _antisym(m):
    return 0.5 * (m - m.T)


def test_angular_momentum_law_is_conserved_pointwise_and_balance_is_not():
    """d/dt of w(t)·antisym(W₁V₁ᵀ − V₂ᵀW₂) along hand-written heavy-ball and Nesterov fields
    (jax.jvp on functions of (t, θ, v)) vanishes to round-off; the gradient-flow balance law
    μ⟨v, A_sθ⟩ + ½⟨θ, A_sθ⟩ for symmetric generators does not. The library's law equals
    the hand-written one."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((D, N)), rng.standard_normal((M, N))
    w1, w2, v1, v2 = (rng.standard_normal(s) for s in [(H, D), (M, H), (H, D), (M, H)])

    def grad(a, b):
        g = jax.grad(lambda p: jnp.sum((p[1] @ p[0] @ x - y) ** 2) / N)((a, b))
        return g

    mass, decay, t0 = 0.4, 0.05, 0.3

    def heavy(t, s):
        a, b, va, vb = s
        ga, gb = grad(a, b)
        return (jnp.ones(()), (va, vb, -(va + ga + decay * a) / mass,
                               -(vb + gb + decay * b) / mass))

    def nesterov(t, s):
        a, b, va, vb = s
        ga, gb = grad(a, b)
        return (jnp.ones(()), (va, vb, -3 * va / t - ga - decay * a,
                               -3 * vb / t - gb - decay * b))

    def angular(weight):
        return lambda t, s: weight(t) * _antisym(s[0] @ s[2].T - s[3].T @ s[1])

    def balance(t, s):  # the gradient-flow law's momentum counterpart, symmetric generators
        a, b, va, vb = s
        return (mass * (a @ va.T + va @ a.T - b.T @ vb - vb.T @ b) / 2
                + (a @ a.T - b.T @ b) / 2)

    state = tuple(jnp.asarray(z) for z in (w1, w2, v1, v2))
    cases = [(heavy, angular(lambda t: jnp.exp(t / mass)), 0.7),
             (nesterov, angular(lambda t: (t / t0) ** 3), 0.9)]
    for field, law, t in cases:
        tangent = field(t, state)
        _, rate = jax.jvp(law, (jnp.asarray(t), state), tangent)
        size = np.linalg.norm(law(t, state)) + 1.0
        assert float(jnp.max(jnp.abs(rate))) < 1e-12 * size, rate
    _, rate = jax.jvp(balance, (jnp.asarray(0.7), state), heavy(0.7, state))
    assert float(jnp.max(jnp.abs(rate))) > 0.1  # negative control: it drifts

    # The library's law on the same point (as a PhaseState with w = e^{t/μ}).
    point = cn.PhaseState(jnp.asarray(0.7), jnp.exp(0.7 / mass), cn.DeepLinear([w1, w2]),
                          cn.DeepLinear([v1, v2]))
    np.testing.assert_allclose(cn.AngularMomentumLaw(0)(point),
                               angular(lambda t: jnp.exp(t / mass))(0.7, state), rtol=1e-14)


def test_momentum_flow_keeps_angular_laws_and_breaks_balance(problem):
    """Along the heavy-ball ODE (with weight decay) from random velocities: the angular law
    drifts ~1e-10 (rtol 1e-10; ≤ 1e-8 at w(t1) = e^5), the balance law of gradient flow by
    O(0.1), and the unweighted ⟨v, Aθ⟩ (the wrong weight) by O(1)."""
    unweighted = cn.FunctionPhaseLaw(
        lambda s: _antisym(s.position.weights[0] @ s.velocity.weights[0].T
                           - s.velocity.weights[1].T @ s.position.weights[1]), "unweighted",
        lambda s: 1.0 + 0 * s.t)
    laws = [cn.AngularMomentumLaw(0), cn.BalanceLaw(0), unweighted]
    field = cn.MomentumField(0.4, weight_decay=0.05)
    drifts = []
    for rtol in (1e-8, 1e-10):
        result = cn.gradient_flow(problem["objective"], problem["ensemble"], 2.0, field=field,
                                  velocity=problem["velocity"], laws=laws, rtol=rtol,
                                  n_save=11, values=("angular[0]",))
        assert result.status_names() == ["success"] * 2
        drifts.append(float(jnp.max(result.max_drift["angular[0]"])))
        assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-2
        assert float(jnp.min(result.max_drift["unweighted"])) > 0.1
        # Conserved in absolute terms too, while its unweighted part shrinks ~e^{-t/μ}.
        q = np.asarray(result.values["angular[0]"])
        assert np.max(np.abs(q[:, -1] - q[:, 0])) < 1e-6 * np.max(np.abs(q[:, 0]))
        assert np.max(np.abs(q[:, 0])) > 0.1
    assert drifts[1] < 1e-8 and drifts[1] < drifts[0], drifts


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_relu_rescale_laws_hold_under_gradient_flow_and_drift_under_momentum():
    key = jax.random.PRNGKey(3)
    net = cn.MLP.random((3, 5, 2), key=key)
    x = jax.random.normal(jax.random.PRNGKey(4), (16, 3))
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, jnp.sin(x[:, :2])), net)
    laws = list(net.laws())  # the per-neuron rescale law (with biases)
    flow = cn.gradient_flow(objective, net, 1.0, laws=laws, rtol=1e-10, n_save=5,
                            solver="tsit5")
    momentum = cn.gradient_flow(objective, net, 1.0, laws=laws, rtol=1e-10, n_save=5,
                                field=cn.MomentumField(0.5, start_velocity=1.0))
    assert float(flow.max_drift["rescale[0]"][0]) < 1e-8
    assert float(momentum.max_drift["rescale[0]"][0]) > 1e-3


def _ivp(rhs, z0, t, rtol=1e-12):
    sol = solve_ivp(rhs, (t[0], t[-1]), z0, method="DOP853", t_eval=t, rtol=rtol,
                    atol=1e-13)
    assert sol.success
    return sol.y.T


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_nesterov_flow_matches_solve_ivp_and_keeps_its_angular_law(problem):
    t0, decay = 0.5, 0.02
    field = cn.NesterovField(start_time=t0, weight_decay=decay)
    result = cn.gradient_flow(problem["objective"], problem["ensemble"], 3.0, field=field,
                              velocity=problem["velocity"], rtol=1e-11, atol=1e-11,
                              laws=[THETA, cn.AngularMomentumLaw(0), cn.BalanceLaw(0)],
                              values=("theta",), n_save=7)
    assert result.status_names() == ["success"] * 2
    x, y = problem["x"], problem["y"]
    p = H * D + M * H

    def rhs(t, z):
        a, b = _split(z[:p])
        ga, gb = _grads(a, b, x, y)
        g = np.concatenate([ga.ravel(), gb.ravel()]) + decay * z[:p]
        return np.concatenate([z[p:], -3 * z[p:] / (t + t0) - g])

    for i in range(2):
        z0 = np.concatenate([w.ravel() for w in problem["weights"][i]]
                            + [v.ravel() for v in problem["velocities"][i]])
        exact = _ivp(rhs, z0, np.asarray(result.t))[:, :p]
        assert np.max(np.abs(np.asarray(result.values["theta"][i]) - exact)) < 1e-8
    assert float(jnp.max(result.max_drift["angular[0]"])) < 1e-8
    assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-2
    # The time-dependent field in one solve per member: the lanes' numbers and steps.
    alone = cn.gradient_flow(problem["objective"], problem["ensemble"], 3.0, field=field,
                             velocity=problem["velocity"], rtol=1e-11, atol=1e-11,
                             laws=[THETA, cn.AngularMomentumLaw(0), cn.BalanceLaw(0)],
                             values=("theta",), n_save=7, batch_size=1)
    np.testing.assert_allclose(alone.values["theta"], result.values["theta"], rtol=1e-12,
                               atol=1e-13)
    np.testing.assert_array_equal(alone.num_steps, result.num_steps)


def _flat(weights):
    return np.concatenate([w.ravel() for w in weights])


def _first_order_check(problem, field, rhs, laws, t1, members=(0, 1), start=None):
    """`field`'s flow of the problem against solve_ivp on `rhs` (flat θ, numpy)."""
    ensemble = problem["ensemble"] if start is None else start
    result = cn.gradient_flow(problem["objective"], ensemble, t1, field=field,
                              laws=[THETA, *laws], values=("theta",), n_save=6,
                              rtol=1e-11, atol=1e-11, solver="tsit5")
    assert result.status_names() == ["success"] * 2
    for i in members:
        z0 = np.asarray(result.values["theta"][i, 0])
        exact = _ivp(rhs, z0, np.asarray(result.t))
        error = np.max(np.abs(np.asarray(result.values["theta"][i]) - exact))
        assert error < 1e-8, error
        assert np.max(np.abs(exact[-1] - exact[0])) > 1e-2  # it moved
    return result


def _numpy_grad(problem, z):
    a, b = _split(z)
    ga, gb = _grads(a, b, problem["x"], problem["y"])
    return np.concatenate([ga.ravel(), gb.ravel()])


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_preconditioned_flow_keeps_the_lr_weighted_balance(problem):
    lrs = (1.0, 0.25)
    field = cn.PreconditionedField.per_leaf(problem["ensemble"][0], list(lrs))
    scale = np.concatenate([np.full(H * D, lrs[0]), np.full(M * H, lrs[1])])
    result = _first_order_check(
        problem, field, lambda t, z: -scale * _numpy_grad(problem, z),
        [cn.LrBalanceLaw(0, lrs), cn.BalanceLaw(0)], 2.0)
    assert float(jnp.max(result.max_drift["lr_balance[0]"])) < 1e-8
    assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-2  # negative control


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_mirror_flows_match_solve_ivp_and_entropy_keeps_the_l1_balance(problem):
    positive = jax.tree.map(jnp.abs, problem["ensemble"])
    result = _first_order_check(
        problem, cn.MirrorField("entropy"), lambda t, z: -z * _numpy_grad(problem, z),
        [cn.MirrorBalanceLaw(0), cn.BalanceLaw(0)], 1.0, start=positive)
    assert float(jnp.max(result.max_drift["mirror_balance[0]"])) < 1e-10
    assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-3  # negative control
    assert float(jnp.min(result.final.models.weights[0])) > 0  # stays positive

    # A user potential φ(θ) = Σ θ⁴/12 + θ²/2: ∇²φ = diag(θ² + 1).
    field = cn.MirrorField(lambda z: jnp.sum(z**4) / 12 + jnp.sum(z**2) / 2)
    _first_order_check(problem, field,
                       lambda t, z: -_numpy_grad(problem, z) / (z**2 + 1), [], 1.0)


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_sign_flow_matches_solve_ivp_and_keeps_no_balance(problem):
    eps = 0.3
    result = _first_order_check(
        problem, cn.SignField(smoothing=eps),
        lambda t, z: -(g := _numpy_grad(problem, z)) / np.sqrt(g**2 + eps**2),
        [cn.BalanceLaw(0)], 1.0)
    assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-2
    # The exact sign over a horizon where no gradient component changes sign: θ moves at
    # unit speed along −sign(∇L(θ₀)).
    z0 = _flat(problem["weights"][0])
    direction = -np.sign(_numpy_grad(problem, z0))
    short = 0.01
    while not all(np.all(np.sign(_numpy_grad(problem, z0 + f * short * direction))
                         == -direction) for f in np.linspace(0, 1, 11)):
        short /= 2
    assert short > 1e-4
    exact = cn.gradient_flow(problem["objective"], problem["ensemble"][0], short,
                             field=cn.SignField(), laws=[THETA], values=("theta",), n_save=2,
                             rtol=1e-11, solver="tsit5")
    np.testing.assert_allclose(np.asarray(exact.values["theta"][0, -1]),
                               z0 + short * direction, atol=1e-12)


@pytest.mark.slow  # compiles its own flow (~15-40 s on 2 loaded cores)
def test_optimizer_lr_scales_step_each_leaf_with_its_rate(problem):
    lrs = (0.05, 0.0125)
    optim = cn.optimizer("gd", lr=0.05, lr_scales=[1.0, 0.25])
    model = problem["ensemble"][0]
    result = cn.train(problem["objective"], model, optim, 40, n_save=41,
                      laws=[THETA, cn.LrBalanceLaw(0, lrs), cn.BalanceLaw(0)],
                      values=("theta",))
    a, b = problem["weights"][0]
    for k in range(40):
        ga, gb = _grads(a, b, problem["x"], problem["y"])
        a, b = a - lrs[0] * ga, b - lrs[1] * gb
        np.testing.assert_allclose(np.asarray(result.values["theta"][0, k + 1]),
                                   _flat([a, b]), rtol=1e-12, atol=1e-14)
    # GD keeps the lr-weighted balance up to O(η), far better than the plain one.
    assert (float(result.max_drift["lr_balance[0]"][0]) * 10
            < float(result.max_drift["balance[0]"][0]))


def test_arguments_are_checked(problem):
    objective, ensemble = problem["objective"], problem["ensemble"]
    with pytest.raises(cn.ArgumentError, match="phase-space law"):
        cn.gradient_flow(objective, ensemble, 1.0, laws=[cn.AngularMomentumLaw(0)])
    with pytest.raises(cn.ArgumentError, match="`velocity`"):
        cn.gradient_flow(objective, ensemble, 1.0, velocity=problem["velocity"])
    with pytest.raises(cn.ArgumentError, match="`velocity` must have the structure"):
        cn.gradient_flow(objective, ensemble, 1.0, field=cn.MomentumField(1.0),
                         velocity=problem["velocity"][0])
    for make, name in ((lambda: cn.MomentumField(0.0), "mass"),
                       (lambda: cn.NesterovField(start_time=0.0), "start_time"),
                       (lambda: cn.MomentumField(1.0, start_velocity=-1), "start_velocity"),
                       (lambda: cn.SignField(smoothing=-1.0), "smoothing"),
                       (lambda: cn.MirrorField("kl"), "potential"),
                       (lambda: cn.PreconditionedField.per_leaf(ensemble[0], [1.0]), "lrs"),
                       (lambda: cn.LrBalanceLaw(0, (1.0, 0.0)), "lrs"),
                       (lambda: cn.optimizer("gd", lr=0.1, lr_scales=[1.0, -2.0]),
                        "lr_scales")):
        with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
            make()
    with pytest.raises(cn.ArgumentError, match="phase-space law"):
        cn.AngularMomentumLaw(0)(ensemble[0])


def _config(kind, **extra):
    return {"model": {"kind": "deep_linear", "widths": [3, 4, 2]},
            "data": {"n": 8},
            "dynamics": [{"kind": kind, "t1": 1.0, **extra}]}


def test_config_kinds_build_their_fields():
    cases = {"momentum_flow": ({"mass": 0.5, "start_velocity": 1.0}, cn.MomentumField),
             "nesterov_flow": ({"start_time": 0.2}, cn.NesterovField),
             "sign_flow": ({"smoothing": 0.1}, cn.SignField)}
    for kind, (extra, cls) in cases.items():
        run = parse_config(_config(kind, **extra)).dynamics[0]
        field = runner._flow_field(run)
        assert type(field) is cls
        for name, value in extra.items():
            assert float(getattr(field, name)) == value
    with pytest.raises(cn.ConfigError, match="mass"):
        parse_config(_config("momentum_flow"))
    # Second-order flows resume from (θ, v): segments are accepted (tests/test_momentum_runs.py).
    run = parse_config(_config("momentum_flow", mass=0.5, checkpoints=2, n_save=11)).dynamics[0]
    assert run.checkpoints == 2


def test_angular_momentum_of_each_hidden_layer_of_a_deeper_net():
    """A 3-layer net has two hidden layers; the law of layer l pairs layers l and l + 1 only:
    J_l = w·antisym(W_l V_lᵀ − V_{l+1}ᵀ W_{l+1}) with antisym(M) = (M − Mᵀ)/2, against numpy
    at a random point (a law that paired other layers has other shapes or values); its scale
    with those velocities and at rest."""
    rng = np.random.default_rng(5)
    shapes = [(4, 3), (3, 4), (2, 3)]
    ws = [rng.normal(size=s) for s in shapes]
    vs = [rng.normal(size=s) for s in shapes]
    point = cn.PhaseState(jnp.asarray(0.3), jnp.asarray(1.5),
                          cn.DeepLinear([jnp.asarray(w) for w in ws]),
                          cn.DeepLinear([jnp.asarray(v) for v in vs]))
    rest = cn.PhaseState(point.t, point.weight, point.position,
                         cn.DeepLinear([jnp.zeros(s) for s in shapes]))
    for layer in (0, 1):
        m = ws[layer] @ vs[layer].T - vs[layer + 1].T @ ws[layer + 1]
        law = cn.AngularMomentumLaw(layer)
        np.testing.assert_allclose(law(point), 1.5 * (m - m.T) / 2, rtol=1e-13, atol=1e-14)
        # Its scale: w·(‖W_l‖‖V_l‖ + ‖W_{l+1}‖‖V_{l+1}‖); at rest (V = 0) w·(‖W_l‖² + ‖W_{l+1}‖²).
        norm = np.linalg.norm
        np.testing.assert_allclose(law.scale(point), 1.5 * (
            norm(ws[layer]) * norm(vs[layer]) + norm(ws[layer + 1]) * norm(vs[layer + 1])),
            rtol=1e-13)
        np.testing.assert_allclose(law.scale(rest), 1.5 * (
            np.sum(ws[layer] ** 2) + np.sum(ws[layer + 1] ** 2)), rtol=1e-13)


def test_sign_field_against_its_formula():
    """SignField at a point, against numpy: −(g + λθ)/√((g + λθ)² + ε²) for ε > 0, and
    −sign(g + λθ) for ε = 0 (a zero component stays 0), with g the gradient given."""
    y = jnp.asarray([0.3, -2.0, 0.0, 1e-3])
    g = np.array([1.5, 0.2, 0.0, -4.0])

    def grad(z):
        return jnp.asarray(g) + 0.0 * z

    for eps, wd in [(0.5, 0.0), (0.5, 0.1), (0.0, 0.1), (0.0, 0.0)]:
        total = g + wd * np.asarray(y)
        want = (-total / np.sqrt(total**2 + eps**2)) if eps > 0 else -np.sign(total)
        got = cn.SignField(weight_decay=wd, smoothing=eps)(grad, y)
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


def test_fields_default_to_their_plain_forms():
    """Every field's defaults, against the plain ODE written out in numpy: no weight decay,
    the exact sign (no smoothing), a start at rest, Nesterov's τ starting at t₀ = 1."""
    theta = jnp.asarray([0.3, -2.0, 0.5])
    v = np.array([0.7, -0.15, 0.4])
    g = np.array([1.5, 0.2, -4.0])  # signs unlike θ's: a decay λθ would change the sign

    def grad(z):
        return jnp.asarray(g) + 0.0 * z

    np.testing.assert_array_equal(cn.SignField()(grad, theta), -np.sign(g))
    p = np.array([1.0, 0.5, 2.0])
    np.testing.assert_allclose(cn.PreconditionedField(p)(grad, theta), -p * g, rtol=1e-15)
    momentum = cn.MomentumField(0.25)
    np.testing.assert_allclose(momentum.acceleration(grad, 0.3, theta, jnp.asarray(v)),
                               -(v + g) / 0.25, rtol=1e-15)
    nesterov = cn.NesterovField()
    np.testing.assert_allclose(nesterov.acceleration(grad, 0.5, theta, jnp.asarray(v)),
                               -3.0 * v / 1.5 - g, rtol=1e-15)
    np.testing.assert_allclose(nesterov.weight(1.0), 8.0, rtol=1e-15)  # ((t + 1)/1)³
    for field in (momentum, nesterov):
        np.testing.assert_array_equal(field.initial_velocity(grad, theta), 0.0)
