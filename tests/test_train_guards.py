"""Discrete runs at the boundary (issue 23): named errors for bad optimizer / train /
track_mechanics arguments, truthful statuses (non-finite → diverged at that step, a loss that
ends above 10× its start → loss_increased), exact step counts, and no recompilation for an
optimizer, data set or model made again with the same shapes. References are numpy GD
recursions and optax itself."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conservation as cn
import conservation._dynamics.train as train_module

D, N = 3, 8


@pytest.fixture(scope="module")
def lsq():
    """Least squares L(w) = mean_i (w·x_i − y_i)² with a one-layer DeepLinear (no laws: the
    cheapest compiled program); returns (model, objective, x, y) with numpy x (N, D), y (N,)."""
    kx, ky, kw = jax.random.split(jax.random.PRNGKey(23), 3)
    x = np.asarray(cn.gaussian_inputs(kx, N, (D,)))
    y = np.asarray(cn.gaussian_inputs(ky, N, (1,)))[:, 0]
    model = cn.DeepLinear.random([D, 1], key=kw)
    objective = cn.make_objective(cn.MSE(), cn.Dataset(jnp.asarray(x), jnp.asarray(y[:, None])),
                                  model)
    return model, objective, x, y


def _numpy_gd(w, x, y, lr, steps, momentum=0.0, weight_decay=0.0):
    """Heavy ball v ← βv + ∇L + λw, w ← w − ηv (β = 0: GD) on L(w) = mean (x·w − y)²;
    returns the iterates' losses and the final w."""
    w, v, losses = np.array(w, float), np.zeros_like(w), []
    for _ in range(steps):
        r = x @ w - y
        losses.append(np.mean(r**2))
        v = momentum * v + 2.0 / len(y) * x.T @ r + weight_decay * w
        w = w - lr * v
    losses.append(np.mean((x @ w - y) ** 2))
    return np.array(losses), w


def _lambda_max(x):
    return float(np.linalg.eigvalsh(2.0 / len(x) * x.T @ x).max())


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0.0), "lr"), (dict(lr=-0.1), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"), (dict(lr="0.1"), "lr"), (dict(lr=np.array([0.1, -1.0])), "lr"),
    (dict(kind="momentum", lr=0.1, momentum=1.5), "momentum"),
    (dict(kind="momentum", lr=0.1, momentum=-0.1), "momentum"),
    (dict(lr=0.1, momentum=0.9), "momentum"),  # only kind="momentum" uses it
    (dict(lr=0.1, momentum=np.array([0.0, 0.5])), "momentum"),  # one member's is enough
    (dict(lr=0.1, weight_decay=-1e-3), "weight_decay"),
    (dict(kind="adam", lr=0.1, b1=1.0), "b1"), (dict(kind="adam", lr=0.1, b2=-0.5), "b2"),
    (dict(kind="lbfgs", lr=0.1), "kind"),
])
def test_optimizer_names_the_bad_argument(kwargs, name):
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.optimizer(**kwargs)


def test_optimizer_takes_array_and_traced_learning_rates(lsq):
    model, *_ = lsq
    assert cn.optimizer("gd", lr=0.1, momentum=np.zeros(2)) is not None  # all zero: unused
    assert cn.optimizer("gd", lr=np.array([0.1, 0.2])) is not None
    rates = jax.jit(lambda lr: cn.optimizer("gd", lr=lr).init(model).hyperparams)(0.25)
    assert float(rates["learning_rate"]) == 0.25


def test_train_names_the_bad_argument(lsq):
    model, objective, *_ = lsq
    gd = cn.optimizer("gd", lr=0.1)
    bad = [
        (dict(step_time=-1.0), "step_time"), (dict(step_time=0.0), "step_time"),
        (dict(divergence=float("nan")), "divergence"), (dict(divergence=-1.0), "divergence"),
        (dict(steps=3.0), "steps"), (dict(steps=True), "steps"), (dict(steps=0), "steps"),
        (dict(n_save=2.5), "n_save"), (dict(n_save=1), "n_save"),
        (dict(key=0), "key"), (dict(key=jnp.zeros(3)), "key"),
        (dict(batch_size=0, key=jax.random.PRNGKey(0)), "batch_size"),
        (dict(batch_size=2.0, key=jax.random.PRNGKey(0)), "batch_size"),
        (dict(batch_size=2), "batch_size"),  # no key to draw the batches
        (dict(optim="gd"), "optim"), (dict(objective=None), "objective"),
        (dict(hyperparams={"learning_rate": -1.0}), "learning_rate"),
        (dict(hyperparams={"learning_rate": jnp.ones(3)}), "learning_rate"),  # B = 1
        (dict(hyperparams={"momentum": 1.0}), "momentum"),
    ]
    for kwargs, name in bad:
        args = dict(objective=objective, model=model, optim=gd, steps=3) | kwargs
        with pytest.raises(cn.ArgumentError, match=name):
            cn.train(**args)


