"""Issue 23, "errors without a name", outside the dynamics: every public function of the models,
data and laws checks its arguments at the boundary and raises `conservation.ArgumentError`
naming the argument (never a raw JAX/numpy error); parameters of another float dtype are
converted to float64 with one warning, complex ones refused; laws check the model they are
evaluated on (also at trace time, inside `jit`)."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._laws.base import check_laws

KEY = jax.random.PRNGKey(0)


def _cast(model, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    data = cn.Dataset(x, y)
    linear = cn.DeepLinear.random([3, 4, 2], key=KEY)
    mlp = cn.MLP.random([3, 4, 2], key=KEY)
    return {
        "x": x, "y": y, "data": data, "linear": linear, "mlp": mlp,
        "moments": cn.make_objective(cn.MSE(), data, linear),
        "samples": cn.make_objective(cn.MSE(), data, linear, moments=False),
        "attention": cn.LightningAttention.random(2, key=KEY),
        "poly": cn.PolynomialNet.random([2, 3, 1], key=KEY),
    }


def _reference_mse(weights, x, y):
    # numpy float64: mean over samples of ‖W_L⋯W_1 x − y‖² (MSE has no ½)
    f = np.asarray(x, np.float64)
    for w in weights:
        f = f @ np.asarray(w, np.float64).T
    return np.mean(np.sum((f - y) ** 2, axis=1))


def _one_conversion_warning(record):
    messages = [str(w.message) for w in record if "converted to float64" in str(w.message)]
    assert len(messages) == 1, messages
    return messages[0]


# ---- float32 / float16 / complex parameters ------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("path", ["moments", "samples"])
def test_low_precision_model_is_evaluated_in_float64_with_one_warning(setup, dtype, path):
    low = _cast(setup["linear"], dtype)
    objective = setup[path]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = objective(low)
    assert str(jnp.dtype(dtype)) in _one_conversion_warning(record)
    assert loss.dtype == jnp.float64
    # The float64 value of exactly the low-precision weights (a float32 evaluation was off
    # by ~1e-8 relative).
    exact = _reference_mse([np.asarray(w, np.float64) for w in low.weights], setup["x"],
                           setup["y"])
    np.testing.assert_allclose(float(loss), exact, rtol=1e-13)
    assert float(loss) == pytest.approx(float(objective(_cast(low, jnp.float64))), rel=1e-15)


def test_ensembles_convert_low_precision_parameters_once(setup):
    low = _cast(setup["linear"], jnp.float32)
    builders = {
        "as_ensemble": lambda: cn.as_ensemble(low),
        "stack": lambda: cn.Ensemble.stack([low, low]),
        "init": lambda: cn.Ensemble.init(
            lambda k: _cast(cn.DeepLinear.random([3, 4, 2], key=k), jnp.float16), KEY, 2),
    }
    for name, build in builders.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ensemble = build()
        _one_conversion_warning(record)
        leaves = jax.tree_util.tree_leaves(ensemble)
        assert all(a.dtype == jnp.float64 for a in leaves), name
        if name == "as_ensemble":  # the converted values are exactly the float32 ones
            np.testing.assert_array_equal(np.asarray(ensemble[0].weights[0]),
                                          np.asarray(low.weights[0], np.float64))


def test_pointwise_check_converts_low_precision_parameters(setup):
    low = _cast(setup["linear"], jnp.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cosine = cn.pointwise_check(cn.BalanceLaw(0), setup["moments"], low)
    _one_conversion_warning(record)
    assert cosine.dtype == jnp.float64 and float(cosine) < 1e-12  # balance is conserved


@pytest.mark.parametrize("call", [
    lambda s, m: cn.as_ensemble(m),
    lambda s, m: cn.Ensemble.stack([m]),
    lambda s, m: s["moments"](m),
    lambda s, m: cn.make_objective(cn.MSE(), s["data"], m),
    lambda s, m: cn.pointwise_check(cn.BalanceLaw(0), s["moments"], m),
    lambda s, m: cn.count_laws(m, cn.MSE()),
    lambda s, m: cn.find_symmetries(m, cn.MSE(), s["data"]),
], ids=["as_ensemble", "stack", "objective", "make_objective", "pointwise_check",
        "count_laws", "find_symmetries"])
def test_complex_parameters_are_refused(setup, call):
    complex_model = _cast(setup["linear"], jnp.complex128)
    with pytest.raises(cn.ArgumentError, match="`models?` has complex parameters"):
        call(setup, complex_model)


# ---- laws check the model they are evaluated on -------------------------------------------


def _mask_law():
    return cn.QuadraticMaskLaw("scale[x]", 5, (0,), (0,), (1.0,), 1)


LAW_MISMATCHES = [
    ("linear", lambda: cn.BalanceLaw(5), "reads layer 6 but the model has 2 layers"),
    ("linear", lambda: cn.RescaleLaw(0), "BalanceLaw"),
    ("mlp", lambda: cn.RescaleLaw(1), "reads layer 2"),
    ("mlp", lambda: cn.ScaleLaw(2), "reads layer 2"),
    ("linear", lambda: cn.TranslationLaw(), "`biases`"),
    ("poly", lambda: cn.NeuronRescaleLaw(1, 2), "reads layer 2"),
    ("attention", lambda: cn.AttentionQKLaw(1), "reads head 1 but the model has 1 heads"),
    ("attention", lambda: cn.AttentionVOLaw(0), "no `out` projection"),
    ("linear", lambda: cn.AttentionKVLaw(0), "no `key` projection"),
    ("linear", lambda: cn.AttentionRangeLaw(), "no `query` projection"),
    ("linear", lambda: cn.CyclicRatioLaw(), "1 row"),
    ("linear", lambda: cn.FourierPhaseLaw(1), "1 row"),
    ("linear", lambda: cn.EquivariantResidualLaw(), "square"),
    ("linear", lambda: cn.RowSpaceLaw(jnp.eye(5)), "5 columns"),
    ("linear", _mask_law, "found for 5 parameters but the model has 20"),
]


@pytest.mark.parametrize("model, law, message", LAW_MISMATCHES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(LAW_MISMATCHES)])
def test_a_law_that_does_not_fit_the_model_is_named(setup, model, law, message):
    model, law = setup[model], law()
    with pytest.raises(cn.ArgumentError, match="`laws` holds") as error:
        check_laws([law], cn.as_ensemble(model))  # what the dynamics call at the boundary
    assert message in str(error.value) and law.name in str(error.value)
    with pytest.raises(cn.ArgumentError, match="`laws` holds"):  # evaluated directly
        law(model)


def test_law_checks_run_at_trace_time_and_in_pointwise_check(setup):
    with pytest.raises(cn.ArgumentError, match="balance\\[5\\]"):
        jax.jit(cn.BalanceLaw(5))(setup["linear"])
    with pytest.raises(cn.ArgumentError, match="`laws` holds 'rescale\\[0\\]'"):
        cn.pointwise_check(cn.RescaleLaw(0), setup["moments"], setup["linear"])
    law = cn.FunctionLaw(lambda m: m.missing, "mine")  # no static check: evaluated abstractly
    with pytest.raises(cn.ArgumentError, match="`laws` holds 'mine'.*AttributeError"):
        check_laws([law], setup["linear"])
    assert check_laws(setup["linear"].laws(), setup["linear"]) == setup["linear"].laws()


@pytest.mark.parametrize("build, name", [
    (lambda: cn.BalanceLaw(-1), "layer"),
    (lambda: cn.BalanceLaw(1.0), "layer"),
    (lambda: cn.RescaleLaw("0"), "layer"),
    (lambda: cn.NeuronRescaleLaw(0, 0), "degree"),
    (lambda: cn.AttentionKVLaw(-1), "head"),
    (lambda: cn.FourierPhaseLaw(0), "frequency"),
    (lambda: cn.FunctionLaw("not a function", "f"), "fn"),
    (lambda: cn.FunctionLaw(jnp.sum, ""), "label"),
])
def test_bad_law_constructors(build, name):
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        build()


# ---- objectives used on another model ------------------------------------------------------


def test_objective_used_on_another_model_is_named(setup):
    with pytest.raises(cn.ArgumentError, match="`model` \\(MLP\\) is not tensorizable"):
        setup["moments"](setup["mlp"])
    other = cn.DeepLinear.random([4, 2], key=KEY)
    with pytest.raises(cn.ArgumentError, match="`model` \\(DeepLinear\\) has a parameter map"):
        setup["moments"](other)
    with pytest.raises(cn.ArgumentError, match="cannot take this objective's inputs"):
        setup["samples"](other)
    # one output against two targets broadcast into a number before
    narrow = cn.DeepLinear.random([3, 1], key=KEY)
    with pytest.raises(cn.ArgumentError, match="outputs shape \\(1,\\)"):
        setup["samples"](narrow)
    with pytest.raises(cn.ArgumentError, match="`model` is an Ensemble"):
        setup["samples"](cn.as_ensemble(setup["linear"]))


# ---- count_laws / find_symmetries ----------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({}, "input_shape"),
    ({"input_shape": (5,)}, "input_shape"),
    ({"input_shape": 2}, "input_shape"),
])
def test_count_laws_of_a_foreign_module_needs_its_input_shape(kwargs, name):
    model = eqx.nn.MLP(2, 1, 3, 1, key=KEY)
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.count_laws(model, cn.MSE(), **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"loss": "mse"}, "loss"),
    ({"tol": 0.0}, "tol"),
    ({"tol": "1e-9"}, "tol"),
    ({"scales": (1.0, -1.0)}, "scales"),
    ({"scales": ()}, "scales"),
    ({"max_depth": 1.5}, "max_depth"),
    ({"probe_size": 0}, "probe_size"),
    ({"key": 0}, "key"),
    ({"pad_to": (4,)}, "pad_to"),
    ({"early_stop": "no"}, "early_stop"),
])
def test_count_laws_arguments(setup, kwargs, name):
    kwargs = {"loss": cn.MSE()} | kwargs
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.count_laws(setup["linear"], **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"degree": 0}, "degree"),
    ({"n_sets": -1}, "n_sets"),
    ({"tol": float("nan")}, "tol"),
])
def test_find_polynomial_laws_arguments(setup, kwargs, name):
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.find_polynomial_laws(setup["linear"], cn.MSE(), **kwargs)


@pytest.mark.parametrize("change, name", [
    (lambda s: {"data": cn.Dataset(np.ones((6, 5)), s["y"])}, "data.x"),
    (lambda s: {"data": cn.Dataset(s["x"], np.ones((6, 3)))}, "data.y"),
    (lambda s: {"model": eqx.nn.Lambda(jnp.tanh)}, "model"),
    (lambda s: {"batch_size": 0}, "batch_size"),
    (lambda s: {"tol": 0.0}, "tol"),
    (lambda s: {"tol": -1e-10}, "tol"),
    (lambda s: {"points": 2.0}, "points"),
    (lambda s: {"max_points": 0}, "max_points"),
    (lambda s: {"count": "yes"}, "count"),
    (lambda s: {"key": 7}, "key"),
    (lambda s: {"loss": "mse"}, "loss"),
])
def test_find_symmetries_arguments(setup, change, name):
    kwargs = {"model": setup["mlp"], "loss": cn.MSE(), "data": setup["data"]} | change(setup)
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.find_symmetries(kwargs.pop("model"), kwargs.pop("loss"), kwargs.pop("data"),
                           **kwargs)


# ---- data constructors ---------------------------------------------------------------------


@pytest.mark.parametrize("call, name", [
    (lambda s: cn.gaussian_inputs(KEY, -1, (3,)), "n"),
    (lambda s: cn.gaussian_inputs(KEY, 4.0, (3,)), "n"),
    (lambda s: cn.gaussian_inputs(KEY, 4, 3), "shape"),
    (lambda s: cn.gaussian_inputs(KEY, 4, (0,)), "shape"),
    (lambda s: cn.gaussian_inputs(KEY, 4, (3,), scale=float("nan")), "scale"),
    (lambda s: cn.gaussian_inputs(KEY, 4, (3,), scale="1.0"), "scale"),
    (lambda s: cn.gaussian_inputs(0, 4, (3,)), "key"),
    (lambda s: cn.whiten(np.ones((4, 2))), "x"),
    (lambda s: cn.whiten(np.ones(4)), "x"),
    (lambda s: cn.teacher_dataset(s["linear"], s["x"], noise=-0.1), "noise"),
    (lambda s: cn.teacher_dataset(s["linear"], s["x"], noise=0.1), "noise"),
    (lambda s: cn.teacher_dataset(s["linear"], np.ones((4, 5))), "teacher"),
    (lambda s: cn.teacher_dataset("teacher", s["x"]), "teacher"),
    (lambda s: cn.Dataset("abc", s["y"]), "x"),
    (lambda s: cn.Dataset(s["x"] + 1j, s["y"]), "x"),
    (lambda s: cn.make_objective(cn.MSE(), s["data"], s["linear"], moments="yes"), "moments"),
    (lambda s: cn.make_objective("mse", s["data"], s["linear"]), "loss"),
    (lambda s: cn.make_objective(cn.MSE(), s["data"], s["linear"], augment="C3"), "augment"),
    (lambda s: cn.Moments.from_data(s["linear"], s["data"], chunk_size=0), "chunk_size"),
    (lambda s: cn.Augmentation(cn.CyclicShift(3), equivariant="yes"), "equivariant"),
    (lambda s: cn.isotypic_components("C3"), "group"),
    (lambda s: cn.CyclicShift(3.0), "n"),
    (lambda s: cn.OrthogonalGroup(3, seed=-1), "seed"),
    (lambda s: cn.Moments.from_gram(np.eye(2), np.ones((3, 1)), np.eye(1), 4), "M"),
    (lambda s: cn.Moments.from_gram(np.eye(2), np.ones((2, 1)), np.eye(1), 0), "n"),
])
def test_data_arguments(setup, call, name):
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        call(setup)


def test_whitening_a_rank_deficient_matrix_is_refused_not_nan():
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[:, 2] = x[:, 0] + x[:, 1]  # rank 2: xᵀx has no inverse square root
    with pytest.raises(cn.ArgumentError, match="rank-deficient"):
        cn.whiten(x)


# ---- model constructors --------------------------------------------------------------------


@pytest.mark.parametrize("build, name", [
    (lambda: cn.DeepLinear.random([3, 2.0], key=KEY), "widths"),
    (lambda: cn.DeepLinear.random("32", key=KEY), "widths"),
    (lambda: cn.DeepLinear.random([3, 2], key=0), "key"),
    (lambda: cn.DeepLinear.random([3, 2], key=KEY, init_scale="1.0"), "init_scale"),
    (lambda: cn.DeepLinear.random([3, 2], key=KEY, init_scale=float("inf")), "init_scale"),
    (lambda: cn.DeepLinear(jnp.ones((2, 3))), "weights"),
    (lambda: cn.MLP.random([3, 4, 2], key=KEY, activation="tanh"), "activation"),
    (lambda: cn.MLP.random([3, 4, 2], key=KEY, bias="yes"), "bias"),
    (lambda: cn.PolynomialNet.random([2, 3, 1], key=KEY, activation=("1.0", 2.0)), "activation"),
    (lambda: cn.PolynomialNet.random([2, 3, 1], key=KEY, activation=(0.0, float("nan"))),
     "activation"),
    (lambda: cn.Neuron.random(-1, key=KEY), "d"),
    (lambda: cn.Neuron.random(2.0, key=KEY), "d"),
    (lambda: cn.LightningAttention.random(2, key=KEY, heads=0), "heads"),
    (lambda: cn.LightningAttention.random(2, key=KEY, out_dim=0), "out_dim"),
    (lambda: cn.LightningAttention.random(2, key=KEY, decay="0.5"), "decay"),
    (lambda: cn.LightningAttention.random(2, key=KEY, decay=float("nan")), "decay"),
    (lambda: cn.LightningAttention.random(2, key=KEY, causal="no"), "causal"),
    (lambda: cn.LightningAttention.random(2, key=KEY, form="fast"), "form"),
    (lambda: cn.FunctionModel("f", {"w": jnp.ones(2)}), "fn"),
    (lambda: cn.FunctionModel(jnp.dot, {"w": jnp.arange(2)}), "params"),
    (lambda: cn.Ensemble.init(lambda k: cn.DeepLinear.random([2, 1], key=k), KEY, 2.0), "size"),
    (lambda: cn.Ensemble.init(lambda k: cn.DeepLinear.random([2, 1], key=k), 3, 2), "key"),
    (lambda: cn.Ensemble.init("factory", KEY, 2), "factory"),
    (lambda: cn.Ensemble.stack(cn.DeepLinear.random([2, 1], key=KEY)), "models"),
    (lambda: cn.as_ensemble(lambda x: x), "model"),
    (lambda: cn.mechanics_laws(cn.DeepLinear.random([2, 1], key=KEY)), "model"),
])
def test_model_arguments(build, name):
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        build()


def test_numpy_ints_are_ints():
    model = cn.DeepLinear.random([np.int64(3), np.int32(2)], key=KEY)
    assert model.widths == (3, 2) and all(isinstance(w, int) for w in model.widths)
    attention = cn.LightningAttention.random(2, key=KEY, block_size=np.int64(8), form="tiled")
    assert attention.block_size == 8
