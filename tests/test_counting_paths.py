"""Paths of `count_laws`, `find_polynomial_laws` and `find_symmetries` that no other default
test executes, each checked against an independent reference so that a wrong number fails:

- counts at a point where every gradient field vanishes (rank 0, every coordinate conserved,
  the model's balance laws degenerate there), and a rank that overshoots its target;
- the data-set sampler: cross-entropy targets (softmax / sigmoid, numpy), a user sampler of
  inputs confined to a line (a weight the data never move), the co-activation probe of a ReLU
  net run on a `Dataset` and on a user sampler (dead neurons recomputed in numpy);
- the padded momentum count (phase space (s, θ, v) of a padded `DeepLinear`) against the
  unpadded one, singular value by singular value; the re-dispatch of a count to the CPU;
- `find_polynomial_laws` with one point per batch (the balance law a² − b², by hand);
- `find_symmetries` on a module whose bias is paired by position, on an `Ensemble`, on an
  (x, y) pair, with two flatten layouts that both hold, and its cross-check with `count_laws`;
- the argument errors of these paths (each names its argument).
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._laws import counting
from conservation._laws.counting import LawCount, _Sampler

KEY = jax.random.PRNGKey(0)


class _Affine(eqx.Module):
    """x ↦ K x + o with leaf names that match none of the weight/bias name pairs, so the bias
    can only be paired as "the next leaf of the same parent"."""

    kernel: jax.Array
    offset: jax.Array

    def __call__(self, x):
        return self.kernel @ x + self.offset


class _Twice(eqx.Module):
    """One hidden ReLU unit read twice by the next layer: x ↦ W1 [h, h], h = relu(W0 x + b0).
    With one hidden unit the block (columns 0:2) and the strided (columns 0::1) layouts are
    the same set, so both rescale candidates hold."""

    first: eqx.nn.Linear
    second: eqx.nn.Linear

    def __call__(self, x):
        return self.second(jnp.repeat(jax.nn.relu(self.first(x)), 2))


def _relu_net():
    """A 2-3-1 ReLU net whose hidden neuron 2 (incoming weights (−1, −0.7), bias −0.05) is
    dead on inputs of the positive quadrant but alive on Gaussian inputs."""
    w0 = jnp.array([[0.8, -0.3], [-0.5, 0.9], [-1.0, -0.7]])
    b0 = jnp.array([0.1, 0.2, -0.05])
    w1 = jnp.array([[0.6, -1.1, 0.4]])
    return cn.MLP((w0, w1), (b0, jnp.array([0.3])))


def _dead_numpy(model, x):
    """Hidden neurons with a pre-activation ≤ 0 on every input (numpy, one hidden layer)."""
    z = np.asarray(x) @ np.asarray(model.weights[0]).T + np.asarray(model.biases[0])
    return tuple((0, int(j)) for j in np.flatnonzero(np.all(z <= 0, axis=0)))


# ---------------------------------------------------------------- count_laws: rank decisions


def test_a_point_where_every_field_vanishes_conserves_every_coordinate():
    """DeepLinear 1-1-1-1 at θ = 0: each weight's gradient is a product of the two others,
    so every gradient field, and every bracket, is 0: rank 0, all 3 coordinates conserved,
    all singular values 0 and the gap ∞. The balance laws w_{i+1}² − w_i² have gradient 0
    there, so no known law is independent (known = 0). Control: at a generic point the
    product w3·w2·w1 is the only thing the loss sees, rank 1 and 2 laws, both known."""
    zero = cn.DeepLinear([jnp.zeros((1, 1))] * 3)
    count = cn.count_laws(zero, cn.MSE(), max_depth=1)
    assert (count.rank, count.laws, count.parameters) == (0, 3, 3)
    assert count.known == 0 and count.unexplained == 3
    assert count.gap == float("inf")
    np.testing.assert_array_equal(count.singular_values, np.zeros(3))
    assert count.rank_by_depth == (0, 0)
    generic = cn.count_laws(cn.DeepLinear([jnp.full((1, 1), v) for v in (0.7, -1.2, 0.9)]),
                            cn.MSE(), max_depth=1)
    assert (generic.rank, generic.laws, generic.known) == (1, 2, 2)
    assert generic.verdict == "proved"


def test_a_rank_past_its_target_is_not_converged():
    """f(x) = W x with W 1×2: the gradient fields r·xᵀ of two generic data sets already span
    R² (rank 2, no law). Told the rank is 1 (`target_rank=1`), the count overshoots it: the
    verdict must be "not converged" (a "known" law does not hold), never "proved"."""
    model = cn.DeepLinear.random((2, 1), key=KEY)
    count = cn.count_laws(model, cn.MSE(), target_rank=1)
    assert (count.rank, count.laws) == (2, 0)
    assert count.verdict == "not converged" and not count.proved and not count.converged


def test_describe_says_when_fewer_laws_than_known_were_found():
    """A count short of its known laws (here 1 < 2) names the broken assumption; one that is
    short of nothing says the rank was still rising."""
    fewer = LawCount(laws=1, parameters=4, rank=3, singular_values=np.ones(3), gap=2.0,
                     rank_by_depth=(3,), proved=False, verdict="not converged", known=2)
    text = fewer.describe()
    assert "fewer laws than the known ones" in text and "unexplained: -1" in text
    rising = LawCount(laws=3, parameters=4, rank=1, singular_values=np.ones(1), gap=2.0,
                      rank_by_depth=(1,), proved=False, verdict="not converged", known=2)
    assert "still rising" in rising.describe()
    assert "fewer laws" not in rising.describe()


# ---------------------------------------------------------------- count_laws: the data class


@pytest.mark.parametrize("outputs", [3, 1])
def test_cross_entropy_targets_are_softmax_or_sigmoid_of_gaussians(outputs):
    """Random targets for `CrossEntropy` are class probabilities: the softmax over the last
    axis of standard Gaussians (k > 1 outputs), the logistic sigmoid for one output. The
    reference is the same Gaussian stream (numpy's generator, same seed) pushed through the
    formulas written out here."""
    model = _Affine(jnp.ones((outputs, 2)), jnp.zeros(outputs))
    sampler = _Sampler(model, cn.CrossEntropy(), None, (1.0,), (2,), 5, np.random.default_rng(7))
    y = sampler.targets((4, 5, outputs))
    z = np.random.default_rng(7).standard_normal((4, 5, outputs))
    want = (np.exp(z) / np.exp(z).sum(-1, keepdims=True) if outputs > 1
            else 1.0 / (1.0 + np.exp(-z)))
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=0)
    assert np.all((y > 0) & (y < 1))
    if outputs > 1:
        np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-14)


def test_a_sampler_of_inputs_on_a_line_leaves_the_off_line_weight_conserved(monkeypatch):
    """f(x) = W x (W 1×2, MSE) on inputs t·u, u = (0.6, 0.8): every gradient field is
    r·t·u, so the rank is 1 and the coordinate ⟨W, u⊥⟩ is conserved (1 law). The sampler
    returns plain inputs (n, 2); the count must use exactly them, in order, in sets of
    `set_size` (seen where the data sets become objectives). Control: a Gaussian sampler
    in the plane gives rank 2, no law."""
    calls, built = [], []
    build = counting._build_objectives

    def spy(loss, model, augmentation, x, y):  # the data sets each round's fields use
        built.append((np.asarray(x), np.asarray(y)))
        return build(loss, model, augmentation, x, y)

    monkeypatch.setattr(counting, "_build_objectives", spy)

    def on_line(key, n):
        x = jax.random.normal(key, (n, 1)) * jnp.array([[0.6, 0.8]])
        calls.append(np.asarray(x))
        return x

    def plane(key, n):
        return jax.random.normal(key, (n, 2))

    model = cn.DeepLinear.random((2, 1), key=KEY)
    line = cn.count_laws(model, cn.MSE(), data=on_line, n_sets=3, set_size=4, max_depth=1)
    assert (line.rank, line.laws) == (1, 1)
    # One draw of n_sets · set_size inputs per round; every input on the line.
    assert calls and all(c.shape == (12, 2) for c in calls)
    assert all(np.allclose(c[:, 0] * 0.8, c[:, 1] * 0.6, rtol=0, atol=1e-15) for c in calls)
    assert len(built) == len(calls) == len(line.rank_by_round)
    for c, (x, y) in zip(calls, built):
        np.testing.assert_array_equal(x[:3], c.reshape(3, 4, 2))  # 3 sets of 4 inputs
        assert y.shape[1:] == (4, 1) and np.all(np.isfinite(y))
    full = cn.count_laws(model, cn.MSE(), data=plane, n_sets=3, set_size=4, max_depth=1)
    assert (full.rank, full.laws) == (2, 0)


@pytest.fixture(scope="module")
def quadrant():
    """Inputs in the positive quadrant, where `_relu_net`'s neuron 2 is dead: first (0.1, 2),
    where neuron 0 is inactive (0.08 − 0.6 + 0.1 < 0), then 39 |Gaussian| ones (so a probe
    of fewer than all inputs would find neuron 0 dead too)."""
    rest = np.abs(np.random.default_rng(3).standard_normal((39, 2)))
    return np.concatenate([[[0.1, 2.0]], rest])


def test_the_probe_of_a_dataset_class_is_the_dataset(quadrant):
    """With `data=` a `Dataset`, the co-activation probe runs on its inputs: neuron 2 is dead
    there (numpy), so its 2 incoming weights, bias and outgoing weight are conserved besides
    the 2 live neurons' rescale laws: 4 + 2 = 6 laws of 13, all known (proved). Control:
    the same neuron is alive on Gaussian inputs, so a probe on the default class would not
    name it."""
    model = _relu_net()
    y = np.random.default_rng(4).standard_normal((40, 1))
    assert _dead_numpy(model, quadrant) == ((0, 2),)
    assert _dead_numpy(model, quadrant[:1]) == ((0, 0), (0, 2))
    assert _dead_numpy(model, np.random.default_rng(5).standard_normal((4000, 2))) == ()
    count = cn.count_laws(model, cn.MSE(), data=cn.Dataset(quadrant, y), set_size=8)
    assert count.dead == ((0, 2),) and count.never_coactive == ()
    assert (count.laws, count.known, count.verdict) == (6, 6, "proved")
    assert count.probe.startswith("all 40 inputs of the data set")


def test_the_probe_of_a_sampler_class_uses_the_sampler():
    """With `data=` a sampler of inputs, the probe is `probe_size` inputs of the sampler (the
    first call), and the dead neurons are those dead on them (numpy on the recorded inputs):
    the same 6 laws as on the data set."""
    calls = []

    def positive(key, n):
        x = jnp.abs(jax.random.normal(key, (n, 2)))
        calls.append(np.asarray(x))
        return x

    model = _relu_net()
    count = cn.count_laws(model, cn.MSE(), data=positive, set_size=8, probe_size=200)
    assert calls[0].shape == (200, 2)
    assert count.dead == _dead_numpy(model, calls[0]) == ((0, 2),)
    assert (count.laws, count.known, count.verdict) == (6, 6, "proved")
    assert count.probe.startswith("200 inputs from the sampler")


# ---------------------------------------------------------------- count_laws: padding, device


def test_a_padded_momentum_count_is_the_unpadded_one():
    """Heavy-ball momentum with friction τ = 0.5 (so the field's time component τs depends on
    the point's s) on DeepLinear 1-2-1, counted in phase space (s, θ, v) (9 coordinates) and
    again embedded in a zero-padded (2, 2) frame (padded velocities 0):
    the padding is an invariant submanifold, so the rows restricted to the real coordinates
    are the real net's. Same data, same phase point: the same ranks at every depth and the
    same singular values (to round-off) down to the rank."""
    model = cn.DeepLinear.random((1, 2, 1), key=KEY)
    flow = cn.MomentumFlow(friction=0.5)
    plain = cn.count_laws(model, cn.MSE(), flow=flow, max_depth=2)
    padded = cn.count_laws(model, cn.MSE(), flow=flow, max_depth=2, pad_to=(2, 2))
    assert plain.dimension == padded.dimension == 2 * 4 + 1
    assert plain.rank_by_depth == padded.rank_by_depth
    assert plain.rank_by_round == padded.rank_by_round
    assert (plain.rank, plain.laws) == (padded.rank, padded.laws)
    assert plain.cancelled == padded.cancelled
    r = plain.rank
    assert r >= 3  # a real comparison: several directions, not a trivial rank
    np.testing.assert_allclose(padded.singular_values[:r], plain.singular_values[:r],
                               rtol=1e-9, atol=0)
    assert np.all(padded.singular_values[r:] < 1e-12)


@pytest.mark.parametrize("kind", ["deep_linear", "equinox_relu_mlp"])
def test_a_count_away_from_the_cpu_is_redone_on_the_cpu(monkeypatch, kind):
    """When the default device is not the CPU, `count_laws` calls itself again under the CPU
    device with every argument (the arrays of the model and the `Dataset` moved there).
    Simulated by reporting "not on the CPU" once: the result must equal a direct count's,
    number for number. An `eqx.nn.MLP` holds `jax.nn.relu` (a custom_jvp, not an array) as a
    leaf: moving the whole model with `device_put` failed on a GPU (found on an H200)."""
    rng = np.random.default_rng(2)
    data = cn.Dataset(rng.standard_normal((16, 2)), rng.standard_normal((16, 1)))
    if kind == "equinox_relu_mlp":
        model = eqx.nn.MLP(2, 1, 3, 1, activation=jax.nn.relu, key=KEY)
        model = eqx.tree_at(lambda m: m.layers[0].bias, model, jnp.array([0.3, -0.2, 0.1]))
        extra = dict(input_shape=(2,))
    else:
        model, extra = cn.DeepLinear.random((2, 2, 1), key=KEY), {}
    count = ft.partial(cn.count_laws, model, cn.MSE(), data=data, max_depth=2, set_size=5,
                       **extra)
    direct = count()
    answers = iter([False])
    calls = []

    def on_cpu():
        calls.append(1)
        return next(answers, True)

    monkeypatch.setattr(counting, "_on_cpu", on_cpu)
    moved = count()
    assert len(calls) == 2  # the outer call, then the re-dispatched one
    assert (moved.laws, moved.rank, moved.verdict, moved.known) == (
        direct.laws, direct.rank, direct.verdict, direct.known)
    np.testing.assert_array_equal(moved.singular_values, direct.singular_values)
    if kind == "deep_linear":
        assert (direct.laws, direct.rank, direct.verdict, direct.known) == (3, 3, "proved", 3)
    else:
        assert direct.laws >= 3  # at least the three neurons' rescale laws


# ---------------------------------------------------------------- count_laws: argument errors


@pytest.mark.parametrize("call, name, words", [
    (lambda: cn.count_laws("not a model", cn.MSE()), "model", "equinox.Module"),
    (lambda: cn.count_laws(eqx.nn.Lambda(jnp.tanh), cn.MSE(), input_shape=(2,)), "model",
     "no floating-point"),
    (lambda: cn.count_laws(cn.MLP.random((2, 2, 1), key=KEY), cn.MSE(), pad_to=(2, 3)),
     "pad_to", "DeepLinear"),
    (lambda: cn.count_laws(cn.DeepLinear.random((2, 3, 2), key=KEY), cn.MSE(), pad_to=(1, 3)),
     "pad_to", "smaller than the model"),
    (lambda: cn.count_laws(cn.DeepLinear.random((2, 1), key=KEY), cn.MSE(), data=3), "data",
     "sampler"),
    (lambda: cn.count_laws(cn.DeepLinear.random((3, 1), key=KEY), cn.MSE(),
                           augment=cn.CyclicShift(3), pad_to=(2, 3)), "pad_to", "augment=None"),
    (lambda: cn.find_polynomial_laws(cn.DeepLinear.random((1, 1, 1), key=KEY), cn.MSE(),
                                     n_points=0), "n_points", "int"),
    (lambda: cn.find_polynomial_laws(cn.DeepLinear.random((1, 1, 1), key=KEY), cn.MSE(),
                                     augment="shift"), "augment", "group"),
], ids=["model-type", "model-no-floats", "pad-not-linear", "pad-too-small", "data-type",
        "pad-with-augment", "n-points-zero", "augment-type"])
def test_counting_argument_errors_name_the_argument(call, name, words):
    """Each bad argument raises `ArgumentError` naming it, with what was wrong."""
    with pytest.raises(cn.ArgumentError, match=f"`{name}`") as info:
        call()
    assert words in str(info.value)


def test_polynomial_laws_with_one_point_per_batch():
    """DeepLinear 1-1-1 (f = b·a·x): the loss sees only ab, so ∇L ∥ (b, a) and the conserved
    polynomials of degree ≤ 2 are those of a² − b² alone (b ∂_a Q + a ∂_b Q = 0). One point per
    batch (`n_points=1`, the smallest allowed) still finds exactly it: over the monomials
    (a, b, a², ab, b²), the row (0, 0, 1, 0, −1)."""
    found = cn.find_polynomial_laws(cn.DeepLinear.random((1, 1, 1), key=KEY), cn.MSE(),
                                    n_points=1)
    assert found.monomials == ((1, 0), (0, 1), (2, 0), (1, 1), (0, 2))
    assert len(found) == 1
    np.testing.assert_allclose(found.coefficients, [[0.0, 0.0, 1.0, 0.0, -1.0]], atol=1e-9)


# ---------------------------------------------------------------- find_symmetries


def test_find_symmetries_stops_probing_once_every_candidate_is_tested_twice():
    """A linear-activation MLP's gradients vanish on no parameter set, so one round of
    `points` = 2 points tests each candidate at both: its three neurons' rescale laws are
    accepted on 2 informative points each, and no second round is drawn (2 points probed,
    not 4)."""
    model = eqx.nn.MLP(2, 1, 3, 1, activation=lambda x: x, key=jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    data = cn.Dataset(rng.standard_normal((32, 2)), rng.standard_normal((32, 1)))
    found = cn.find_symmetries(model, cn.MSE(), data, points=2, count=False)
    assert found.points == 2
    assert [(c.family, c.informative) for c in found.accepted] == [("rescale", 2)] * 3


@pytest.fixture(scope="module")
def softmax_head():
    """`_Affine` (2 inputs → 2 logits) under cross-entropy, searched with the count."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    model = _Affine(jax.random.normal(k1, (2, 2)), jax.random.normal(k2, (2,)))
    kx, ky = jax.random.split(k3)
    y = jax.nn.softmax(jax.random.normal(ky, (24, 2)))
    data = cn.Dataset(jax.random.normal(kx, (24, 2)), y)
    return model, data, cn.find_symmetries(model, cn.CrossEntropy(), data, count=True)


def test_a_bias_paired_by_position_gives_the_softmax_translation_laws(softmax_head):
    """Softmax is invariant under adding one number to every logit, so each column of
    [K o] (2 kernel columns and the bias `offset`, paired as the next leaf of `kernel`'s
    parent) is a translation symmetry: 3 laws Q = column sums, numpy. Nothing else: no scale
    or rescale law of a single affine layer. Each per-unit scale set is a row of K plus its
    bias entry (|A| = 3)."""
    model, _, found = softmax_head
    by_set = {(c.family, c.layer, c.unit): c for c in found.candidates}
    assert {key for key, c in by_set.items() if c.accepted} == {
        ("translation", "kernel", "0"), ("translation", "kernel", "1"),
        ("translation", "kernel", "bias")}
    assert [c.unit for c in found.accepted] == ["0", "1", "bias"]
    assert by_set["translation", "kernel", "bias"].size == 2
    assert [by_set["scale", "kernel", u].size for u in ("0", "1", "all")] == [3, 3, 6]
    assert [law.name for law in found.laws] == ["translation[kernel]"]
    kernel, offset = np.asarray(model.kernel), np.asarray(model.offset)
    np.testing.assert_allclose(found.laws[0](model), [*kernel.sum(0), offset.sum()],
                               rtol=1e-14)
    assert found.independent == found.n_laws == 3


class _Wrapped(eqx.Module):
    """`_Affine` one level down (leaves `head.kernel`, `head.offset`)."""

    head: _Affine

    def __call__(self, x):
        return self.head(x)


def test_a_bias_is_paired_by_position_inside_a_submodule(softmax_head):
    """The same affine head as a submodule: its bias is still the next leaf of the same
    parent (`head`), so the same three translation laws are found, with the same values."""
    model, data, _ = softmax_head
    found = cn.find_symmetries(_Wrapped(model), cn.CrossEntropy(), data)
    assert [law.name for law in found.laws] == ["translation[head.kernel]"]
    assert [c.unit for c in found.accepted] == ["0", "1", "bias"]
    kernel, offset = np.asarray(model.kernel), np.asarray(model.offset)
    np.testing.assert_allclose(found.laws[0](_Wrapped(model)), [*kernel.sum(0), offset.sum()],
                               rtol=1e-14)


def test_the_softmax_head_count_confirms_the_three_laws(softmax_head):
    """`count_laws` (on its own random cross-entropy targets) agrees: the gradient of
    −Σ_k y_k log softmax(f)_k in the logits, (Σ_k y_k) p − y, sums to zero over the classes,
    so the fields' two class rows are opposite: rank 6 − 3 = 3, 3 laws, and `describe`
    reports the search complete. The full table lists every candidate with its verdict."""
    _, _, found = softmax_head
    assert (found.count.laws, found.count.rank, found.count.verdict) == (3, 3, "proved")
    assert found.complete is True
    text = found.describe()
    assert "count_laws: 3 independent laws" in text and "-> complete." in text
    table = found.describe(full=True).splitlines()
    assert table[0].split() == ["family", "layer", "unit", "|A|", "residual", "points",
                                "verdict"]
    rows = [line.split() for line in table[1:len(found.candidates) + 1]]
    assert len(rows) == len(found.candidates) == 6  # 3 translation + 3 scale sets
    for r, c in zip(rows, found.candidates):
        assert (r[0], r[2], r[3]) == (c.family, c.unit, str(c.size))
        assert (r[-1] == "accepted") == c.accepted, (r, c)


def test_an_ensemble_is_searched_at_its_first_member(softmax_head):
    """An `Ensemble` is probed at member 0: the same candidates and residuals as a search of
    `ensemble[0]` alone, and not those of member 1 (a different point: different
    residuals), so the comparison can tell the members apart."""
    _, data, _ = softmax_head

    def factory(k):
        k1, k2 = jax.random.split(k)
        return _Affine(jax.random.normal(k1, (2, 2)), jax.random.normal(k2, (2,)))

    ensemble = cn.Ensemble.init(factory, jax.random.PRNGKey(8), 2)
    residuals = [[c.residual for c in cn.find_symmetries(m, cn.CrossEntropy(), data,
                                                          count=False).candidates]
                 for m in (ensemble, ensemble[0], ensemble[1])]
    np.testing.assert_array_equal(residuals[0], residuals[1])
    rejected = np.array(residuals[0]) > 1e-3
    assert rejected.any()
    assert not np.allclose(np.array(residuals[0])[rejected], np.array(residuals[2])[rejected],
                           rtol=1e-3)


def test_an_x_y_pair_is_the_dataset_and_other_data_are_refused(softmax_head):
    """`data=(x, y)` is `Dataset(x, y)`: the same residuals; a triple, a list and a non-module
    model raise `ArgumentError` naming the argument."""
    model, data, found = softmax_head
    pair = cn.find_symmetries(model, cn.CrossEntropy(), (data.x, data.y), count=False)
    np.testing.assert_array_equal([c.residual for c in pair.candidates],
                                  [c.residual for c in found.candidates])
    with pytest.raises(cn.ArgumentError, match="`data`.*pair"):
        cn.find_symmetries(model, cn.CrossEntropy(), (data.x, data.y, data.y))
    with pytest.raises(cn.ArgumentError, match="`data`.*list"):
        cn.find_symmetries(model, cn.CrossEntropy(), [data.x, data.y])
    with pytest.raises(cn.ArgumentError, match="`model`.*equinox.Module"):
        cn.find_symmetries("not a model", cn.CrossEntropy(), data)


def test_two_flatten_layouts_that_both_hold_are_kept_apart():
    """`_Twice`: one hidden unit read by both columns of W1; its block and strided sets are
    the same, both rescale laws |W0|² + b0² − |W1|² (numpy) hold, and they are labelled by
    layout; being the same law, they count once in `independent`."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
    model = _Twice(eqx.nn.Linear(2, 1, key=k1), eqx.nn.Linear(2, 1, key=k2))
    kx, ky = jax.random.split(k3)
    data = cn.Dataset(jax.random.normal(kx, (32, 2)), jax.random.normal(ky, (32, 1)))
    found = cn.find_symmetries(model, cn.MSE(), data, count=False)
    assert [law.name for law in found.laws] == ["rescale[first](block)",
                                                "rescale[first](strided)"]
    w0, b0 = np.asarray(model.first.weight), np.asarray(model.first.bias)
    w1 = np.asarray(model.second.weight)
    want = np.sum(w0**2) + np.sum(b0**2) - np.sum(w1**2)
    for law in found.laws:
        np.testing.assert_allclose(law(model), [want], rtol=1e-13)
    assert (found.n_laws, found.independent) == (2, 1)


def test_describe_of_an_unconverged_count_names_why_by_its_known_laws():
    """An unconverged count with as many laws as the known ones is an upper bound whose rank
    was still rising (not "fewer laws than the known ones": that wording is for a count
    below them, where an assumed law does not hold)."""
    def text(laws, known):
        return cn.LawCount(laws=laws, parameters=10, rank=10 - laws, singular_values=np.ones(1),
                           gap=1.0, rank_by_depth=(10 - laws,), proved=False,
                           verdict="not converged", known=known).describe()

    assert "still rising" in text(3, 3) and "fewer laws" not in text(3, 3)
    assert "still rising" in text(4, 3) and "fewer laws" not in text(4, 3)
    assert "fewer laws than the known ones" in text(2, 3) and "still rising" not in text(2, 3)
