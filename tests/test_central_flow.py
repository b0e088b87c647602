"""The central flow of GD at the edge of stability (`CentralFlowField`), against independent
numpy/scipy implementations: dense Hessians and third-derivative tensors, numpy's eigh,
scipy's solve_ivp."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import conservation as cn
from conservation._dynamics.central import solve_sdcp, top_eigenpairs

# The problem: a 4-5-5-2 deep linear net learning a linear teacher. Along gradient flow the
# sharpness rises from 11.4 to 24.1 (member 0) and 20.5 (member 1): with η = 0.09
# (2/η = 22.2) member 0 reaches the edge of stability within t ≈ 1 and member 1 does not.
LR_EDGE, LR_STABLE = 0.09, 0.02
T1, N_SAVE = 1.8, 13


def _theta(model):
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


THETA = cn.FunctionLaw(_theta, "theta")


@pytest.fixture(scope="module")
def problem():
    kt, kx, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random([4, 2], key=kt, init_scale=2.0)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 32, (4,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([4, 5, 5, 2], key=k, init_scale=0.8), ki, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    params, static = eqx.partition(ensemble[0], eqx.is_inexact_array)
    unravel = jfu.ravel_pytree(params)[1]

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    # The reference's derivatives: dense arrays, taken to numpy once per evaluation.
    derivatives = jax.jit(lambda y: (jax.grad(loss)(y), jax.hessian(loss)(y),
                                     jax.jacfwd(jax.hessian(loss))(y)))
    return objective, ensemble, loss, derivatives


def _reference_field(derivatives, lr, relaxation=2.0, record=None):
    """The paper's equation for one eigenvalue at the edge, in numpy: top eigenpair of the
    dense Hessian, ∇S = ∇³L[u, u] from the dense third-derivative tensor, the stabilised
    complementarity σ² = max(0, −2((κ/η)(2 − ηS) + ⟨∇S, ∇L⟩)/‖∇S‖²) with κη = `relaxation`."""

    def f(t, theta):
        g, h, third = (np.asarray(a) for a in derivatives(jnp.asarray(theta)))
        w, v = np.linalg.eigh(h)
        u = v[:, -1]
        grad_s = np.einsum("ijk,j,k->i", third, u, u)
        q = relaxation / lr**2 * (2 - lr * w[-1]) + grad_s @ g
        sigma2 = max(0.0, -2 * q / (grad_s @ grad_s))
        if record is not None:
            record.append((t, sigma2, w[-1]))
        return -g - 0.5 * sigma2 * grad_s

    return f


@pytest.fixture(scope="module")
def flows(problem):
    objective, ensemble, _, _ = problem
    # One compiled program for both: the field's lr is traced.
    return {lr: cn.gradient_flow(objective, ensemble, T1, n_save=N_SAVE, solver="tsit5",
                                 rtol=1e-9, laws=[THETA], values=["theta"],
                                 field=cn.CentralFlowField(lr))
            for lr in (LR_EDGE, LR_STABLE)}


@pytest.mark.slow
def test_central_flow_matches_scipy_reference(problem, flows):
    """Member 0 reaches the edge (σ² > 0 on part of the run, the sharpness pinned at 2/η):
    the library's trajectory agrees with solve_ivp (DOP853, rtol 1e-10) of the numpy
    equations to 1e-6 relative (measured 1.6e-7; gradient flow is 3.1e-2 away)."""
    _, ensemble, _, derivatives = problem
    theta = np.asarray(flows[LR_EDGE].values["theta"][0])
    record = []
    ts = np.linspace(0, T1, N_SAVE)
    ref = solve_ivp(_reference_field(derivatives, LR_EDGE, record=record), (0, T1),
                    np.asarray(_theta(ensemble[0])), method="DOP853", t_eval=ts,
                    rtol=1e-10, atol=1e-12)
    assert ref.success
    error = np.max(np.abs(theta - ref.y.T)) / np.max(np.abs(ref.y))
    assert error < 1e-6, error
    # Not vacuous: the oscillation switched on, and the sharpness sat at 2/η meanwhile.
    on = [(t, s2, lam) for t, s2, lam in record if s2 > 1e-3]
    assert on, "the reference never reached the edge"
    edge = np.array([lam for _, _, lam in record]) * LR_EDGE
    # (Recorded at the solver's stages too, slightly off the trajectory: 2 + 5e-6 seen.)
    assert 2 - 1e-3 < edge.max() <= 2 + 1e-4, edge.max()
    # The same flow without the oscillation term (gradient flow) is far from it: a negative
    # control that the comparison resolves the σ² term.
    plain = solve_ivp(lambda t, y: -np.asarray(derivatives(jnp.asarray(y))[0]), (0, T1),
                      np.asarray(_theta(ensemble[0])), method="DOP853", t_eval=ts,
                      rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(theta - plain.y.T)) / np.max(np.abs(ref.y)) > 1e-2


@pytest.mark.slow
def test_below_the_edge_is_gradient_flow(problem, flows):
    """With 2/η = 100 far above the sharpness (≤ 25) the central flow is gradient flow
    (solve_ivp of −∇L) to the solver's tolerance, for both members."""
    _, ensemble, _, derivatives = problem
    ts = np.linspace(0, T1, N_SAVE)
    for b in range(2):
        plain = solve_ivp(lambda t, y: -np.asarray(derivatives(jnp.asarray(y))[0]), (0, T1),
                          np.asarray(_theta(ensemble[b])), method="DOP853", t_eval=ts,
                          rtol=1e-10, atol=1e-12)
        theta = np.asarray(flows[LR_STABLE].values["theta"][b])
        assert np.max(np.abs(theta - plain.y.T)) / np.max(np.abs(plain.y)) < 1e-6
    # Member 1 never reaches 2/η = 22.2 either (sharpness ≤ 20.5): gradient flow at LR_EDGE.
    same = np.asarray(flows[LR_EDGE].values["theta"][1])
    assert np.max(np.abs(same - np.asarray(flows[LR_STABLE].values["theta"][1]))) < 1e-6


