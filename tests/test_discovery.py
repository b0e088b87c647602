"""find_symmetries: translation / scale / rescale laws found numerically for foreign modules,
checked against the symmetries' definitions (loss invariance) and numpy-built masks."""

import importlib
import pathlib
import tomllib

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import conservation as cn
from conservation.examples import digits


def _data(key, n, in_shape, out, softmax=False):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, *in_shape))
    y = jax.random.normal(ky, (n, out))
    return cn.Dataset(x, jax.nn.softmax(y) if softmax else y)


@pytest.fixture(scope="module")
def relu_mlp():
    key = jax.random.PRNGKey(3)
    model = eqx.nn.MLP(2, 1, 3, 1, activation=jax.nn.relu, key=key)
    # A generic point: with equinox's init at this key two neurons are dead on most Gaussian
    # inputs, which makes the net locally degenerate for count_laws (more local laws).
    model = eqx.tree_at(lambda m: m.layers[0].bias, model, jnp.array([0.3, -0.2, 0.1]))
    data = _data(jax.random.PRNGKey(4), 32, (2,), 1)
    return model, data, cn.find_symmetries(model, cn.MSE(), data, count=True)


def test_relu_mlp_gives_exactly_the_per_neuron_rescale_laws(relu_mlp):
    model, data, found = relu_mlp
    assert [law.name for law in found.laws] == ["rescale[layers[0]]"]
    assert found.n_laws == found.independent == 3  # one per hidden neuron
    # Independent reference: Q_j = |W0[j]|² + b0[j]² − W1[:, j]² computed in numpy.
    w0, b0 = np.asarray(model.layers[0].weight), np.asarray(model.layers[0].bias)
    w1 = np.asarray(model.layers[1].weight)
    expected = np.sum(w0**2, axis=1) + b0**2 - np.sum(w1**2, axis=0)
    np.testing.assert_allclose(found.laws[0](model), expected, rtol=1e-14)
    assert found.count.laws == 3 and found.complete and found.count.proved  # Lie algebra agrees
    rejected = {(c.family, c.unit) for c in found.rejected}
    assert ("scale", "all") in rejected and ("translation", "bias") in rejected
    assert all(c.residual > 1e-3 for c in found.rejected if np.isfinite(c.residual))


def test_found_laws_stay_conserved_along_a_flow(relu_mlp):
    model, data, found = relu_mlp
    objective = cn.make_objective(cn.MSE(), data, model)
    rtol = 1e-8
    result = cn.gradient_flow(objective, model, 2.0, solver="tsit5", rtol=rtol, laws=found.laws,
                              n_save=5)
    assert result.status_names() == ["success"]
    assert float(result.max_drift["rescale[layers[0]]"][0]) <= 10 * rtol
    assert float(result.loss[0, -1]) < 0.9 * float(result.loss[0, 0])
    # eqx.nn.MLP stores its activation function as a field: track_mechanics must vmap it.
    mech = cn.track_mechanics(objective, model, found.laws, lr=0.1, steps=10, weight_decay=0.1)
    assert max(mech.discrete_error().values()) <= 1e-12


def test_tanh_mlp_has_no_rescale_law():
    model = eqx.nn.MLP(2, 1, 3, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))
    found = cn.find_symmetries(model, cn.MSE(), _data(jax.random.PRNGKey(4), 32, (2,), 1),
                               count=False)
    assert found.laws == ()
    assert found.n_laws == found.independent == 0  # no law: no gradient, rank 0
    rescale = [c for c in found.candidates if c.family == "rescale"]
    assert len(rescale) == 3 and all(c.residual > 1e-3 for c in rescale)


class _NormConv(eqx.Module):
    conv: eqx.nn.Conv2d
    norm: digits.ChannelNorm
    head: eqx.nn.Linear

    def __call__(self, x):
        return self.head(jnp.tanh(self.norm(self.conv(x))).reshape(-1))


