"""Library inputs (issue 13 item 6): dtypes converted at `Dataset`, bad data named with shapes;
data sources of the CLI (.npy/.npz files, python factories, attention token matrices)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._experiments.config import ConfigError, parse_config
from conservation._experiments.runner import build


def _reference_mse(weights, x, y):
    # numpy float64: mean over samples of ‖W_L⋯W_1 x − y‖² (MSE has no ½, no output mean)
    f = x.astype(np.float64)
    for w in weights:
        f = f @ np.asarray(w, np.float64).T
    return np.mean(np.sum((f - y.astype(np.float64)) ** 2, axis=1))


@pytest.fixture(scope="module")
def model():
    return cn.DeepLinear.random([3, 2], key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float16])
@pytest.mark.parametrize("moments", [True, False])
def test_float32_and_integer_data_give_float64_objectives(model, dtype, moments):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 3)) * 4).astype(dtype)
    y = (rng.normal(size=(6, 2)) * 4).astype(dtype)
    data = cn.Dataset(x, y)
    assert data.x.dtype == data.y.dtype == jnp.float64
    objective = cn.make_objective(cn.MSE(), data, model, moments=moments)
    loss = objective(model)
    assert loss.dtype == jnp.float64
    expected = _reference_mse(model.weights, x, y)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
    grad = jax.grad(lambda m: objective(m))(model)
    assert all(g.dtype == jnp.float64 for g in jax.tree_util.tree_leaves(grad))
    if dtype is not np.int32:
        return
    # A discrete run on integer data works (the scan carry keeps one dtype) and is the float64
    # run: GD re-run in numpy on the data as floats, W ← W − η·(2/n)(WX − Y)Xᵀ.
    lr, steps = 1e-3, 3
    result = cn.train(objective, model, cn.optimizer("gd", lr=lr), steps, n_save=2)
    assert result.loss.dtype == jnp.float64
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    w = np.asarray(model.weights[0])
    losses = [_reference_mse([w], xf, yf)]
    for _ in range(steps):
        w = w - lr * 2.0 / len(xf) * (xf @ w.T - yf).T @ xf
        losses.append(_reference_mse([w], xf, yf))
    assert losses[-1] < 0.99 * losses[0]  # the steps did change the loss
    np.testing.assert_allclose(np.asarray(result.loss[0]), [losses[0], losses[-1]], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(result.final.models.weights[0][0]), w, rtol=1e-12)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((0, 3)), np.zeros((0, 2)), "0 samples"),
    (np.array([[1.0, np.nan, 0.0]]), np.zeros((1, 2)), "`x` (shape (1, 3)) holds 1 non-finite"),
    (np.zeros((2, 3)), np.array([[np.inf, 0.0], [0.0, 0.0]]), "`y` (shape (2, 2)) holds 1"),
    (np.zeros((2, 3)), np.zeros((3, 2)), "`x` has 2 samples but `y` has 3"),
    (np.zeros(3), np.zeros((3, 2)), "need a leading sample axis"),
])
def test_bad_datasets_name_the_argument(x, y, message):
    with pytest.raises(ValueError) as error:
        cn.Dataset(x, y)
    assert message in str(error.value)


def test_wrong_feature_width_names_data_and_shapes(model):
    with pytest.raises(ValueError, match=r"`data.x` has samples of shape \(4,\)"):
        cn.make_objective(cn.MSE(), cn.Dataset(np.ones((5, 4)), np.ones((5, 2))), model)
    with pytest.raises(ValueError, match=r"`data.y` has targets of shape \(3,\) but the model "
                                         r"DeepLinear outputs shape \(2,\)"):
        cn.make_objective(cn.MSE(), cn.Dataset(np.ones((5, 3)), np.ones((5, 3))), model)


BASE = {"name": "d", "model": {"kind": "deep_linear", "widths": [3, 2]},
        "dynamics": [{"kind": "gd", "lr": 0.1, "steps": 2}]}


def test_npz_file_data_reach_the_objective_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(7, 2))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    config = parse_config(BASE | {"data": {"inputs": "file", "path": "data.npz",
                                           "targets": "file"}}, base=tmp_path)
    _, objectives, _ = build(config)
    data = objectives[""].data
    np.testing.assert_array_equal(np.asarray(data.x), x.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(data.y), y)
    # .npy: inputs only, targets from the teacher; a wrong width names the field
    np.save(tmp_path / "x.npy", rng.normal(size=(4, 5)))
    bad = parse_config(BASE | {"data": {"inputs": "file", "path": "x.npy"}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"`data.path` inputs have shape \(5,\) per sample "
                                          r"but the model takes \(3,\)"):
        build(bad)
    np.savez(tmp_path / "nox.npz", a=x)
    with pytest.raises(ConfigError, match="has no array 'x'"):
        build(parse_config(BASE | {"data": {"inputs": "file", "path": "nox.npz"}},
                           base=tmp_path))


def test_python_factories_for_data_and_models(tmp_path, monkeypatch):
    (tmp_path / "user_factories.py").write_text(
        "import numpy as np, equinox as eqx, jax\n"
        "def data():\n"
        "    x = np.arange(12, dtype=np.int64).reshape(4, 3)\n"
        "    return x, x[:, :2] * 0.5\n"
        "class Affine(eqx.Module):\n"
        "    w: jax.Array\n"
        "    def __call__(self, x):\n"
        "        return self.w @ x\n"
        "def affine(key, out=2, dim=3):\n"
        "    return Affine(jax.random.normal(key, (out, dim)))\n"
        "def not_a_model(key, **kwargs):\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"name": "p", "model": {"kind": "python", "factory": "user_factories:affine",
                                  "kwargs": {"out": 2}, "input_shape": [3]},
           "data": {"inputs": "python", "factory": "user_factories:data", "targets": "python"},
           "dynamics": [{"kind": "gd", "lr": 0.01, "steps": 2}]}
    ensemble, objectives, laws = build(parse_config(raw))
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.testing.assert_array_equal(np.asarray(objectives[""].data.x), x)
    assert laws == ()  # a plain equinox Module has no .laws()
    w = np.asarray(ensemble[0].w)
    expected = np.mean(np.sum((x @ w.T - x[:, :2] * 0.5) ** 2, axis=1))
    np.testing.assert_allclose(float(objectives[""](ensemble[0])), expected, rtol=1e-12)
    raw["model"]["factory"] = "user_factories:not_a_model"
    with pytest.raises(ConfigError, match="field `model.factory` must return an equinox Module"):
        build(parse_config(raw))


def test_explicit_token_matrices_for_attention():
    x = np.random.default_rng(2).normal(size=(3, 4, 2))
    raw = {"name": "a", "model": {"kind": "lightning_attention", "dim": 2},
           "data": {"n": 3, "inputs": "explicit", "x": x.tolist()},
           "dynamics": [{"kind": "gd", "lr": 0.01, "steps": 2}]}
    ensemble, objectives, _ = build(parse_config(raw))
    data = next(iter(objectives.values())).data
    np.testing.assert_array_equal(np.asarray(data.x), x)
    assert data.y.shape[0] == 3
