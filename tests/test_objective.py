"""Losses, and the moment fast path against the per-sample objective."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

import conservation as cn


def _random_targets(key, model, xs):
    shape = jax.eval_shape(jax.vmap(model), xs).shape
    return jax.random.normal(key, shape)


@eqx.filter_jit
def _both_paths(fast, model):
    """(loss, grad) through the moments and per sample."""
    moment = eqx.filter_value_and_grad(fast)(model)
    sample = eqx.filter_value_and_grad(fast.sample_risk)(model)
    return moment, sample


@pytest.mark.parametrize("name", [
    "deep_linear", "quadratic", "sextic_neuron", "deep_quadratic", "deep_inhomogeneous",
    "attention_bare", "attention_decay", "attention_heads_out", "attention_heads_concat"])
def test_moment_path_equals_per_sample(zoo, getkey, name):
    model, xs = zoo[name]
    data = cn.Dataset(xs, _random_targets(getkey(), model, xs))
    fast = cn.make_objective(cn.MSE(), data, model)
    assert fast.moments is not None
    (l_fast, g_fast), (l_slow, g_slow) = _both_paths(fast, model)
    assert relative_error(l_fast, l_slow) <= 1e-12
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow)):
        assert relative_error(a, b) <= 1e-12


def test_moments_do_not_depend_on_chunking(zoo, getkey):
    model, _ = zoo["attention_decay"]
    xs = jax.random.normal(getkey(), (37, 9, 4))
    data = cn.Dataset(xs, _random_targets(getkey(), model, xs))
    whole = cn.Moments.from_data(model, data, chunk_size=37)
    chunked = cn.Moments.from_data(model, data, chunk_size=8)  # 5 chunks, last one padded
    single = cn.Moments.from_data(model, data, chunk_size=1)  # the smallest chunk allowed
    for m in (chunked, single):
        for a, b in [(whole.M, m.M), (whole.B, m.B), (whole.c, m.c)]:
            assert relative_error(a, b) <= 1e-13
    assert whole.M.shape == (64, 64) and whole.n == 37


def _compiled_cost(objective, model):
    """XLA's (flops, bytes accessed) of the compiled loss `objective(model)`."""
    cost = jax.jit(lambda o, m: o(m)).lower(objective, model).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], cost["bytes accessed"]