def test_normalised_conv_channels_and_softmax_head():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    model = _NormConv(eqx.nn.Conv2d(1, 3, 3, key=k1), digits.ChannelNorm(),
                      eqx.nn.Linear(3 * 2 * 2, 4, key=k2))
    data = _data(k3, 16, (1, 4, 4), 4, softmax=True)
    loss = cn.CrossEntropy()
    found = cn.find_symmetries(model, loss, data, count=False)
    assert [(law.name, law.components) for law in found.laws] == [
        ("scale[conv]", 3), ("translation[head]", 13)]
    objective = eqx.filter_jit(cn.make_objective(loss, data, model))  # one compile, 4 calls
    base = float(objective(model))
    # The definitions, independently: scaling channel 1's weights + bias, or adding a constant
    # to column 5 of the head's weights, leaves the loss unchanged; a non-symmetry does not.
    scaled = eqx.tree_at(lambda m: (m.conv.weight, m.conv.bias), model,
                         (model.conv.weight.at[1].multiply(3.7),
                          model.conv.bias.at[1].multiply(3.7)))
    shifted = eqx.tree_at(lambda m: m.head.weight, model, model.head.weight.at[:, 5].add(0.9))
    broken = eqx.tree_at(lambda m: m.head.weight, model, model.head.weight.at[0].multiply(2.0))
    assert abs(float(objective(scaled)) - base) <= 1e-14 * abs(base)
    assert abs(float(objective(shifted)) - base) <= 1e-14 * abs(base)
    assert abs(float(objective(broken)) - base) > 1e-4
    # The masks are the sets: channel c = conv.weight[c] and conv.bias[c] (first 27 + 3
    # parameters in pytree order), column j of the head = head.weight[:, j].
    scale, translation = found.laws
    mask = np.asarray(scale.mask(model))
    expected = np.zeros_like(mask)
    for c in range(3):
        expected[c, 9 * c:9 * (c + 1)] = 1.0
        expected[c, 27 + c] = 1.0
    np.testing.assert_array_equal(mask, expected)
    assert "implied" in {c.reason.split(":")[0] for c in found.rejected}


@pytest.fixture(scope="module")
def tiny_digits():
    x, y = digits.digits_data()
    data = cn.Dataset(jnp.asarray(x[:128]), jnp.asarray(y[:128]))
    model = digits.convnet(jax.random.PRNGKey(0), channels=(2, 2), hidden=4)
    return model, data, cn.find_symmetries(model, cn.CrossEntropy(), data)


def test_digits_data_and_found_symmetries(tiny_digits):
    from sklearn.datasets import load_digits

    x, y = digits.digits_data()
    reference = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797, 10) and x.dtype == np.float64
    np.testing.assert_array_equal(x[:, 0] * 16, reference.images)
    np.testing.assert_array_equal(np.argmax(y, axis=1), reference.target)
    model, data, found = tiny_digits
    # conv1 channels: scale; conv2 channels feed contiguous blocks of the flattened hidden
    # layer (found by probing, the strided layout rejected); hidden neurons: rescale; head.
    assert {law.name: law.components for law in found.laws} == {
        "scale[conv1]": 2, "rescale[conv2]": 2, "rescale[hidden]": 4, "translation[head]": 5}
    strided = [c for c in found.candidates if c.unit.endswith("(strided)")]
    assert strided and not any(c.accepted for c in strided)


def test_digits_discrete_identities_hold_to_round_off(tiny_digits):
    model, data, found = tiny_digits
    objective = cn.make_objective(cn.CrossEntropy(), data, model)
    result = cn.track_mechanics(objective, model, found.laws, lr=0.05, steps=20,
                                weight_decay=0.01, momentum=0.9, batch_size=32,
                                key=jax.random.PRNGKey(1))
    errors = result.discrete_error()
    assert max(errors.values()) <= 1e-12, errors
    moved = {n: float(jnp.max(jnp.abs(v - v[:, :1]) / result.scale[n][:, None]))
             for n, v in result.simulated.items()}
    assert min(moved.values()) > 1e-4, moved  # the laws are broken: the identity is not void


