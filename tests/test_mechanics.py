"""Neural mechanics: translation / scale / rescale laws, their exact breaking under SGD, weight
decay and momentum, the continuous-time theory, and the modified gradient flow."""

import json
import pathlib

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._experiments.cli import main

WIDTHS = (5, 8, 6, 3)


def _problem(key, *, normalize=True, activation="relu", loss=cn.CrossEntropy(), size=2):
    k_model, k_x, k_y, k_teacher = jax.random.split(key, 4)
    ensemble = cn.Ensemble.init(lambda k: cn.MLP.random(
        WIDTHS, key=k, activation=activation, normalize=normalize), k_model, size)
    x = cn.gaussian_inputs(k_x, 48, (WIDTHS[0],))
    teacher = cn.MLP.random(WIDTHS, key=k_teacher, activation=activation)
    y = jax.nn.softmax(2.0 * jax.vmap(teacher)(x), axis=-1)
    objective = cn.make_objective(loss, cn.Dataset(x, y), ensemble)
    return ensemble, objective, cn.mechanics_laws(ensemble[0], loss)


@eqx.filter_jit
def _cosines(laws, objective, model):
    return jnp.stack([cn.pointwise_check(law, objective, model) for law in laws])


def test_laws_hold_pointwise_and_translation_needs_a_softmax(getkey):
    ensemble, objective, laws = _problem(getkey())
    assert [law.name for law in laws] == ["scale[0]", "rescale[1]", "translation"]
    assert float(jnp.max(_cosines(laws, objective, ensemble[0]))) <= 1e-12
    mse = cn.make_objective(cn.MSE(), objective.data, ensemble)
    assert cn.mechanics_laws(ensemble[0], cn.MSE()) == laws[:2]
    assert float(jnp.max(_cosines(laws[:2], mse, ensemble[0]))) <= 1e-12
    assert float(_cosines(laws[2:], mse, ensemble[0])[0]) >= 1e-3  # negative control
    unnormalised = cn.MLP.random(WIDTHS, key=getkey(), activation="leaky_relu")
    assert [law.name for law in unnormalised.laws()] == ["rescale[0]", "rescale[1]"]
    assert float(_cosines((cn.ScaleLaw(0),), mse, unnormalised)[0]) >= 1e-3


@pytest.mark.parametrize("weight_decay, momentum, batch_size", [
    (0.0, 0.0, None), (0.02, 0.0, 8), (0.0, 0.9, 8), (0.02, 0.8, 16)])
def test_exact_discrete_identities_hold_to_round_off(getkey, weight_decay, momentum,
                                                      batch_size):
    ensemble, objective, laws = _problem(getkey())
    result = cn.track_mechanics(objective, ensemble, laws, lr=0.05, steps=300,
                                weight_decay=weight_decay, momentum=momentum,
                                batch_size=batch_size, key=getkey())
    errors = result.discrete_error()
    assert max(errors.values()) <= 1e-12, errors
    moved = {n: float(jnp.max(jnp.abs(v - v[:, :1]) / result.scale[n][:, None]))
             for n, v in result.simulated.items()}
    assert moved["scale[0]"] > 1e-6  # the laws really are broken: the identity is not trivial
    if weight_decay:
        assert min(moved.values()) > 1e-2


def test_without_decay_or_momentum_the_continuous_theory_is_the_simulated_law(getkey):
    """λ = 0, β = 0: GD changes a quadratic law Q(θ) = θᵀAθ by exactly η²·gᵀAg per step
    (⟨∇Q, g⟩ = 0 removes the first-order term), and the continuous theory's
    q₀ + η·∫|g|²_A dτ, its integral a sum with dτ = η, adds the same terms: it must equal the
    law evaluated on the parameters GD produced, to round-off. A linear law stays at q₀."""
    ensemble, objective, laws = _problem(getkey())
    result = cn.track_mechanics(objective, ensemble, laws, lr=0.05, steps=200)
    for name, simulated in result.simulated.items():
        scale = result.scale[name][:, None]
        np.testing.assert_allclose(result.continuous[name] / scale, simulated / scale,
                                   rtol=0, atol=1e-13, err_msg=name)  # measured ≤ 2.1e-15
    moved = float(jnp.max(jnp.abs(result.simulated["scale[0]"]
                                  - result.simulated["scale[0]"][:, :1])
                          / result.scale["scale[0]"][:, None]))
    assert moved > 1e-6  # the law moved: the comparison is not of two constants


