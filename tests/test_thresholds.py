"""Negative controls at the thresholds: near-laws a little above a decision threshold are
rejected, true laws (or laws a little below it) accepted, each with a margin that is known in
closed form — not only candidates whose residual is far above the threshold.

- `find_symmetries` (relative residual ≤ `tol` = 1e-10 at every probed point): a translation
  symmetry and a rescale symmetry each broken by a known term of size c; their residuals are
  c/√(1 + c²) at every point (translation) and within [c/√(1 + c²), c] (rescale).
- `count_laws` (a direction of the row-normalised fields counts when its singular value is
  above `tol`·σ₁): gradient fields whose second singular value is exactly t.
- The ill-conditioning flag (`Result.summary()["ill_conditioned"]`: a law's `condition` below
  `ILL_CONDITIONED` = 1e-6 at some save): members whose condition is set in closed form.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

TOL = 1e-10  # find_symmetries' default threshold (the tests pass no `tol`)
# 0: exact; 1e-11: 0.1× the threshold (accepted); 1e-9, 1e-8: 10× and 100× (rejected).
BREAKS = [(0.0, True), (1e-11, True), (1e-9, False), (1e-8, False)]


class MixedSoftmax(eqx.Module):
    """Logits u = M(Wx + b) with M = [[1, 0], [−c, 1 − c]].

    For c = 0, cross-entropy is invariant under adding a constant to a column of [W b]
    (translation). For c ≠ 0 the gradient of every sample with respect to z = Wx + b is
    Mᵀ∂L/∂u = e·(1 + c, −1 + c) (e = p₀ − y₀, as ∂L/∂u = (e, −e)), so the gradient on a column
    {W[0, j], W[1, j]} is S·(1 + c, −1 + c) and its translation residual
    |Σ_A g| / (|g_A|√|A|) = c/√(1 + c²) at every point, whatever S."""

    weight: jax.Array
    bias: jax.Array
    c: float = eqx.field(static=True)

    def __call__(self, x):
        z = self.weight @ x + self.bias
        return jnp.stack([z[0], -self.c * z[0] + (1.0 - self.c) * z[1]])


class TiltedProduct(eqx.Module):
    """f(x) = b·a·(|a|/|b|)^c·x for 1×1 layers a, b.

    The loss depends on (a, b) through log|ab| + c·log|a/b| only, so its gradient is
    h·((1 + c)/a, (1 − c)/b) and the rescale identity gives ⟨g_a, a⟩ − ⟨g_b, b⟩ = 2c·h: the
    residual is 2c / (√((1 + c)²/a² + (1 − c)²/b²) · √(a² + b²)), at most c (Cauchy–Schwarz)
    and c/√(1 + c²) where |a| = |b| (the model's own point, probed first)."""

    a: jax.Array
    b: jax.Array
    c: float = eqx.field(static=True)

    def __call__(self, x):
        a, b = self.a[0, 0], self.b[0, 0]
        return b * a * (jnp.abs(a) / jnp.abs(b)) ** self.c * x


@pytest.fixture(scope="module")
def classes():
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (32, 3))
    y = jax.nn.one_hot(jax.random.randint(ky, (32,), 0, 2), 2)
    return cn.Dataset(x, y)


@pytest.mark.parametrize("c, accepted", BREAKS)
def test_translation_broken_by_a_known_term_at_the_threshold(classes, c, accepted):
    weight = jax.random.normal(jax.random.PRNGKey(2), (2, 3))
    found = cn.find_symmetries(MixedSoftmax(weight, jnp.array([0.1, -0.2]), c), cn.CrossEntropy(),
                               classes, count=False)
    assert found.tol == TOL
    translation = [cand for cand in found.candidates if cand.family == "translation"]
    assert [cand.unit for cand in translation] == ["0", "1", "2", "bias"]
    for cand in translation:
        assert cand.accepted is accepted, cand
        assert cand.informative >= 2
        if c:
            # The reported residual is the closed form (round-off ~1e-16 relative to |g|).
            np.testing.assert_allclose(cand.residual, c / np.sqrt(1 + c * c), rtol=1e-3)
        else:
            assert cand.residual < 1e-14
    names = [law.name for law in found.laws]
    assert names == (["translation[weight]"] if accepted else [])
    # Nothing else of this model is a symmetry: scale candidates are far off.
    assert all(cand.residual > 1e-3 for cand in found.candidates if cand.family == "scale")