def test_kunin_digits_config_names_importable_factories():
    config = tomllib.loads((pathlib.Path(__file__).parents[1] / "configs" /
                            "kunin_digits.toml").read_text())
    assert config["laws"]["discover"] is True and config["loss"]["kind"] == "cross_entropy"
    for section in ("model", "data"):
        module, name = config[section]["factory"].split(":")
        assert callable(getattr(importlib.import_module(module), name))
    kwargs = config["model"].get("kwargs", {})
    logits = jax.eval_shape(lambda k: digits.convnet(k, **kwargs)(jnp.zeros((1, 8, 8))),
                            jax.random.PRNGKey(0))
    assert logits.shape == (10,)


@pytest.mark.slow
def test_digits_experiment_end_to_end(tmp_path):
    summary = digits.run(tmp_path, steps=100)
    # A panel per run (rows, ≥ 2.7 inches each) and found law (4.4-inch columns) at 100 dpi,
    # drawn on.
    image = matplotlib.image.imread(tmp_path / "mechanics.png")
    assert image.shape[1] == 440 * len(summary["laws"])
    assert image.shape[0] >= 270 * len(summary["runs"])
    assert np.mean(np.any(image[..., :3] < 0.5, axis=-1)) > 0.01  # dark pixels: curves, text
    for run in summary["runs"].values():
        assert max(run["discrete_identity_error"].values()) <= 1e-12
        assert max(run["continuous_theory_error"].values()) <= 5e-2


class _FaintTwin(eqx.Module):
    """x ↦ main(x) + ε·faint(x) with two equal-shape linear layers: the gradient of `faint`'s
    parameters is exactly ε times `main`'s, so its scale candidate (row and bias: all of
    `faint`) has ‖g_A‖ / ‖g‖ = ε / √(1 + ε²) at every point and on every batch."""

    main: eqx.nn.Linear
    faint: eqx.nn.Linear
    eps: float = eqx.field(static=True)

    def __call__(self, x):
        return self.main(x) + self.eps * self.faint(x)


@pytest.mark.parametrize("eps", [0.5e-9, 1.5e-9], ids=["vanished", "kept"])
def test_a_set_with_a_vanishing_gradient_is_not_informative(eps):
    """A point where a set's gradient is below 1e-9 of the whole gradient's norm says nothing
    about its identity (its relative residual is round-off over round-off): it is left out
    and not counted in `informative`; just above, every point counts. The gradient here is
    large (targets ~100: ‖g‖ ≫ 1), so a threshold not scaled by ‖g‖ would misjudge both."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    model = _FaintTwin(eqx.nn.Linear(2, 1, key=k1), eqx.nn.Linear(2, 1, key=k2), eps)
    kx, ky = jax.random.split(k3)
    data = cn.Dataset(jax.random.normal(kx, (32, 2)), 100.0 + jax.random.normal(ky, (32, 1)))
    found = cn.find_symmetries(model, cn.MSE(), data, count=False)
    by_set = {(c.family, c.layer, c.unit): c for c in found.candidates}
    faint = [by_set["scale", "faint", "0"], by_set["scale", "faint", "all"]]
    if eps < 1e-9:
        # Never informative: rounds of fresh points until `max_points` (16), then degenerate.
        assert found.points == 16
        for c in faint:
            assert c.informative == 0 and np.isnan(c.residual) and not c.accepted, c
            assert c.reason.startswith("degenerate"), c
    else:
        # Informative at every probed point, and rejected on its residual: scaling `faint`
        # changes the loss (a scale symmetry it is not).
        for c in faint:
            assert c.informative == found.points and not c.accepted, c
            assert c.residual > 1e-3 and c.reason.startswith("residual"), c
    # The control: `main`'s sets (a normal gradient) are informative at every point.
    for unit in ("0", "all"):
        assert by_set["scale", "main", unit].informative == found.points
    assert found.laws == ()


class _Repeated(eqx.Module):
    """Hidden ReLU units each read twice by the next layer, in blocks [h0, h0, h1, h1]: the
    per-neuron rescaling acts on a block of the next weight's columns, not on one column."""

    first: eqx.nn.Linear
    second: eqx.nn.Linear

    def __call__(self, x):
        return self.second(jnp.repeat(jax.nn.relu(self.first(x)), 2))


