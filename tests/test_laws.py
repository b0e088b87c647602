"""Pointwise checks ⟨∇Q, ∇L⟩ = 0 of every shipped architecture law, and negative controls."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import conservation as cn

LOSSES = [cn.MSE(), cn.LogCosh(), cn.Quartic(), cn.CrossEntropy()]
LAW_MODELS = ["deep_linear", "quadratic", "cubic", "deep_quadratic", "attention_bare",
              "attention_decay", "attention_heads_out", "attention_heads_concat"]


def _data(model, xs, key, loss):
    out = jax.eval_shape(jax.vmap(model), xs).shape
    y = jax.random.normal(key, out)
    if isinstance(loss, cn.CrossEntropy):
        y = jax.nn.sigmoid(y) if out[-1] == 1 else jax.nn.softmax(y, axis=-1)
    return cn.Dataset(xs, y)


@eqx.filter_jit
def _worst_cosines(laws, objective, model):
    return jnp.stack([cn.pointwise_check(law, objective, model) for law in laws])


@pytest.mark.parametrize("name", LAW_MODELS)
def test_architecture_laws_hold_pointwise_for_every_loss(zoo, getkey, name):
    model, xs = zoo[name]
    laws = model.laws()
    assert laws, f"{name} should ship architecture laws"
    for loss in LOSSES:
        objective = cn.make_objective(loss, _data(model, xs, getkey(), loss), model)
        cosines = _worst_cosines(laws, objective, model)
        assert float(jnp.max(cosines)) <= 1e-12, (loss.name, cosines)


def test_law_inventory(zoo):
    names = lambda m: [law.name for law in zoo[m][0].laws()]  # noqa: E731
    assert names("deep_linear") == ["balance[0]", "balance[1]"]
    assert names("quadratic") == ["rescale[0]"]
    assert names("deep_quadratic") == ["rescale[0]", "rescale[1]"]
    assert names("attention_bare") == ["qk[0]", "kv[0]"]
    assert names("attention_heads_out") == ["qk[0]", "kv[0]", "vo[0]", "qk[1]", "kv[1]", "vo[1]"]
    # Inhomogeneous activations have no rescaling symmetry, hence no architecture laws.
    assert zoo["sextic_neuron"][0].laws() == ()
    assert zoo["deep_inhomogeneous"][0].laws() == ()


def test_quadratic_neuron_law_is_w_squared_minus_two_a_squared(zoo):
    model, _ = zoo["quadratic"]
    w, a = model.weights
    expected = jnp.sum(w**2, axis=1) - 2 * jnp.sum(a**2, axis=0)
    assert jnp.allclose(cn.NeuronRescaleLaw(0, 2)(model), expected, rtol=1e-14)


@pytest.mark.parametrize("name, law", [
    # The rescale law with the wrong homogeneity degree.
    ("quadratic", cn.NeuronRescaleLaw(0, 3)),
    # |w|² − 2a² is a law for σ = z², not for the inhomogeneous sextic of Fig. 1.
    ("sextic_neuron", cn.NeuronRescaleLaw(0, 2)),
    # A balance matrix needs linear activations: a quadratic net only keeps its diagonal.
    ("quadratic", cn.BalanceLaw(0)),
    # ‖Q‖² alone is not conserved (only differences of the rescaled blocks are).
    ("attention_decay", cn.FunctionLaw(lambda m: jnp.sum(m.query**2), "norm_q")),
])
def test_negative_controls_break_pointwise(zoo, getkey, name, law):
    model, xs = zoo[name]
    objective = cn.make_objective(cn.MSE(), _data(model, xs, getkey(), cn.MSE()), model)
    assert float(_worst_cosines((law,), objective, model)[0]) >= 1e-3


def test_law_names_must_be_unique_and_typed(zoo, getkey):
    model, xs = zoo["deep_linear"]
    objective = cn.make_objective(cn.MSE(), _data(model, xs, getkey(), cn.MSE()), model)
    with pytest.raises(ValueError, match="unique"):
        cn.gradient_flow(objective, model, 1.0, laws=[cn.BalanceLaw(0), cn.BalanceLaw(0)])
    with pytest.raises(TypeError, match="FunctionLaw"):
        cn.gradient_flow(objective, model, 1.0, laws=[lambda m: 0.0])


class _ValueOut(eqx.Module):
    """A module of the user's own with value/out projections and no `query`: 3 heads of
    (d, k) = (5, 2) values and (2, 5) outputs (the head axis is the first, not the d axis)."""

    value: jax.Array
    out: jax.Array


def test_head_count_of_a_module_without_query_is_its_value_heads():
    model = _ValueOut(jnp.ones((3, 5, 2)), jnp.ones((3, 2, 5)))
    law = cn.AttentionVOLaw(2)
    assert float(law.scale(model)) > 0  # head 2 of 3 exists
    with pytest.raises(cn.ArgumentError, match="head 3 but the model has 3 heads"):
        cn.AttentionVOLaw(3).check(model)