@pytest.fixture(scope="module")
def oscillate(problem):
    """The field's quantities at a point, one compiled program for every field (lr and
    relaxation are traced)."""
    _, _, loss, _ = problem
    return eqx.filter_jit(lambda field, y: field.oscillation(jax.grad(loss), y, loss))


def _numpy_field(derivatives, y, lr, relaxation):
    g, h, third = (np.asarray(a) for a in derivatives(y))
    w, v = np.linalg.eigh(h)
    grad_s = np.einsum("ijk,j,k->i", third, v[:, -1], v[:, -1])
    q = relaxation / lr**2 * (2 - lr * w[-1]) + grad_s @ g
    sigma2 = max(0.0, -2 * q / (grad_s @ grad_s))
    return g, w[-1], grad_s, sigma2


def test_pointwise_field_and_prediction(problem, oscillate):
    """At a point past the edge (ηS = 2.2: the flow pulls the sharpness back): velocity,
    σ², sharpness and the predicted loss L + ½σ²S against numpy (dense eigh, dense
    third-derivative tensor), to 1e-9 relative."""
    _, ensemble, loss, derivatives = problem
    y = _theta(ensemble[0])
    lr = 2.2 / float(np.linalg.eigvalsh(np.asarray(derivatives(y)[1]))[-1])
    osc = oscillate(cn.CentralFlowField(lr, relaxation=20.0), y)
    g, sharpness, grad_s, sigma2 = _numpy_field(derivatives, y, lr, 20.0)
    assert sigma2 > 0.05  # the oscillation is on here
    np.testing.assert_allclose(osc.covariance[0, 0], sigma2, rtol=1e-9)
    np.testing.assert_allclose(osc.eigenvalues[0], sharpness, rtol=1e-12)
    np.testing.assert_allclose(osc.velocity, -g - 0.5 * sigma2 * grad_s, rtol=1e-9,
                               atol=1e-9 * np.max(np.abs(g)))
    np.testing.assert_allclose(osc.predicted_loss, float(loss(y)) + 0.5 * sigma2 * sharpness,
                               rtol=1e-12)
    # Negative control: the oscillation term is resolved (the velocity is not −∇L).
    assert np.max(np.abs(np.asarray(osc.velocity) + g)) > 1e-2 * np.max(np.abs(g))