def test_gd_beyond_the_edge_of_stability_is_loss_increased(lsq):
    """GD at η = 2.02/λ_max multiplies the error along the top Hessian eigenvector by −1.02
    each step: the loss ends ~10³× above its start with a parameter norm far below the
    divergence threshold. At η = 1/λ_max it converges. Both ratios match numpy GD."""
    model, objective, x, y = lsq
    lam = _lambda_max(x)
    w0 = np.asarray(model.weights[0][0])
    for factor, status in ((2.02, "loss_increased"), (1.0, "success")):
        result = cn.train(objective, model, cn.optimizer("gd", lr=factor / lam), 300, n_save=4)
        losses, _ = _numpy_gd(w0, x, y, factor / lam, 300)
        ratio = float(result.loss[0, -1] / result.loss[0, 0])
        np.testing.assert_allclose(ratio, losses[-1] / losses[0], rtol=1e-9)
        assert result.status_names() == [status], (factor, ratio)
        assert (ratio > 10.0) == (status == "loss_increased")
        assert int(result.num_steps[0]) == 300


@pytest.mark.parametrize("steps", [7, 6])
def test_nan_member_diverges_at_step_zero_and_the_others_take_exactly_steps(lsq, steps):
    """steps = 7 with n_save = 4 is not a multiple of the save interval (3): every healthy
    member still takes exactly 7 steps, equal to numpy GD; the NaN member stops at once."""
    model, objective, x, y = lsq
    nan_model = cn.DeepLinear([jnp.full((1, D), jnp.nan)])
    ensemble = cn.Ensemble.stack([model, nan_model, model])
    result = cn.train(objective, ensemble, cn.optimizer("gd", lr=0.1), steps, n_save=4)
    assert result.status_names() == ["success", "diverged", "success"]
    np.testing.assert_array_equal(result.num_steps, [steps, 0, steps])
    assert float(result.t[-1]) == steps
    _, w = _numpy_gd(np.asarray(model.weights[0][0]), x, y, 0.1, steps)
    for i in (0, 2):
        np.testing.assert_allclose(result.final.models.weights[0][i, 0], w, rtol=1e-13)


def test_loss_that_turns_non_finite_on_the_last_step_is_diverged():
    """f(w, x) = x·log w from w = 1, y = −x: one GD step with η = 1 lands on w = −1, where
    the loss is NaN while the parameter norm is 1 (below any threshold)."""
    model = cn.FunctionModel(lambda w, x: x * jnp.log(w), jnp.ones(1))
    data = cn.Dataset(jnp.ones((1, 1)), -jnp.ones((1, 1)))
    objective = cn.make_objective(cn.MSE(), data, model)
    result = cn.train(objective, model, cn.optimizer("gd", lr=1.0), 1, n_save=2)
    assert float(result.final.models.params[0, 0]) == -1.0
    assert result.status_names() == ["diverged"]


def test_a_new_optimizer_data_set_or_model_reuses_the_compiled_program(lsq):
    model, objective, x, y = lsq
    cn.train(objective, model, cn.optimizer("gd", lr=0.1), 5, n_save=2)  # compiled (or reused)
    # Everything made anew with the same shapes: another learning rate, data, parameters.
    x2, y2 = x + 1.0, 2.0 * y
    objective2 = cn.make_objective(cn.MSE(), cn.Dataset(jnp.asarray(x2), jnp.asarray(y2[:, None])),
                                   model)
    model2 = cn.DeepLinear([model.weights[0] + 0.5])
    compiles, traces = [], train_module.TRACES

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = cn.train(objective2, model2, cn.optimizer("gd", lr=0.03), 5, n_save=2)
        jax.block_until_ready(result)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and train_module.TRACES == traces
    _, w = _numpy_gd(np.asarray(model2.weights[0][0]), x2, y2, 0.03, 5)  # the new numbers
    np.testing.assert_allclose(result.final.models.weights[0][0, 0], w, rtol=1e-14)