def test_track_mechanics_follows_the_sample_path_of_train(getkey):
    # Same shapes and steps as the (0.02, 0.8, 16) identity case above: its program is reused.
    ensemble, objective, laws = _problem(getkey())
    key = getkey()
    mechanics = cn.track_mechanics(objective, ensemble, laws, lr=0.05, steps=300,
                                   weight_decay=0.02, momentum=0.8, batch_size=16, key=key)
    trained = cn.train(objective, ensemble, cn.optimizer("momentum", lr=0.05, momentum=0.8,
                                                         weight_decay=0.02),
                       300, batch_size=16, key=key, laws=laws, n_save=2)
    ours = jax.tree_util.tree_leaves(eqx.filter(mechanics.final.models, eqx.is_inexact_array))
    theirs = jax.tree_util.tree_leaves(eqx.filter(trained.final.models, eqx.is_inexact_array))
    for a, b in zip(ours, theirs, strict=True):
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(a, b)  # bit-identical: same minibatches, same arithmetic
        else:
            # Same minibatches; on GPU the two compiled programs fuse their reductions
            # differently (measured on an H100: 2e-14 relative after 300 steps), which a
            # different sample path would exceed by orders of magnitude (1.75e-5 after 50).
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert float(jnp.max(jnp.abs(mechanics.final.models.weights[0]
                                 - ensemble.models.weights[0]))) > 1e-3  # it trained


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_continuous_theory_is_first_order_in_the_learning_rate(getkey, momentum):
    ensemble, objective, laws = _problem(getkey(), size=1)
    errors = []
    for lr in (0.02, 0.01):
        result = cn.track_mechanics(objective, ensemble, laws, lr=lr, steps=round(2.0 / lr),
                                    weight_decay=0.05, momentum=momentum)
        errors.append(max(result.continuous_error().values()))
    assert errors[0] < 1e-2
    assert 1.5 < errors[0] / errors[1] < 3.0, errors  # O(η): halving η halves the error


def test_gradient_flow_keeps_the_laws(getkey):
    ensemble, objective, laws = _problem(getkey(), activation="linear")
    rtol = 1e-9
    # values="all" in both runs (λ = 0 and λ = 0.1 are two programs: the first has no λθ).
    result = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=rtol, laws=laws,
                              values="all")
    assert result.status_names() == ["success"] * 2
    assert max(float(jnp.max(d)) for d in result.max_drift.values()) <= 10 * rtol
    decayed = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=rtol, laws=laws,
                               field=cn.GradientField(weight_decay=0.1), values="all")
    # With weight decay the translation law decays exactly like e^{−λt}.
    values = decayed.values["translation"]
    expected = values[:, :1] * jnp.exp(-0.1 * decayed.t)[None, :, None]
    assert float(jnp.max(jnp.abs(values - expected))) <= 1e-7 * float(jnp.max(jnp.abs(values)))


def _flat(model):
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


@pytest.mark.parametrize("momentum, min_ratio", [(0.0, 4.0), (0.5, 2.0)])
def test_modified_flow_tracks_gradient_descent_better_than_plain_flow(getkey, momentum,
                                                                      min_ratio):
    teacher = cn.DeepLinear.random([4, 5, 3], key=getkey())
    model = cn.DeepLinear.random([4, 5, 3], key=getkey(), init_scale=0.8)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(getkey(), 32, (4,)))
    objective = cn.make_objective(cn.MSE(), data, model)
    lr, weight_decay, steps = 0.02, 0.01, 50
    kind = "momentum" if momentum else "gd"
    gd = cn.train(objective, model, cn.optimizer(kind, lr=lr, momentum=momentum,
                                                 weight_decay=weight_decay), steps, n_save=2)
    error = {}
    for name, step_lr in (("plain", 0.0), ("modified", lr)):
        field = cn.ModifiedGradientField(step_lr, momentum, weight_decay)
        flow = cn.gradient_flow(objective, model, lr * steps, solver="tsit5", rtol=1e-11,
                                field=field)
        error[name] = float(jnp.linalg.norm(_flat(flow.final[0]) - _flat(gd.final[0])))
    assert error["plain"] / error["modified"] >= min_ratio, error


TINY_MLP = """
name = "tiny_mlp"
[model]
kind = "mlp"
widths = [4, 6, 5, 3]
normalize = true
[data]
n = 32
[loss]
kind = "cross_entropy"
[ensemble]
size = 2
[[dynamics]]
kind = "sgd"
lr = 0.05
weight_decay = 0.01
batch_size = 8
steps = 100
[[dynamics]]
kind = "momentum"
lr = 0.02
momentum = 0.9
steps = 100
[[dynamics]]
kind = "modified_flow"
lr = 0.05
t1 = 0.5
rtol = 1e-6
"""


@pytest.mark.slow  # ~20 s of compiles; the identities themselves are tested above
def test_cli_writes_theory_vs_simulation(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_MLP)
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["laws"] == ["scale[0]", "rescale[1]", "translation"]
    sgd, momentum, modified = summary["runs"]
    for run in (sgd, momentum):
        assert max(run["mechanics"]["discrete_identity_error"].values()) <= 1e-12
        assert max(run["mechanics"]["continuous_theory_error"].values()) < 0.05
    assert "mechanics" not in modified and modified["status"]["success"] == 2
    assert pathlib.Path(tmp_path / "out" / "mechanics.png").stat().st_size > 10_000