@pytest.mark.parametrize("c, accepted", BREAKS)
def test_rescale_broken_by_a_known_term_at_the_threshold(c, accepted):
    kx, ky = jax.random.split(jax.random.PRNGKey(5))
    data = cn.Dataset(jax.random.normal(kx, (16, 1)), jax.random.normal(ky, (16, 1)))
    model = TiltedProduct(jnp.full((1, 1), 0.8), jnp.full((1, 1), -0.8), c)
    found = cn.find_symmetries(model, cn.MSE(), data, count=False)
    (rescale,) = [cand for cand in found.candidates if cand.family == "rescale"]
    assert rescale.accepted is accepted, rescale
    if c:
        assert c / np.sqrt(1 + c * c) * (1 - 1e-3) <= rescale.residual <= c * (1 + 1e-3)
    else:
        assert rescale.residual < 1e-14
    assert [law.name for law in found.laws] == (["rescale[a]"] if accepted else [])
    others = [cand for cand in found.candidates if cand.family != "rescale"]
    assert others and not any(cand.accepted for cand in others)


def _tilted_inputs(t):
    """A sampler of one-sample data sets with inputs (1, ±t), the signs alternating.

    For f(θ, x) = θ·x and a squared loss, a one-sample set's gradient is a multiple of its
    input, so the row-normalised fields are (1, ±t)/√(1 + t²), half of each sign: their
    singular values are exactly 1/√(1 + t²)·√n·(1, t), i.e. σ₂/σ₁ = t."""
    def sample(key, n):
        del key
        sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
        return cn.Dataset(jnp.asarray(np.stack([np.ones(n), sign * t], axis=1)),
                          jnp.ones((n, 1)))
    return sample


def _dot(params, x):
    return jnp.atleast_1d(params @ x)


@pytest.mark.parametrize("t, laws", [(1e-8, 0), (1e-10, 1)])
def test_count_laws_rank_decision_at_the_threshold(t, laws):
    """`tol` = 1e-9: a direction with singular value 10× above counts as rank, 10× below
    does not (then it is a law); the reported singular values and gap are t and 1/t."""
    model = cn.FunctionModel(_dot, jnp.array([0.3, -0.7]))
    kwargs = dict(data=_tilted_inputs(t), input_shape=(2,), set_size=1, n_sets=4, max_depth=0,
                  max_rounds=1)
    count = cn.count_laws(model, cn.MSE(), **kwargs)
    assert count.laws == laws and count.rank == 2 - laws
    np.testing.assert_allclose(count.singular_values, [1.0, t], rtol=1e-6)
    if laws:
        np.testing.assert_allclose(count.gap, 1 / t, rtol=1e-6)
    # The threshold is `tol`: with tol 100× above the direction, it is a law.
    assert cn.count_laws(model, cn.MSE(), tol=100 * t, **kwargs).laws == 1


def test_ill_conditioning_flag_at_its_threshold():
    """Members whose ratio law I(W) = (W₁ − W₂)/(W₁ + W₂ − 2W₃) has condition
    |W₁ + W₂ − 2W₃|/‖W‖ = 1e-5 and 2e-6 (10× and 2× above ILL_CONDITIONED = 1e-6: not
    flagged), 5e-7, 1e-7 and 5e-8 (flagged): W = (1, −1, 0) + s(1, 1, −2) has condition
    6|s|/√(2 + 6s²). Three of five: a threshold 10× off either way, or the comparison
    reversed, gives another count."""
    targets = np.array([1e-5, 2e-6, 5e-7, 1e-7, 5e-8])
    s = targets * np.sqrt(2.0) / np.sqrt(36.0 - 6.0 * targets**2)  # 6s/√(2 + 6s²) = target
    rows = np.array([1.0, -1.0, 0.0])[None] + s[:, None] * np.array([1.0, 1.0, -2.0])[None]
    ensemble = cn.Ensemble.stack([cn.DeepLinear([jnp.asarray(r[None])]) for r in rows])
    data = cn.Dataset(jnp.eye(3), jnp.array([[0.5], [0.1], [-0.2]]))
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    law = cn.CyclicRatioLaw()
    # A learning rate so small that the conditions stay at their closed form (to ~1e-12).
    result = cn.train(objective, ensemble, cn.optimizer("gd", lr=1e-13), 2, n_save=3,
                      laws=[law], progress=False)
    condition = np.asarray(result.condition[law.name])
    want = np.abs(rows[:, 0] + rows[:, 1] - 2 * rows[:, 2]) / np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(want, targets, rtol=1e-6)  # 1 + s rounds to ~1e-16 absolute
    np.testing.assert_allclose(condition, np.repeat(want[:, None], 3, axis=1), rtol=1e-4)
    assert result.summary()["ill_conditioned"] == {law.name: 3}
