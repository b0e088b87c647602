"""Forward passes, the tensorization f = ψ(x)Φ(θ), and Lightning Attention's three forms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

import conservation as cn


def test_float64_is_default():
    assert jnp.zeros(1).dtype == jnp.float64
    assert cn.DeepLinear.random((2, 2), key=jax.random.PRNGKey(0)).weights[0].dtype == jnp.float64


@pytest.mark.parametrize("name", [
    "deep_linear", "quadratic", "cubic", "sextic_neuron", "deep_quadratic", "deep_inhomogeneous",
    "attention_bare", "attention_decay", "attention_heads_out", "attention_heads_concat"])
def test_tensorization_matches_forward(zoo, name):
    model, xs = zoo[name]
    both = eqx.filter_jit(lambda m, x: (jax.vmap(m)(x), jax.vmap(m.tensorized_call)(x)))
    direct, tensorized = both(model, xs)
    assert tensorized.shape == direct.shape
    assert relative_error(tensorized, direct) <= 1e-12


def test_features_are_parameter_free(zoo, getkey):
    model, xs = zoo["attention_heads_out"]
    other = cn.LightningAttention.random(4, key=getkey(), heads=2, key_dim=2, value_dim=3,
                                         out_dim=2, decay=0.9, block_size=4)
    np.testing.assert_array_equal(model.features(xs[0]), other.features(xs[0]))


def test_deep_linear_end_to_end(zoo):
    model, xs = zoo["deep_linear"]
    w1, w2, w3 = model.weights
    np.testing.assert_allclose(model.end_to_end(), w3 @ w2 @ w1, rtol=1e-14)
    assert model.widths == (3, 5, 4, 2)


def test_polynomial_activation_and_degrees(getkey):
    net = cn.PolynomialNet.random((2, 3, 1), key=getkey(), activation="sextic")
    z = jnp.linspace(-2, 2, 9)
    np.testing.assert_allclose(net.activation(z), 0.012 * z**6 - 0.22 * z**4 + z**2, rtol=1e-13)
    assert net.degrees == (2, 4, 6)
    deep = cn.PolynomialNet.random((2, 3, 3, 1), key=getkey(), activation=(0.0, 1.0, 1.0))
    assert deep.degrees == (1, 2, 3, 4)  # (z + z²)∘(z + z²) has degrees 1..4
    assert cn.PolynomialNet.random((2, 3, 3, 1), key=getkey()).degrees == (4,)


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.9, block_size=4),                       # n = 9 is not a multiple of 4
    dict(decay=1.0, causal=False, block_size=3),         # the seed's bare form
    dict(decay=0.5, heads=3, key_dim=2, value_dim=3, out_dim=2, block_size=2),
    dict(decay=1.0, heads=2, key_dim=2, value_dim=2, block_size=16),  # one partial block
])
def test_attention_forms_agree(getkey, kwargs):
    model = cn.LightningAttention.random(4, key=getkey(), **kwargs)
    x = jax.random.normal(getkey(), (9, 4))
    parallel, tiled, recurrent = eqx.filter_jit(
        lambda m, x: (m.parallel(x), m.tiled(x), m.recurrent(x)))(model, x)
    assert relative_error(tiled, parallel) <= 1e-12
    assert relative_error(recurrent, parallel) <= 1e-12


def test_attention_bare_form_is_xqktxtxv(getkey):
    model = cn.LightningAttention.random(5, key=getkey(), causal=False)
    x = jax.random.normal(getkey(), (6, 5))
    q, k, v = model.query[0], model.key[0], model.value[0]
    assert relative_error(model(x), x @ q @ k.T @ x.T @ x @ v) <= 1e-12


def test_attention_decay_mask(getkey):
    model = cn.LightningAttention.random(3, key=getkey(), decay=0.5)
    mask = model.mask(4)
    assert mask[3, 1] == 0.25 and mask[1, 3] == 0.0 and mask[2, 2] == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(decay=0.9, causal=False), "causal=False"),
    (dict(decay=1.5), "decay"),
    (dict(form="fast"), "form"),
    (dict(block_size=0), "block_size"),
])
def test_attention_rejects_bad_arguments(getkey, bad, match):
    with pytest.raises(ValueError, match=match):
        cn.LightningAttention.random(3, key=getkey(), **bad)


def test_model_constructors_reject_bad_shapes(getkey):
    with pytest.raises(ValueError, match="widths"):
        cn.DeepLinear.random((4,), key=getkey())
    with pytest.raises(ValueError, match="chain"):
        cn.DeepLinear([jnp.ones((3, 2)), jnp.ones((2, 4))])
    with pytest.raises(ValueError, match="hidden layer"):
        cn.PolynomialNet([jnp.ones((3, 2))])
    with pytest.raises(ValueError, match="activation"):
        cn.PolynomialNet.random((2, 3, 1), key=getkey(), activation="relu")
    with pytest.raises(ValueError, match="value"):
        cn.LightningAttention(jnp.ones((1, 3, 1)), jnp.ones((1, 3, 1)), jnp.ones((1, 2, 1)))


def test_ensemble_init_stack_and_index(getkey):
    key = getkey()
    ens = cn.Ensemble.init(lambda k: cn.DeepLinear.random((3, 4, 2), key=k), key, 5)
    assert len(ens) == 5 and ens.models.weights[0].shape == (5, 4, 3)
    keys = jax.random.split(key, 5)
    third = cn.DeepLinear.random((3, 4, 2), key=keys[3])
    np.testing.assert_array_equal(ens[3].weights[1], third.weights[1])
    restacked = cn.Ensemble.stack([ens[i] for i in range(5)])
    np.testing.assert_array_equal(restacked.models.weights[0], ens.models.weights[0])
    with pytest.raises(ValueError, match="architecture"):
        cn.Ensemble.stack([ens[0], cn.PolynomialNet.random((3, 4, 2), key=key)])