def test_bias_free_layers_and_block_layouts_are_searched_and_tabulated():
    """Two layer kinds the other tests never meet. (1) Bias-free layers: the rescale law of a
    bias-free ReLU net is |W0[j]|² − |W1[:, j]|² (numpy), and the whole-layer scale set holds
    every weight of the layer (|A| = its size) and is rejected. (2) A hidden unit read by a
    block of the next layer's columns: the block layout's rescale laws are found, the strided
    layout's rejected, and `describe` tabulates the two layouts as separate rows."""
    key = jax.random.PRNGKey(3)
    mlp = eqx.nn.MLP(2, 1, 3, 1, activation=jax.nn.relu, use_bias=False,
                     use_final_bias=False, key=key)
    data = _data(jax.random.PRNGKey(4), 32, (2,), 1)
    found = cn.find_symmetries(mlp, cn.MSE(), data, count=False)
    assert [law.name for law in found.laws] == ["rescale[layers[0]]"]
    w0, w1 = np.asarray(mlp.layers[0].weight), np.asarray(mlp.layers[1].weight)
    np.testing.assert_allclose(found.laws[0](mlp), np.sum(w0**2, 1) - np.sum(w1**2, 0),
                               rtol=1e-14)
    by_set = {(c.family, c.layer, c.unit): c for c in found.candidates}
    assert by_set["scale", "layers[0]", "all"].size == w0.size == 6
    assert by_set["scale", "layers[1]", "all"].size == w1.size == 3
    assert not by_set["scale", "layers[0]", "all"].accepted
    # A rescale set holds both sides: the unit's row of W0 (2) and its column of W1 (1).
    assert [by_set["rescale", "layers[0]", str(j)].size for j in range(3)] == [3, 3, 3]

    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    model = _Repeated(eqx.nn.Linear(2, 2, key=k1), eqx.nn.Linear(4, 1, key=k2))
    found = cn.find_symmetries(model, cn.MSE(), data, count=False)
    units = {c.unit: c for c in found.candidates if c.family == "rescale"}
    assert {u for u, c in units.items() if c.accepted} == {"0 (block)", "1 (block)"}
    assert {u for u, c in units.items() if not c.accepted} == {"0 (strided)", "1 (strided)"}
    # |A|: the unit's row of W0 and bias (2 + 1) and its block of W1's columns (2).
    assert {c.size for c in units.values()} == {5}
    # The block law: |W0[j]|² + b0[j]² − |W1[:, 2j:2j+2]|², in numpy.
    w0, b0 = np.asarray(model.first.weight), np.asarray(model.first.bias)
    w1 = np.asarray(model.second.weight)
    want = np.sum(w0**2, 1) + b0**2 - np.sum(w1.reshape(1, 2, 2) ** 2, axis=(0, 2))
    np.testing.assert_allclose(found.laws[0](model), want, rtol=1e-13)
    rows = [line.split() for line in found.describe().splitlines()]
    block = [r for r in rows if r[:3] == ["rescale", "first", "(block)"]]
    strided = [r for r in rows if r[:3] == ["rescale", "first", "(strided)"]]
    assert len(block) == 1 and block[0][3:5] == ["2", "2"], rows  # tested, accepted
    assert len(strided) == 1 and strided[0][3:5] == ["2", "0"], rows
