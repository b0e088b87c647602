"""Bring your own network: foreign equinox Modules and pure functions f(params, x) as models."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn


def _flat(model):
    return jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


def _mlp_fn(params, x):
    """The same network as eqx.nn.MLP(..., activation=relu), written as a pure function of a
    list of (weight, bias) pairs (the pytree order matches equinox's leaves)."""
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(w @ h + b)
    w, b = params[-1]
    return w @ h + b


@pytest.fixture(scope="module")
def problem():
    key = jax.random.PRNGKey(7)
    k_model, k_x, k_y = jax.random.split(key, 3)
    mlp = eqx.nn.MLP(3, 2, 4, 2, activation=jax.nn.relu, key=k_model)
    params = [(layer.weight, layer.bias) for layer in mlp.layers]
    x = cn.gaussian_inputs(k_x, 16, (3,))
    y = cn.gaussian_inputs(k_y, 16, (2,))
    return mlp, cn.FunctionModel(_mlp_fn, params), cn.Dataset(x, y)


def _numpy_forward(params, x):
    h = np.asarray(x)
    for w, b in params[:-1]:
        h = np.maximum(np.asarray(w) @ h + np.asarray(b), 0.0)
    w, b = params[-1]
    return np.asarray(w) @ h + np.asarray(b)


def test_function_model_matches_numpy_and_the_equinox_model(problem):
    mlp, fmodel, data = problem
    reference = np.stack([_numpy_forward(fmodel.params, x) for x in np.asarray(data.x)])
    np.testing.assert_allclose(jax.vmap(fmodel)(data.x), reference, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jax.vmap(mlp)(data.x), reference, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(_flat(fmodel), _flat(mlp))


def test_pure_function_flow_equals_the_equinox_flow(problem):
    mlp, fmodel, data = problem
    objective = cn.make_objective(cn.MSE(), data, mlp)
    assert objective.moments is None  # a foreign module takes the per-sample path
    a = cn.gradient_flow(objective, mlp, 1.0, solver="tsit5", rtol=1e-9, n_save=3)
    traces = []

    def counted(params, x):  # runs once per trace of the model, not per evaluation
        traces.append(1)
        return _mlp_fn(params, x)

    b = cn.gradient_flow(objective, cn.FunctionModel(counted, fmodel.params), 1.0,
                         solver="tsit5", rtol=1e-9, n_save=3)
    # The gradient is traced once per compiled solve, not at each of the ~25 places the solver
    # loop evaluates it (31 traces, 5.0 of this compile's 11 s; now 6: gradient, loss, saves).
    assert len(traces) <= 10, len(traces)
    assert a.status_names() == b.status_names() == ["success"]
    assert a.values == {} and b.values == {}  # no laws declared: none monitored
    theta_a, theta_b = _flat(a.final[0]), _flat(b.final[0])
    assert float(jnp.max(jnp.abs(theta_a - _flat(mlp)))) > 1e-2  # it moved
    assert float(jnp.max(jnp.abs(theta_a - theta_b))) <= 1e-12
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)


def test_foreign_ensembles_train_and_stack(problem):
    mlp, fmodel, data = problem
    ensemble = cn.Ensemble.init(lambda k: eqx.nn.MLP(3, 2, 4, 2, key=k), jax.random.PRNGKey(0),
                                3)
    assert len(ensemble) == 3 and isinstance(ensemble[1], eqx.nn.MLP)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    result = cn.train(objective, ensemble, cn.optimizer("gd", lr=0.01), 5, n_save=2)
    assert result.loss.shape == (3, 2) and bool(jnp.all(result.loss[:, 1] < result.loss[:, 0]))
    stacked = cn.Ensemble.stack([fmodel, fmodel])
    assert len(stacked) == 2 and cn.default_laws(stacked) == ()
    assert cn.default_laws(cn.MLP.random((2, 3, 1), key=jax.random.PRNGKey(0))) != ()


def test_bad_models_are_refused_with_a_fix():
    with pytest.raises(TypeError, match="FunctionModel"):
        cn.as_ensemble(_mlp_fn)
    with pytest.raises(ValueError, match="`params`"):
        cn.FunctionModel(_mlp_fn, {"n": 3})