def test_optimizers_keep_optax_semantics(lsq):
    """Five steps of heavy ball with weight decay equal the numpy recursion; Adam(W) equals
    optax.adamw applied step by step."""
    model, objective, x, y = lsq
    w0 = np.asarray(model.weights[0][0])
    momentum = cn.optimizer("momentum", lr=0.05, momentum=0.8, weight_decay=0.1)
    result = cn.train(objective, model, momentum, 5, n_save=2)
    _, w = _numpy_gd(w0, x, y, 0.05, 5, momentum=0.8, weight_decay=0.1)
    np.testing.assert_allclose(result.final.models.weights[0][0, 0], w, rtol=1e-15, atol=1e-15)

    adam = cn.optimizer("adam", lr=0.05, weight_decay=0.1, b1=0.8, b2=0.99)
    result = cn.train(objective, model, adam, 5, n_save=2)
    reference = optax.adamw(0.05, b1=0.8, b2=0.99, weight_decay=0.1)
    params = eqx.filter(model, eqx.is_inexact_array)
    state = reference.init(params)
    for _ in range(5):
        grads = eqx.filter_grad(objective)(eqx.combine(params, model))
        updates, state = reference.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(result.final.models.weights[0][0], params.weights[0],
                               rtol=1e-15, atol=1e-15)


@pytest.fixture(scope="module")
def mechanics_problem():
    widths = (3, 4, 2)
    k_model, k_teacher, k_x = jax.random.split(jax.random.PRNGKey(5), 3)
    model = cn.MLP.random(widths, key=k_model, activation="linear")
    teacher = cn.MLP.random(widths, key=k_teacher, activation="linear")
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, 16, (widths[0],)))
    return model, cn.make_objective(cn.MSE(), data, model), cn.mechanics_laws(model)


def test_track_mechanics_names_the_bad_argument(mechanics_problem):
    model, objective, laws = mechanics_problem
    bad = [
        (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(momentum=1.5), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"), (dict(steps=0), "steps"),
        (dict(steps=2.0), "steps"), (dict(batch_size=4), "batch_size"),
        (dict(batch_size=100, key=jax.random.PRNGKey(0)), "batch_size"), (dict(key=1), "key"),
        (dict(divergence=float("nan")), "divergence"), (dict(objective="mse"), "objective"),
        (dict(laws=[cn.FunctionLaw(lambda m: m.weights[0], "w")]), "laws"),
    ]
    for kwargs, name in bad:
        args = dict(objective=objective, model=model, laws=laws, lr=0.1, steps=3) | kwargs
        with pytest.raises(cn.ArgumentError, match=name):
            cn.track_mechanics(**args)


def test_track_mechanics_reports_the_statuses_of_train(mechanics_problem):
    """Members: healthy, NaN parameters, weights ×1.5 (unstable at η = 0.2: its loss ends
    ~10⁶× above its start, norm far below 1e8). track_mechanics and train agree on statuses,
    steps and final parameters; the NaN member does not spoil the others' identity errors."""
    model, objective, laws = mechanics_problem
    scaled = [eqx.tree_at(lambda m: m.weights, model, tuple(c * w for w in model.weights))
              for c in (1.0, jnp.nan, 1.5)]
    ensemble = cn.Ensemble.stack(scaled)
    mechanics = cn.track_mechanics(objective, ensemble, laws, lr=0.2, steps=3)
    trained = cn.train(objective, ensemble, cn.optimizer("gd", lr=0.2), 3, laws=laws, n_save=4)
    assert mechanics.status_names() == ["success", "diverged", "loss_increased"]
    assert trained.status_names() == mechanics.status_names()
    np.testing.assert_array_equal(mechanics.num_steps, [3, 0, 3])
    np.testing.assert_array_equal(trained.num_steps, mechanics.num_steps)
    final_loss = [float(objective(mechanics.final[i])) for i in (0, 2)]
    np.testing.assert_allclose(np.asarray(mechanics.loss)[[0, 2], -1], final_loss,
                               rtol=1e-14)
    assert final_loss[1] > 10 * float(objective(ensemble[2]))
    for a, b in zip(jax.tree_util.tree_leaves(mechanics.final.models),
                    jax.tree_util.tree_leaves(trained.final.models), strict=True):
        np.testing.assert_allclose(np.asarray(a)[[0, 2]], np.asarray(b)[[0, 2]], rtol=1e-13)
    assert max(mechanics.discrete_error().values()) <= 1e-12