def test_moment_cost_is_independent_of_sample_count(zoo, getkey):
    """More samples leave the moment objective's work unchanged: its compiled loss does the
    same flops and memory traffic for N = 10 and 1000 (the per-sample loss's grow with N, so
    the measurement sees N), and the N-independent moments are the data's own
    (M = XᵀX/N, B = XᵀY/N, C = YᵀY/N for a deep linear net, ψ(x) = x), which give its loss."""
    model, _ = zoo["deep_linear"]
    product = np.asarray(model.end_to_end())
    costs = {}
    for n in (10, 1000):
        xs = jax.random.normal(getkey(), (n, 3))
        data = cn.Dataset(xs, _random_targets(getkey(), model, xs))
        objective = cn.make_objective(cn.MSE(), data, model)
        x, y = np.asarray(data.x), np.asarray(data.y)
        for got, want in ((objective.moments.M, x.T @ x / n), (objective.moments.B, x.T @ y / n),
                          (objective.moments.C, y.T @ y / n)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(float(objective(model)),
                                   np.mean(np.sum((x @ product.T - y) ** 2, axis=1)), rtol=1e-12)
        per_sample = cn.make_objective(cn.MSE(), data, model, moments=False)
        costs[n] = _compiled_cost(objective, model), _compiled_cost(per_sample, model)
    assert costs[10][0] == costs[1000][0]
    assert costs[1000][1][0] > 50 * costs[10][1][0]  # flops ∝ N on the per-sample path


def test_make_objective_chooses_and_validates_paths(zoo, getkey):
    model, xs = zoo["quadratic"]
    data = cn.Dataset(xs, _random_targets(getkey(), model, xs))
    assert cn.make_objective(cn.LogCosh(), data, model).moments is None
    assert cn.make_objective(cn.MSE(), data, model, moments=False).moments is None
    with pytest.raises(ValueError, match="moments=True"):
        cn.make_objective(cn.LogCosh(), data, model, moments=True)
    with pytest.raises(TypeError, match="loss"):
        cn.make_objective("mse", data, model)


def test_losses_match_their_definitions(getkey):
    z = jax.random.normal(getkey(), (6, 3)) * 3
    y = jax.random.normal(getkey(), (6, 3))
    np.testing.assert_allclose(cn.MSE()(z, y), np.sum((z - y) ** 2), rtol=1e-14)
    np.testing.assert_allclose(cn.Quartic()(z, y), np.sum((z - y) ** 4), rtol=1e-14)
    np.testing.assert_allclose(cn.LogCosh()(z, y), np.sum(np.log(np.cosh(z - y))), rtol=1e-13)
    assert np.isfinite(cn.LogCosh()(jnp.array([800.0]), jnp.array([0.0])))  # no overflow
    p = jax.nn.softmax(y, axis=-1)
    np.testing.assert_allclose(cn.CrossEntropy()(z, p),
                               -np.sum(p * jax.nn.log_softmax(z, axis=-1)), rtol=1e-13)
    # One channel: the logistic loss −y log σ(z) − (1 − y) log(1 − σ(z)).
    z1, y1 = z[:, :1], jax.nn.sigmoid(y[:, :1])
    s = jax.nn.sigmoid(z1)
    np.testing.assert_allclose(cn.CrossEntropy()(z1, y1),
                               -np.sum(y1 * np.log(s) + (1 - y1) * np.log(1 - s)), rtol=1e-12)


def test_dataset_validation_and_subset(getkey):
    x, y = jnp.ones((5, 2)), jnp.arange(5.0)[:, None]
    # One target per sample given as a vector is a column (integer class labels, scalars).
    assert cn.Dataset(x, jnp.arange(5.0)).y.shape == (5, 1)
    with pytest.raises(ValueError, match="samples"):
        cn.Dataset(x, jnp.ones((4, 1)))
    np.testing.assert_array_equal(cn.Dataset(x, y).subset(jnp.array([3, 1])).y[:, 0], [3.0, 1.0])


def test_whiten_is_exact(getkey):
    x = cn.whiten(jax.random.normal(getkey(), (40, 5)) @ jax.random.normal(getkey(), (5, 5)))
    np.testing.assert_allclose(x.T @ x / 40, np.eye(5), atol=1e-13)


def _longdouble_loss_and_grad(x, y, w):
    """Per-sample MSE of x ↦ W x and its gradient in W, in numpy longdouble (64-bit mantissa
    on x86: ~11 more bits than float64) from the float64 data and weights."""
    x, y, w = (np.asarray(a).astype(np.longdouble) for a in (x, y, w))
    residual = x @ w.T - y
    n = x.shape[0]
    return np.sum(residual**2) / n, 2.0 * residual.T @ x / n


@pytest.fixture(scope="module")
def near_fit_problem():
    key = jax.random.PRNGKey(3)
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (40, 5))
    model = cn.DeepLinear((jax.random.normal(kw, (2, 5)),))
    noise = jax.random.normal(ke, (40, 2))
    return model, x, noise


@pytest.mark.parametrize("ratio, loss_tol, grad_tol", [(1.0, 1e-13, 1e-12),
                                                       (1e-10, 1e-9, 1e-9),
                                                       (1e-16, 1e-6, 1e-6)])