THETA = cn.FunctionLaw(lambda model: _flat(model), "theta")


@pytest.fixture(scope="module")
def small_linear_problem():
    # Inputs scaled by 0.3: ‖H‖ ≈ 0.9, so η‖H‖ ≪ (1 − β)² for every η below (the asymptotic
    # regime of the modified equation; at ‖H‖ ≈ 10 the heavy ball with β = 0.5 oscillates).
    key = jax.random.PRNGKey(1234)
    k_teacher, k_model, k_x = jax.random.split(key, 3)
    teacher = cn.DeepLinear.random([4, 5, 3], key=k_teacher)
    model = cn.DeepLinear.random([4, 5, 3], key=k_model, init_scale=0.8)
    data = cn.teacher_dataset(teacher, 0.3 * cn.gaussian_inputs(k_x, 32, (4,)))
    return model, cn.make_objective(cn.MSE(), data, model)


def _order(lrs, errors):
    return float(np.polyfit(np.log(lrs), np.log(errors), 1)[0])


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_modified_flow_is_second_order_along_the_whole_window(small_linear_problem, momentum):
    """max_k |θ_k − θ(ηk)| over t ∈ [0, 5] at η = 0.04 … 0.005 against heavy-ball iterates
    written out here (v ← βv + g + λθ, θ ← θ − ηv, v₀ = 0). Plain flow is O(η); the modified
    flow started from θ₀ + δ, δ = ηβ/(1−β)² (∇L + λθ₀), and corrected by −β^k δ inside the
    initial layer, is O(η²) at every step."""
    model, objective = small_linear_problem
    weight_decay, window, lrs = 0.01, 5.0, (0.04, 0.02, 0.01, 0.005)
    theta0 = np.asarray(_flat(model))
    _, unravel = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    grad = jax.jit(lambda y: jax.grad(lambda z: objective(eqx.combine(unravel(z), static)))(y)
                   + weight_decay * y)
    errors = {"plain": [], "modified": []}
    for lr in lrs:
        steps = round(window / lr)
        theta, v, iterates = theta0.copy(), np.zeros_like(theta0), [theta0]
        for _ in range(steps):
            v = momentum * v + np.asarray(grad(theta))
            theta = theta - lr * v
            iterates.append(theta)
        iterates = np.array(iterates)
        delta = lr * momentum / (1 - momentum) ** 2 * np.asarray(grad(theta0))
        layer = momentum ** np.arange(steps + 1)[:, None] * delta
        stride = 1000 // steps  # saves every 0.005: every iterate at η = 0.005
        for name, step_lr in (("plain", 0.0), ("modified", lr)):
            field = cn.ModifiedGradientField(step_lr, momentum, weight_decay)
            flow = cn.gradient_flow(objective, model, window, n_save=1001, solver="tsit5",
                                    rtol=1e-11, laws=[THETA], values="all", field=field)
            at_steps = np.asarray(flow.values["theta"][0, ::stride])
            if name == "modified":
                at_steps = at_steps - layer
            errors[name].append(float(np.max(np.linalg.norm(at_steps - iterates, axis=1))))
    plain, modified = _order(lrs, errors["plain"]), _order(lrs, errors["modified"])
    assert 0.85 <= plain <= 1.15, errors
    assert modified >= 1.8, errors
    assert errors["modified"][-1] < 0.05 * errors["plain"][-1], errors


@pytest.mark.parametrize("gamma, omega2", [(0.5, 4.0), (2.0, 4.0), (3.0, 4.0)],
                         ids=["underdamped", "critical", "overdamped"])
def test_oscillator_response_and_green_function_solve_the_ode(gamma, omega2):
    """The momentum theory's oscillator x'' + 2γx' + ω²x = f: χ is the solution from
    (x, x') = (1, 0) and G from (0, 1) (the impulse response), each regime against scipy's
    DOP853 at rtol 1e-12. Two-sided: a wrong factor in any branch moves them by O(1)."""
    from scipy.integrate import solve_ivp

    from conservation._dynamics.mechanics import _oscillator

    chi, green = _oscillator(gamma, omega2)
    t = np.linspace(0.0, 4.0, 41)

    def solve(x0, v0):
        return solve_ivp(lambda _, y: [y[1], -2 * gamma * y[1] - omega2 * y[0]], (0.0, 4.0),
                         [x0, v0], method="DOP853", t_eval=t, rtol=1e-12, atol=1e-14).y[0]

    np.testing.assert_allclose(chi(t), solve(1.0, 0.0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(green(t), solve(0.0, 1.0), rtol=0, atol=1e-10)