def test_pointwise_below_the_edge(problem, oscillate):
    """With ηS = 1 (far from 2) the field is exactly −∇L and Σ = 0."""
    _, ensemble, _, derivatives = problem
    y = _theta(ensemble[1])
    g, h, _ = (np.asarray(a) for a in derivatives(y))
    lr = 1.0 / float(np.linalg.eigvalsh(h)[-1])
    osc = oscillate(cn.CentralFlowField(lr), y)
    assert float(osc.covariance[0, 0]) == 0.0
    np.testing.assert_allclose(osc.velocity, -g, rtol=1e-12, atol=1e-14 * np.max(np.abs(g)))
    assert float(osc.predicted_loss) == float(osc.loss)
    # Weight decay λ: GD on L + λ‖θ‖²/2, so −(∇L + λθ) and the eigenvalues of H + λI.
    osc = oscillate(cn.CentralFlowField(lr, weight_decay=0.3), y)
    np.testing.assert_allclose(osc.velocity, -g - 0.3 * np.asarray(y), rtol=1e-12,
                               atol=1e-14 * np.max(np.abs(g)))
    np.testing.assert_allclose(osc.eigenvalues[0], np.linalg.eigvalsh(h)[-1] + 0.3,
                               rtol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_top_eigenpairs_against_eigh(solver):
    """Top-3 eigenpairs of a random symmetric 30×30 matrix (HVP = matvec) against
    numpy.linalg.eigh to 1e-10 (Lanczos with 30 steps spans the whole space)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    a = a + a.T
    w, u = jax.jit(lambda m: top_eigenpairs(lambda v: m @ v, 30, 3, solver, 30))(a)
    ref_w, ref_v = np.linalg.eigh(a)
    np.testing.assert_allclose(w, ref_w[::-1][:3], rtol=1e-10)
    overlap = np.abs(np.sum(np.asarray(u) * ref_v[:, ::-1][:, :3], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
def test_sdcp_optimality(k):
    """The k > 1 complementarity solver on random instances: X ⪰ 0, M = q + ½B[X] ⪰ 0 and
    ⟨X, M⟩ = 0 (checked with numpy), with X ≠ 0 (some constraints active) and the k = 1
    closed form recovered when all but one direction is slack."""
    rng = np.random.default_rng(k)
    rows, cols = np.triu_indices(k)
    solve = jax.jit(lambda q, gram: solve_sdcp(q, gram, k, 2000))
    for trial in range(4):
        g = rng.normal(size=(len(rows), 6))
        q = rng.normal(size=(k, k))
        q = q + q.T
        x = np.asarray(solve(q, g @ g.T))
        full = np.zeros((k, k, 6))
        full[rows, cols], full[cols, rows] = g, g
        m = q + 0.5 * np.einsum("ijp,klp,kl->ij", full, full, x)
        scale = np.max(np.abs(q))
        assert np.linalg.eigvalsh(x).min() > -1e-10
        assert np.linalg.eigvalsh(m).min() > -1e-6 * scale, (trial, np.linalg.eigvalsh(m))
        assert abs(np.sum(x * m)) < 1e-6 * scale * max(1.0, np.abs(x).max())
        if np.linalg.eigvalsh(q).min() < 0:
            assert np.abs(x).max() > 0  # a violated constraint must be answered
    # One direction at the edge, the others slack (q_ii ≫ 0, no coupling): the scalar answer.
    g = np.zeros((len(rows), 6))
    g[0, 0] = 2.0
    for i in range(1, len(rows)):
        g[i, i % 6] = 1.0 if i % 6 else 0.5
    q = np.diag([-3.0] + [10.0] * (k - 1))
    x = np.asarray(solve(q, g @ g.T))
    np.testing.assert_allclose(x[0, 0], 2 * 3.0 / 4.0, rtol=1e-8)


def test_arguments():
    with pytest.raises(cn.ArgumentError, match="lr"):
        cn.CentralFlowField(0.0)
    with pytest.raises(cn.ArgumentError, match="relaxation"):
        cn.CentralFlowField(0.1, relaxation=-1.0)
    with pytest.raises(cn.ArgumentError, match="k"):
        cn.CentralFlowField(0.1, k=0)
    with pytest.raises(cn.ArgumentError, match="eigensolver"):
        cn.CentralFlowField(0.1, eigensolver="power")
    with pytest.raises(cn.ArgumentError, match="lanczos_steps"):
        cn.CentralFlowField(0.1, k=3, lanczos_steps=2)
    with pytest.raises(cn.ArgumentError, match="weight_decay"):
        cn.CentralFlowField(0.1, weight_decay=-1.0)
    model = cn.DeepLinear.random([2, 1], key=jax.random.PRNGKey(0))
    objective = cn.make_objective(cn.MSE(), cn.teacher_dataset(
        model, cn.gaussian_inputs(jax.random.PRNGKey(1), 4, (2,))), model)
    with pytest.raises(cn.ArgumentError, match="objective"):
        cn.central_flow_comparison(None, model, 0.1, 8, n_save=3)
    with pytest.raises(cn.ArgumentError, match="steps"):
        cn.central_flow_comparison(objective, model, 0.1, 7, n_save=3)
    with pytest.raises(cn.ArgumentError, match="lr"):
        cn.central_flow_comparison(objective, model, 0.0, 8, n_save=3)


# In the default suite (8.6 s): the only default test past the edge, where the central flow's
# eigenvalues differ from the stable flow's (a mutant reporting the latter's survived).
def test_central_flow_tracks_gradient_descent_at_the_edge():
    """GD at η = 0.104 (2/η = 19.23) on a 4-5-5-2 deep linear net (init 0.55): member 0's
    gradient flow sharpens to 19.92, past 2/η, so GD runs at the edge of stability for its
    200 steps; member 1's stays below (18.86). Measured (saves every 4 steps, t = η·step):
    the central flow's sharpness is pinned at 2/η to 1e-6 while GD's oscillates in
    19.3–19.9 and gradient flow's sits at 19.92; GD's loss (moving average, 4 steps) stalls
    at 1e-3–2e-3 and the central flow predicts 1.5e-3–1.4e-2 (ratio 0.6–5.4 over t ≥ 5),
    where gradient flow's falls to 1e-14; ‖θ_GD − θ_CF‖ / ‖θ_GD − θ_GF‖ = 0.79 at the end
    (both carry the same O(η) offset of GD's first steps, ~0.12). Member 1 is a negative
    control: central flow = gradient flow there, its balance laws conserved to 3e-9, while
    member 0's central flow drifts them by 1.6e-2 (GD: 4.0e-2)."""
    kt, kx, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random([4, 2], key=kt, init_scale=2.0)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 32, (4,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([4, 5, 5, 2], key=k, init_scale=0.55), ki, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    lr = 0.104
    c = cn.central_flow_comparison(objective, ensemble, lr, 200, n_save=51, window=4)
    edge = 2 / lr
    late = np.asarray(c.t) >= 5.0
    cf_s = np.asarray(c.central_eigenvalues[0, :, 0])
    assert np.all(cf_s <= edge * (1 + 1e-6))
    np.testing.assert_allclose(cf_s[late], edge, rtol=1e-5)  # pinned at 2/η
    assert np.all(np.asarray(c.stable_sharpness[0, late]) > 1.03 * edge)  # GF is past it
    assert np.all(np.asarray(c.covariance[0, late, 0, 0]) > 0)
    ratio = np.asarray(c.central_predicted_loss[0, late] / c.gd_loss_average[0, late])
    assert np.all((ratio > 1 / 8) & (ratio < 8)), ratio
    assert np.all(np.asarray(c.stable_loss[0, late]) < 1e-4 * np.asarray(
        c.gd_loss_average[0, late]))
    d_cf, d_gf = np.asarray(c.distance_central[0]), np.asarray(c.distance_stable[0])
    assert d_cf[-1] < 0.9 * d_gf[-1]
    # The distance gap opens at the edge: GD moves with the central flow, not with GF.
    assert (d_gf[-1] - d_cf[-1]) > 0.02
    # Member 1 never reaches the edge: the central flow is gradient flow.
    np.testing.assert_allclose(c.distance_central[1], c.distance_stable[1], rtol=1e-6)
    for law in ("balance[0]", "balance[1]"):
        assert float(c.central.max_drift[law][1]) < 1e-7
        assert 1e-3 < float(c.central.max_drift[law][0]) < float(c.gd.max_drift[law][0])


def test_config_kind():
    """`[[dynamics]] kind = "central_flow"` parses (the shipped config too) and is validated
    like every table: `lr` required and > 0, `k` ≥ 1, `relaxation` > 0."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    raw = tomllib.loads((root / "configs" / "edge_of_stability.toml").read_text())
    config = cn.parse_config(raw)
    central = [run for run in config.dynamics if run.kind == "central_flow"]
    assert [run.lr for run in central] == [0.2, 0.1] and central[0].relaxation == 2.0
    for bad, field in (({"lr": None}, "lr"), ({"lr": -0.1}, "lr"), ({"k": 0}, "k"),
                       ({"relaxation": 0.0}, "relaxation")):
        entry = {"kind": "central_flow", "lr": 0.1, "t1": 1.0, **bad}
        entry = {k: v for k, v in entry.items() if v is not None}
        with pytest.raises(cn.ConfigError, match=field):
            cn.parse_config({**raw, "dynamics": [entry]})


def test_midpoint_distances_against_closed_forms():
    """On a linear regression (a quadratic loss: no third derivative, so the central flow is
    gradient flow) GD, its second-order midpoints θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4 and
    gradient flow have closed forms in the Hessian's eigenbasis: θ* + (I − ηH)^k(θ₀ − θ*)
    and θ* + e^{−tH}(θ₀ − θ*). ηλ_max = 1.6, so the top mode flips sign every step and the
    midpoint is far from the iterate. The comparison's four distances match numpy/scipy."""
    from scipy.linalg import expm

    kx, ki = jax.random.split(jax.random.PRNGKey(3))
    x = cn.gaussian_inputs(kx, 8, (3,))
    target = cn.DeepLinear.random([3, 2], key=jax.random.PRNGKey(4))
    data = cn.teacher_dataset(target, x, noise=0.3, key=jax.random.PRNGKey(5))
    model = cn.DeepLinear.random([3, 2], key=ki)
    objective = cn.make_objective(cn.MSE(), data, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y0, unravel = jfu.ravel_pytree(params)

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    h = np.asarray(jax.hessian(loss)(y0))
    g0 = np.asarray(jax.grad(loss)(y0))
    lr = 1.6 / np.linalg.eigvalsh(h)[-1]
    steps, n_save = 4, 3
    c = cn.central_flow_comparison(objective, model, lr, steps, n_save=n_save, rtol=1e-11)
    y0 = np.asarray(y0)
    star = y0 - np.linalg.solve(h, g0)

    def gd(k):
        return star + np.linalg.matrix_power(np.eye(len(y0)) - lr * h, k) @ (y0 - star)

    at = np.arange(n_save) * (steps // (n_save - 1))
    flow = np.stack([star + expm(-lr * k * h) @ (y0 - star) for k in at])
    iterate = np.stack([gd(k) for k in at])
    midpoint = np.stack([y0] + [(gd(k - 1) + 2 * gd(k) + gd(k + 1)) / 4 for k in at[1:]])
    scale = np.linalg.norm(y0 - star)
    for name, reference in (("distance_stable", iterate), ("distance_central", iterate),
                            ("midpoint_stable", midpoint), ("midpoint_central", midpoint)):
        expected = np.linalg.norm(reference - flow, axis=1)
        np.testing.assert_allclose(np.asarray(getattr(c, name))[0], expected,
                                   atol=1e-8 * scale, err_msg=name)
    # Negative control: the midpoint removes the oscillation, so it is much closer.
    assert np.all(np.asarray(c.midpoint_stable[0, 1:]) < 0.5 * np.asarray(
        c.distance_stable[0, 1:]))


@pytest.mark.slow
def test_central_flow_tracks_gd_midpoints_from_below_the_edge():
    """Issue 25's distance claim, in the paper's setting: GD starts well below the edge
    (ηS₀ = 0.23: a 4-5-5-2 deep linear net, init 0.2, η = 0.12) and progressive sharpening
    brings it to 2/η = 16.67 by t ≈ 2.2 (gradient flow's sharpness goes on to 18.60).
    Measured over the EoS phase t ≥ 5 (saves every 6 steps): from GD's second-order
    midpoints (the paper's measure), ‖θ*_GD − θ_CF‖ / ‖θ*_GD − θ_GF‖ = 0.44–0.56 (0.44 at
    t = 18: 0.034 vs 0.077). From GD's iterates it is 1.20: they sit about σ away from the
    centre (σ² = 0.0296, GD's measured (‖θ−θ_CF‖² − ‖θ*−θ_CF‖²) = 0.033). GD's averaged
    loss stalls at 0.321, the central flow predicts 0.261 (ratio 0.81), gradient flow
    falls to 1e-14. Before the edge the two distances are equal."""
    kt, kx, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random([4, 2], key=kt, init_scale=2.0)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 32, (4,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([4, 5, 5, 2], key=k, init_scale=0.2), ki, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    lr = 0.12
    c = cn.central_flow_comparison(objective, ensemble[1], lr, 150, n_save=26, window=4)
    t = np.asarray(c.t)
    assert 0.2 < lr * float(c.gd_sharpness[0, 0]) < 0.3  # well below the edge at the start
    early, late = t <= 1.0, t >= 5.0
    mid_cf, mid_gf = np.asarray(c.midpoint_central[0]), np.asarray(c.midpoint_stable[0])
    np.testing.assert_allclose(mid_cf[early], mid_gf[early], rtol=1e-6)
    ratio = mid_cf[late] / mid_gf[late]
    assert np.all((ratio > 0.35) & (ratio < 0.65)), ratio
    assert 0.38 < ratio[-1] < 0.5, ratio[-1]
    # Honest: from the iterates the ratio is above 1 (the oscillation dominates).
    iterate = np.asarray(c.distance_central[0, late] / c.distance_stable[0, late])
    assert np.all((iterate > 1.05) & (iterate < 1.4)), iterate
    # GD's oscillation about the centre, against the predicted covariance σ².
    sigma2 = np.asarray(c.covariance[0, late, 0, 0])
    seen = np.asarray(c.distance_central[0, late]) ** 2 - mid_cf[late] ** 2
    assert np.all((seen / sigma2 > 0.8) & (seen / sigma2 < 1.4)), seen / sigma2
    np.testing.assert_allclose(np.asarray(c.central_eigenvalues[0, late, 0]), 2 / lr,
                               rtol=1e-5)
    assert np.all(np.asarray(c.stable_sharpness[0, late]) > 1.1 * 2 / lr)
    loss_ratio = np.asarray(c.central_predicted_loss[0, late] / c.gd_loss_average[0, late])
    assert np.all((loss_ratio > 0.7) & (loss_ratio < 0.95)), loss_ratio
    assert np.all(np.asarray(c.stable_loss[0, late]) < 1e-2 * np.asarray(
        c.gd_loss_average[0, late]))


# --- Scalar RMSProp (the paper's §4): `RMSPropCentralFlow`, `rmsprop_central_flow_comparison`.
# The same 4-5-5-2 deep linear net. With η = 0.03, β₂ = 0.9 and ν₀ = ‖∇L(θ₀)‖² the effective
# sharpness ηS/√ν starts at 0.04–0.05 and rises as ν follows the shrinking gradient: member 0
# reaches 2 near step 110, member 1 near step 140; after a catapult both oscillate about 2.
RMS_LR, RMS_BETA2, RMS_STEPS, RMS_SAVE, RMS_WINDOW = 0.03, 0.9, 240, 13, 20


@pytest.fixture(scope="module")
def rmsprop(problem):
    objective, ensemble, _, _ = problem
    return cn.rmsprop_central_flow_comparison(
        objective, ensemble, RMS_LR, RMS_STEPS, beta2=RMS_BETA2, n_save=RMS_SAVE,
        window=RMS_WINDOW, rtol=1e-9, max_steps=5000)


def test_rmsprop_below_the_edge_is_the_stable_flow(problem, rmsprop):
    """Below the edge (ηS/√ν < 1) the central flow is the stable flow, and both solve
    dθ/dt = −∇L/√ν, dν/dt = (1 − β₂)/(β₂η)(‖∇L‖² − ν) (scipy's solve_ivp, rtol 1e-11)."""
    _, ensemble, loss, _ = problem
    grad = jax.jit(jax.grad(loss))
    c = (1 - RMS_BETA2) / RMS_BETA2
    t = np.asarray(rmsprop.t)

    def f(_, y):
        g = np.asarray(grad(jnp.asarray(y[:-1])))
        return np.append(-g / np.sqrt(y[-1]), c / RMS_LR * (g @ g - y[-1]))

    for b in range(2):
        below = np.asarray(rmsprop.central_effective_sharpness[b]) < 1
        n = int(np.argmin(below))  # the saves before the first one at or past 1
        assert n >= 5 and np.all(below[:n])
        np.testing.assert_array_equal(np.asarray(rmsprop.variance[b, :n]), 0.0)
        np.testing.assert_allclose(rmsprop.central_nu[b, :n], rmsprop.stable_nu[b, :n],
                                   rtol=1e-12)
        theta0 = np.asarray(_theta(ensemble[b]))
        g0 = np.asarray(grad(jnp.asarray(theta0)))
        ref = solve_ivp(f, (0, t[n - 1]), np.append(theta0, g0 @ g0), t_eval=t[:n],
                        rtol=1e-11, atol=1e-12, method="DOP853")
        ref_loss = [float(loss(jnp.asarray(y))) for y in ref.y[:-1].T]
        np.testing.assert_allclose(rmsprop.central_nu[b, :n], ref.y[-1], rtol=1e-6)
        np.testing.assert_allclose(rmsprop.central_loss[b, :n], ref_loss, rtol=1e-6)
        # Negative control: the time scaling matters (the paper's 1/β₂ left out).
        assert not np.allclose(
            rmsprop.central_nu[b, :n],
            solve_ivp(lambda s, y: f(s, y) * np.append(np.ones(y.size - 1), RMS_BETA2),
                      (0, t[n - 1]), np.append(theta0, g0 @ g0), t_eval=t[:n],
                      rtol=1e-9).y[-1], rtol=1e-3)


def test_rmsprop_central_flow_at_the_edge(rmsprop):
    """At the edge the central flow pins ηS/√ν at 2 while discrete RMSProp oscillates about
    it, and the central flow's ν and predicted loss L + ½Sσ² track RMSProp's (moving
    averages) far better than the stable flow, whose ν and loss collapse."""
    for b in range(2):
        edge = np.asarray(rmsprop.variance[b]) > 0
        first = int(np.argmax(edge))
        assert 5 <= first <= 8 and np.all(edge[first:])
        np.testing.assert_allclose(rmsprop.central_effective_sharpness[b, first:], 2.0,
                                   atol=1e-6)
        # The stable flow passes 2 and keeps rising (ν → 0 with the gradient); so stiff that
        # Tsit5 may run out of steps (member 0: `max_steps`, NaN saves after it).
        stable_sharp = np.asarray(rmsprop.stable_effective_sharpness[b, first + 1:])
        assert np.all(np.nan_to_num(stable_sharp, nan=np.inf) > 2.3), stable_sharp
        assert int(rmsprop.stable_status[b]) in (0, 1)  # success or max_steps, never NaN-ok
        assert (int(rmsprop.stable_status[b]) == 0) == bool(np.all(np.isfinite(stable_sharp)))
        # The last four saves (steps 180–240), past the catapult: RMSProp about 2.
        late = slice(-4, None)
        sharp = np.asarray(rmsprop.effective_sharpness[b, late])
        assert np.all(np.abs(sharp - 2) < 0.2), sharp
        average = np.asarray(rmsprop.loss_average[b, late])
        central = np.abs(np.asarray(rmsprop.central_predicted_loss[b, late]) - average)
        stable = np.abs(np.nan_to_num(np.asarray(rmsprop.stable_loss[b, late]), nan=0.0)
                        - average)
        # Measured: the central flow's predicted loss is within 1–4 % (member 0) and 5–22 %
        # (member 1) of RMSProp's 20-step average (~2e-3); the stable flow's loss is ~1e-14:
        # the ratio of the errors is 0.038 and 0.22.
        ratio = np.max(central / stable)
        assert 0.01 < ratio < 0.35, ratio
        assert np.all(central / average < 0.3)
        # ν: RMSProp's ν_k oscillates too; over these saves its mean is within 5 % of the
        # central flow's (measured 4.3 % and 1.1 %), the stable flow's is ≥ 10× smaller.
        nu = np.mean(np.asarray(rmsprop.nu[b, late]))
        assert abs(np.mean(np.asarray(rmsprop.central_nu[b, late])) / nu - 1) < 0.05
        stable_nu = np.asarray(rmsprop.stable_nu[b, late])  # (not saved past max_steps)
        assert np.all(stable_nu[np.isfinite(stable_nu)] / nu < 0.1)
    assert np.all(np.asarray(rmsprop.status) == 0)
    assert np.all(np.asarray(rmsprop.central_status) == 0)


def test_rmsprop_discrete_run_against_numpy(problem, rmsprop):
    """The discrete half of the comparison against scalar RMSProp written in numpy
    (ν_{k+1} = β₂ν_k + (1 − β₂)‖g_k‖², θ_{k+1} = θ_k − ηg_k/√ν_{k+1}, ν₀ = ‖∇L(θ₀)‖²): its
    loss, ν and the moving average of its loss at the saves, up to the save where the run
    reaches the edge of stability (the central flow's σ² > 0; there the two agree to 2e-14).
    Past it the oscillation amplifies round-off: the two runs part (58 % one save later), as
    any two summation orders would. Every distance starts at 0: the three runs share θ₀, and
    the midpoint at the start is θ₀ itself."""
    objective, ensemble, loss, _ = problem
    grad = jax.jit(jax.grad(loss))
    every = RMS_STEPS // (RMS_SAVE - 1)
    half = RMS_WINDOW // 2
    for b in range(ensemble.size):
        theta = np.asarray(_theta(ensemble[b]))
        g = np.asarray(grad(jnp.asarray(theta)))
        nu = g @ g
        losses, nus = [], []
        for _ in range(RMS_STEPS + 1):
            losses.append(float(loss(jnp.asarray(theta))))
            nus.append(nu)
            g = np.asarray(grad(jnp.asarray(theta)))
            nu = RMS_BETA2 * nu + (1 - RMS_BETA2) * (g @ g)
            theta = theta - RMS_LR * g / np.sqrt(nu)
        losses = np.array(losses)
        edge = int(np.argmax(np.asarray(rmsprop.variance[b]) > 0))
        assert 3 <= edge < RMS_SAVE - 1  # below the edge for a while, then at it
        below = slice(0, edge + 1)
        np.testing.assert_allclose(rmsprop.loss[b, below], losses[::every][below], rtol=1e-11)
        np.testing.assert_allclose(rmsprop.nu[b, below], np.array(nus)[::every][below],
                                   rtol=1e-11)
        for s in range(1, edge + 1):  # centred windows that end before the edge's save
            k = s * every
            if k + RMS_WINDOW - half <= edge * every:
                np.testing.assert_allclose(rmsprop.loss_average[b, s],
                                           losses[k - half:k - half + RMS_WINDOW].mean(),
                                           rtol=1e-11)
    for name in ("distance_central", "distance_stable", "midpoint_central", "midpoint_stable"):
        np.testing.assert_array_equal(np.asarray(getattr(rmsprop, name))[:, 0], 0.0)
    assert np.all(np.asarray(rmsprop.distance_central)[:, 1:] > 0)


def test_rmsprop_pointwise_against_finite_differences(problem):
    """At a state past the edge (ηS/√ν = 2.02, near a minimum: ‖∇L‖² < ν) σ² is what holds
    the effective sharpness E = ηS/√ν on its relaxation, dE/dt = κ(2 − E): checked with E,
    ∇S and ∂E/∂ν from numpy's eigvalsh of dense Hessians and central differences (no third
    derivatives), and the velocity and dν/dt of the paper's equations from them."""
    objective, ensemble, loss, _ = problem
    grad = jax.jit(jax.grad(loss))
    hessian = jax.jit(jax.hessian(loss))
    y = jax.jit(lambda y: jax.lax.fori_loop(0, 400, lambda _, y: y - 0.02 * grad(y), y))(
        _theta(ensemble[0]))
    theta = np.asarray(y)

    def sharp(z):
        return np.linalg.eigvalsh(np.asarray(hessian(jnp.asarray(z))))[-1]

    s = sharp(theta)
    nu = (RMS_LR * s / 2.02) ** 2
    g = np.asarray(grad(y))
    assert g @ g < 0.1 * nu
    h = 1e-5
    eye = np.eye(theta.size)
    grad_s = np.array([(sharp(theta + h * e) - sharp(theta - h * e)) / (2 * h) for e in eye])
    c, kappa = (1 - RMS_BETA2) / RMS_BETA2, 2.0 / RMS_LR
    flow = cn.RMSPropCentralFlow(RMS_LR, RMS_BETA2)
    o = eqx.filter_jit(flow.oscillation)(grad, y, jnp.asarray(nu), loss)

    def rates(sigma2):
        theta_dot = -(g + 0.5 * sigma2 * grad_s) / np.sqrt(nu)
        nu_dot = c / RMS_LR * (g @ g + s**2 * sigma2 - nu)
        effective_dot = (RMS_LR * grad_s @ theta_dot / np.sqrt(nu)
                         - RMS_LR * s / (2 * nu**1.5) * nu_dot)
        return theta_dot, nu_dot, effective_dot

    target = kappa * (2 - RMS_LR * s / np.sqrt(nu))
    d0, d1 = rates(0.0)[2], rates(1.0)[2] - rates(0.0)[2]
    sigma2 = (target - d0) / d1
    assert sigma2 > 0
    np.testing.assert_allclose(float(o.variance), sigma2, rtol=1e-5)
    np.testing.assert_allclose(float(o.effective_sharpness), 2.02, rtol=1e-10)
    theta_dot, nu_dot, _ = rates(sigma2)
    np.testing.assert_allclose(o.velocity, theta_dot, rtol=1e-5, atol=1e-7 * np.abs(
        theta_dot).max())
    np.testing.assert_allclose(float(o.nu_rate), nu_dot, rtol=1e-5)
    np.testing.assert_allclose(float(o.predicted_loss), float(loss(y)) + 0.5 * s * sigma2,
                               rtol=1e-8)
    # Negative control: ν's oscillation term with σ² in place of S²σ² (the JAX anchor's U
    # for HU) holds E on a different σ², far outside the tolerance.
    wrong = c / RMS_LR * (g @ g + sigma2 - nu)
    assert abs(wrong - float(o.nu_rate)) > 0.1 * abs(float(o.nu_rate))
    # and σ² 10 % off breaks the relaxation the reference requires.
    assert abs(rates(1.1 * sigma2)[2] - target) > 1e-3 * abs(target)


def test_rmsprop_arguments(problem):
    with pytest.raises(cn.ArgumentError, match="beta2"):
        cn.RMSPropCentralFlow(0.1, beta2=1.0)
    with pytest.raises(cn.ArgumentError, match="eps"):
        cn.RMSPropCentralFlow(0.1, eps=-1.0)
    with pytest.raises(cn.ArgumentError, match="lr"):
        cn.RMSPropCentralFlow(0.0)
    objective, ensemble, _, _ = problem
    with pytest.raises(cn.ArgumentError, match="steps"):
        cn.rmsprop_central_flow_comparison(objective, ensemble, 0.1, 7, n_save=3)
    with pytest.raises(cn.ArgumentError, match="nu0"):
        cn.rmsprop_central_flow_comparison(objective, ensemble, 0.1, 8, n_save=3, nu0=0.0)


def test_lanczos_stops_growing_at_an_invariant_subspace():
    """H = diag(5, 5, 5, 1, 1, 1): a Krylov space from any start closes after two vectors.
    Lanczos with 6 steps must give the eigenvalues 5 and 1 with eigenvectors of H (numpy's
    `eigh` as the reference), not Ritz values of whatever it appends after the space closed."""
    from conservation._dynamics.central import top_eigenpairs

    h = np.diag([5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    values, vectors = top_eigenpairs(lambda z: jnp.asarray(h) @ z, 6, 2, "lanczos",
                                     lanczos_steps=6)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(h)[::-1][[0, 3]], rtol=1e-12)
    vectors = np.asarray(vectors)
    np.testing.assert_allclose(h @ vectors, vectors * np.asarray(values), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, rtol=1e-12)


def test_sdcp_without_third_derivatives_returns_no_oscillation_for_every_k():
    """With B = 0 (all third derivatives zero, a quadratic loss) no oscillation can lower the
    sharpness: the k = 1 closed form returns x = 0 (g² = 0), and so must the k = 2 iterative
    solver, for q with a negative eigenvalue (over the edge) and a positive one."""
    from conservation._dynamics.central import solve_sdcp

    for q in (jnp.asarray([[-0.3, 0.1], [0.1, 0.2]]), jnp.asarray([[0.3, 0.0], [0.0, 0.2]])):
        np.testing.assert_array_equal(solve_sdcp(q, jnp.zeros((3, 3)), 2), np.zeros((2, 2)))
    np.testing.assert_array_equal(solve_sdcp(jnp.asarray([[-0.3]]), jnp.zeros((1, 1)), 1),
                                  np.zeros((1, 1)))