def test_moment_loss_keeps_its_digits_near_a_perfect_fit(near_fit_problem, ratio, loss_tol,
                                                         grad_tol):
    """L/c down to 1e-16: the factored loss and its gradient against a per-sample
    longdouble reference (the expanded c + tr(ΦᵀMΦ) − 2tr(BᵀΦ) is off by ~ulp(c) ≈ 1e-16 c:
    100 % at L/c = 1e-16)."""
    model, x, noise = near_fit_problem
    clean = jax.vmap(model)(x)
    c = float(jnp.mean(jnp.sum(clean**2, axis=1)))
    y = clean + np.sqrt(ratio * c / float(jnp.mean(jnp.sum(noise**2, axis=1)))) * noise
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, y), model)
    loss, grad = eqx.filter_value_and_grad(objective)(model)
    ref_loss, ref_grad = _longdouble_loss_and_grad(x, y, model.weights[0])
    assert float(loss) > 0.0
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * float(ref_loss)
    error = np.max(np.abs(np.asarray(grad.weights[0]) - ref_grad.astype(np.float64)))
    assert error <= grad_tol * float(np.max(np.abs(ref_grad)))


def test_moment_loss_is_never_negative_at_an_exact_fit(near_fit_problem):
    model, x, _ = near_fit_problem
    y = jax.vmap(model)(x)  # the true loss is the float64 rounding of y: ~1e-32 · c
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, y), model)
    ref_loss, _ = _longdouble_loss_and_grad(x, y, model.weights[0])
    loss = float(objective(model))
    assert 0.0 <= loss <= 1e-28 * float(objective.moments.c)
    assert abs(loss - float(ref_loss)) <= 1e-28 * float(objective.moments.c)


def test_symmetrised_moment_loss_near_a_fit(getkey):
    """Augmentation by a finite group re-factors the stacked per-element factors: still
    accurate near a fit (a C₃-invariant model, targets C₃-invariant up to noise). Exact
    O(3) eigen-factors the moments: never negative, absolute error ~1e-16 · c."""
    x = jax.random.normal(getkey(), (12, 3))
    model = cn.DeepLinear((jnp.array([[0.7, 0.7, 0.7]]),))  # f(gx) = f(x) under C₃
    clean = jax.vmap(model)(x)
    c = float(jnp.mean(clean**2))
    y = clean + 1e-8 * np.sqrt(c) * jax.random.normal(getkey(), clean.shape)
    group = cn.CyclicShift(3)
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, y), model, augment=group)
    expanded = cn.Augmentation(group).apply(cn.Dataset(x, y))
    ref_loss, _ = _longdouble_loss_and_grad(expanded.x, expanded.y, model.weights[0])
    assert abs(float(objective(model)) - float(ref_loss)) <= 1e-6 * float(ref_loss)
    exact = cn.make_objective(cn.MSE(), cn.Dataset(x, y), model,
                              augment=cn.OrthogonalGroup(3))
    # Icosahedral rotations reproduce O(3) on these (≤ 2-axis) moments.
    expanded = cn.Augmentation(cn.Icosahedral()).apply(cn.Dataset(x, y))
    ref_loss, _ = _longdouble_loss_and_grad(expanded.x, expanded.y, model.weights[0])
    value = float(exact(model))
    assert value >= 0.0
    assert abs(value - float(ref_loss)) <= 1e-14 * float(exact.moments.c)


def test_moments_of_an_ensemble_are_its_members_features(getkey):
    """`Moments.from_data` of an ensemble uses its first member (the features Ψ(x) do not
    depend on θ): a one-member ensemble gives the model's own moments, bit for bit, and so
    does a two-member one (against numpy's XᵀX/n: a linear layer's features are its inputs)."""
    model = cn.DeepLinear.random((3, 2), key=getkey())
    xs = jax.random.normal(getkey(), (11, 3))
    data = cn.Dataset(xs, jax.random.normal(getkey(), (11, 2)))
    alone = cn.Moments.from_data(model, data)
    one = cn.Moments.from_data(cn.Ensemble.stack([model]), data)
    two = cn.Moments.from_data(cn.Ensemble.stack([model, jax.tree.map(jnp.negative, model)]),
                               data)
    for m in (one, two):
        for a, b in [(alone.M, m.M), (alone.B, m.B), (alone.c, m.c)]:
            np.testing.assert_array_equal(a, b)
    x = np.asarray(xs)
    assert relative_error(alone.M, x.T @ x / 11) <= 1e-12
