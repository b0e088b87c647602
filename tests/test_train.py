"""Discrete optimizers: exact GD breaking of balance laws, divergence handling, optax kinds."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

WIDTHS = (5, 6, 6, 2)


@pytest.fixture(scope="module")
def problem():
    k_teacher, k_x, k_models = jax.random.split(jax.random.PRNGKey(3), 3)
    teacher = cn.DeepLinear.random(WIDTHS, key=k_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, 48, (WIDTHS[0],)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random(WIDTHS, key=k, init_scale=0.7), k_models, 3)
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble)


GD_01 = cn.optimizer("gd", lr=0.1)
GD_005 = cn.optimizer("gd", lr=0.05)


def test_gd_breaks_balance_by_exactly_eta_squared_gradient_gram(problem):
    """One GD step W ← W − ηG changes W_{l+1}ᵀW_{l+1} − W_lW_lᵀ by exactly
    η²(G_{l+1}ᵀG_{l+1} − G_lG_lᵀ): the O(η) terms cancel by the balance identity."""
    ensemble, objective = problem
    eta = 0.1
    model = ensemble[0]
    grads = eqx.filter_grad(objective)(model).weights
    result = cn.train(objective, model, GD_01, 1, n_save=2, values="all")
    observed = result.values["balance[1]"][0, 1] - result.values["balance[1]"][0, 0]
    np.testing.assert_array_equal(result.final_values["balance[1]"][0],
                                  result.values["balance[1]"][0, 1])
    predicted = eta**2 * (grads[2].T @ grads[2] - grads[1] @ grads[1].T)
    scale = float(jnp.max(jnp.abs(predicted)))
    assert float(jnp.max(jnp.abs(observed - predicted))) <= 1e-13 * scale + 1e-15
    assert float(jnp.max(jnp.abs(predicted))) > 1e-4  # the breaking is real, not round-off


def test_gd_drift_per_step_is_second_order_in_eta(problem):
    ensemble, objective = problem
    one_step = [cn.train(objective, ensemble, opt, 1, n_save=2) for opt in (GD_01, GD_005)]
    for name in one_step[0].max_drift:
        ratio = one_step[0].max_drift[name] / one_step[1].max_drift[name]
        np.testing.assert_allclose(ratio, 4.0, rtol=1e-12)  # exactly η² (see the test above)
    # Over a fixed time span the accumulated drift is O(η): halving η halves it, roughly.
    spans = [cn.train(objective, ensemble, opt, k, n_save=2)
             for opt, k in ((GD_01, 20), (GD_005, 40))]
    ratio = spans[0].max_drift["balance[0]"] / spans[1].max_drift["balance[0]"]
    assert np.all((ratio > 1.5) & (ratio < 2.7)), ratio


def test_diverging_member_is_reported_and_others_keep_results(problem):
    ensemble, objective = problem
    big = cn.DeepLinear([6.0 * w for w in ensemble[1].weights])  # lr 0.1 is unstable here
    mixed = cn.Ensemble.stack([ensemble[0], big, ensemble[2]])
    result = cn.train(objective, mixed, GD_01, 60, n_save=7)
    reference = cn.train(objective, ensemble, GD_01, 60, n_save=7)
    assert result.status_names() == ["success", "diverged", "success"]
    assert int(result.num_steps[1]) < 60
    assert bool(jnp.all(jnp.isfinite(result.final.models.weights[0][1])))  # last good step kept
    for i in (0, 2):
        np.testing.assert_array_equal(result.loss[i], reference.loss[i])
        np.testing.assert_array_equal(result.max_drift["balance[0]"][i],
                                      reference.max_drift["balance[0]"][i])


def test_max_drift_covers_every_step_not_only_save_points(problem):
    ensemble, objective = problem
    coarse = cn.train(objective, ensemble, GD_01, 30, n_save=2)
    fine = cn.train(objective, ensemble, GD_01, 30, n_save=31)
    np.testing.assert_allclose(coarse.max_drift["balance[0]"], fine.max_drift["balance[0]"],
                               rtol=1e-13)
    np.testing.assert_allclose(fine.max_drift["balance[0]"],
                               jnp.max(fine.drift["balance[0]"], axis=1), rtol=1e-13)


@pytest.mark.parametrize("kind, kwargs, batch", [
    ("sgd", dict(lr=0.05), 8),
    ("momentum", dict(lr=0.02, momentum=0.9), None),
    ("adam", dict(lr=0.01), None),
    ("gd", dict(lr=0.05, weight_decay=0.01), None),
])
def test_optimizers_train_and_break_laws(problem, kind, kwargs, batch):
    ensemble, objective = problem
    optim = cn.optimizer(kind, **kwargs)
    result = cn.train(objective, ensemble, optim, 150, batch_size=batch,
                      key=jax.random.PRNGKey(0), n_save=4, step_time=kwargs["lr"])
    assert result.status_names() == ["success"] * 3
    assert bool(jnp.all(result.loss[:, -1] < 0.5 * result.loss[:, 0]))
    assert float(jnp.min(result.max_drift["balance[0]"])) > 1e-8  # broken beyond round-off
    np.testing.assert_allclose(result.t[-1], 150 * kwargs["lr"])


def test_sgd_minibatches_depend_on_key(problem):
    ensemble, objective = problem
    optim = cn.optimizer("sgd", lr=0.05)
    runs = [cn.train(objective, ensemble, optim, 10, batch_size=8, key=jax.random.PRNGKey(s),
                     n_save=2) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0].loss, runs[1].loss)
    assert not np.allclose(runs[0].loss[:, -1], runs[2].loss[:, -1])


def test_train_argument_errors(problem):
    ensemble, objective = problem
    with pytest.raises(ValueError, match="batch_size"):
        cn.train(objective, ensemble, GD_01, 5, batch_size=1000, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="key"):
        cn.train(objective, ensemble, GD_01, 5, batch_size=4)
    with pytest.raises(ValueError, match="steps"):
        cn.train(objective, ensemble, GD_01, 0)
    with pytest.raises(ValueError, match="momentum"):
        cn.optimizer("gd", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="kind"):
        cn.optimizer("lbfgs", lr=0.1)


def test_saves_grouped_in_calls_equal_one_call_per_save(problem, monkeypatch):
    """`train` runs several saves per compiled call (≥ 10 calls when the saves allow): every
    saved number, status, step count, max drift and the final model equal those of one call
    per save bit for bit (the same steps, in one scan instead of many dispatches)."""
    from conservation._dynamics import train as train_module

    ensemble, objective = problem
    calls = []
    real = train_module._run_chunk

    def counted(*args, **kwargs):
        calls.append(args[6])  # saves per call
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_run_chunk", counted)

    def run():
        return cn.train(objective, ensemble, cn.optimizer("momentum", lr=0.02, momentum=0.9),
                        steps=120, n_save=61, values="all")

    # The group size against a brute-force search: the largest divisor leaving ≥ 10 calls.
    for n in range(1, 300):
        want = max([d for d in range(1, n + 1) if n % d == 0 and n // d >= 10], default=1)
        assert train_module._saves_per_call(n) == want, n
    grouped = run()
    assert calls == [6] * 10, calls  # 60 saves of 2 steps: 10 calls of 6
    monkeypatch.setattr(train_module, "_CALLS", 10**9)  # one save per call, as before
    del calls[:]
    single = run()
    assert calls == [1] * 60, calls
    for a, b in zip(jax.tree_util.tree_leaves((grouped.loss, grouped.values, grouped.drift,
                                               grouped.condition, grouped.max_drift,
                                               grouped.status, grouped.num_steps,
                                               grouped.final, grouped.t)),
                    jax.tree_util.tree_leaves((single.loss, single.values, single.drift,
                                               single.condition, single.max_drift,
                                               single.status, single.num_steps,
                                               single.final, single.t))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
