"""Long runs that survive: members stop on a loss goal (`stop_at_loss`, a diffrax event in
flows), and a flow or discrete run continues from its last saved state (`resume`).

References are independent of the library: a linear least-squares model, whose gradient flow
W(t) = W* + (W₀ − W*) expm(−2St) and gradient-descent recursion are written in numpy/scipy.
"""

import dataclasses

import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl
import scipy.optimize as so

import conservation as cn

RNG = np.random.default_rng(0)
N = 16
X = RNG.normal(size=(N, 3))
Y = RNG.normal(size=(N, 2))
S = X.T @ X / N  # L(W) = mean ‖Wx − y‖² = tr(WSWᵀ) − 2tr(WBᵀ) + c, ∇L = 2(WS − B)
B = Y.T @ X / N
W_STAR = B @ np.linalg.inv(S)
L_MIN = np.mean(np.sum(Y**2, axis=1)) - np.trace(W_STAR @ S @ W_STAR.T)
# Member 0 reaches the goal at t* ≈ 1.59 < T1; member 1 starts far out and does not reach it
# by T1; member 2 starts below it (0 steps).
STARTS = [W_STAR + RNG.normal(size=(2, 3)), W_STAR + 30 * RNG.normal(size=(2, 3)),
          W_STAR + 1e-3 * RNG.normal(size=(2, 3))]
GOAL = L_MIN + 0.05
T1 = 4.0


def _loss(w):
    d = w - W_STAR
    return L_MIN + np.trace(d @ S @ d.T)


def _w_flow(w0, t):
    return W_STAR + (w0 - W_STAR) @ sl.expm(-2 * S * t)


@pytest.fixture(scope="module")
def least_squares():
    ensemble = cn.Ensemble.stack([cn.DeepLinear([jnp.asarray(w)]) for w in STARTS])
    objective = cn.make_objective(cn.MSE(), cn.Dataset(jnp.asarray(X), jnp.asarray(Y)),
                                  ensemble)
    return ensemble, objective


def _weights(ensemble):
    return np.asarray(jax.tree_util.tree_leaves(ensemble.models)[0])


# Both loops: one member at a time (diffrax's own event and root find, ~6 s) and the lanes
# (the CPU default), which locate the crossing themselves; each decides the statuses in its
# own code.
@pytest.mark.parametrize("batch_size", [1, 2], ids=["one-at-a-time", "lanes"])
def test_flow_stops_each_member_where_its_loss_crosses_the_goal(least_squares, batch_size):
    """Before: no `stop_at_loss`. Now member 0 stops at the closed-form crossing time t*
    (L(t*) = L*) with the closed-form state there, member 1 (too far out) runs to t1, and
    member 2 (below the goal at its start) takes 0 steps."""
    ensemble, objective = least_squares
    result = cn.gradient_flow(objective, ensemble, T1, solver="tsit5", rtol=1e-10, n_save=5,
                              batch_size=batch_size, stop_at_loss=GOAL)
    assert result.status_names() == ["reached_loss", "success", "reached_loss"]
    t_star = so.brentq(lambda t: _loss(_w_flow(STARTS[0], t)) - GOAL, 0.0, T1, xtol=1e-14)
    assert 0 < t_star < T1 and _loss(_w_flow(STARTS[1], T1)) > GOAL
    t_final = np.asarray(result.t_final)
    assert abs(t_final[0] - t_star) < 1e-8, (t_final[0], t_star)
    np.testing.assert_allclose(_weights(result.final)[0], _w_flow(STARTS[0], t_star),
                               rtol=0, atol=1e-8)
    np.testing.assert_allclose(_weights(result.final)[1], _w_flow(STARTS[1], T1), rtol=1e-8)
    assert t_final[1] == T1 and t_final[2] == 0.0
    assert int(result.num_steps[2]) == 0 and int(result.num_steps[0]) > 0
    np.testing.assert_array_equal(_weights(result.final)[2], STARTS[2])
    # Saves: up to the stop, as the closed form; `inf` after it; the start of member 2.
    loss = np.asarray(result.loss)
    ts = np.asarray(result.t)
    before = ts <= t_star
    np.testing.assert_allclose(loss[0, before], [_loss(_w_flow(STARTS[0], t))
                                                 for t in ts[before]], rtol=1e-8)
    assert np.all(np.isinf(loss[0, ~before]))
    assert loss[2, 0] == pytest.approx(_loss(STARTS[2]), rel=1e-12)
    assert np.all(np.isinf(loss[2, 1:]))


def _deep_linear_data():
    k1, k2, _ = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random((3, 4, 2), key=k1)
    return cn.teacher_dataset(teacher, cn.gaussian_inputs(k2, 16, (3,)))


@pytest.fixture(scope="module")
def deep_linear():
    k3 = jax.random.split(jax.random.PRNGKey(0), 3)[2]
    widths = (3, 4, 2)
    data = _deep_linear_data()
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random(widths, key=k, init_scale=0.6), k3, 2)
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble)


def test_resumed_flow_continues_from_its_last_state_with_drifts_from_theta0(deep_linear):
    """0 → 4 in one flow against 0 → 2 resumed to 4: the resumed run restarts the solver at
    t = 2 (other steps), so the final parameters agree to the solver tolerance (rtol 1e-10:
    within 1e-8), and its drifts are still measured from the original θ₀ (measured from the
    resumed start they would be ~0 at t = 2)."""
    ensemble, objective = deep_linear
    kwargs = dict(solver="tsit5", rtol=1e-10, batch_size=2, resumable=True)
    # One compiled program for the first two (t1 is traced), one for the resumed part.
    whole = cn.gradient_flow(objective, ensemble, 4.0, n_save=3, **kwargs)  # t = 0, 2, 4
    first = cn.gradient_flow(objective, ensemble, 2.0, n_save=3, **kwargs)  # t = 0, 1, 2
    both = cn.gradient_flow(objective, first.final, 4.0, n_save=3, resume=first, **kwargs)
    np.testing.assert_allclose(both.t, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert both.status_names() == whole.status_names() == ["success", "success"]
    a, b = (jfu.ravel_pytree(r.final.models)[0] for r in (whole, both))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-8)
    np.testing.assert_allclose(both.loss[:, ::2], whole.loss, rtol=1e-8)
    for name in whole.drift:
        drift = np.asarray(whole.drift[name])
        assert np.all(drift[:, -1] > 1e-13)  # a drift to compare
        np.testing.assert_allclose(both.drift[name][:, ::2], drift, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(both.drift[name][:, :3], first.drift[name])
        np.testing.assert_allclose(both.max_drift[name], whole.max_drift[name], atol=1e-9)
    assert np.all(np.asarray(both.num_steps) > np.asarray(first.num_steps))
    # The resumed Result carries θ₀'s references on, so that it can be resumed again with the
    # drifts still measured from θ₀: the same arrays as the one run's.
    ref_whole, ref_both = (jax.tree.leaves(r.reference) for r in (whole, both))
    assert len(ref_both) == len(ref_whole) > 0
    for got, want in zip(ref_both, ref_whole):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(cn.ArgumentError, match="t1"):
        cn.gradient_flow(objective, first.final, 2.0, resume=first, **kwargs)
    with pytest.raises(cn.ArgumentError, match="model"):
        cn.gradient_flow(objective, ensemble, 4.0, resume=first, **kwargs)
    # A run without `resumable=True` keeps nothing law-sized for it, and says so.
    plain = dataclasses.replace(first, reference=None)
    with pytest.raises(cn.ArgumentError, match="resumable=True"):
        cn.gradient_flow(objective, plain.final, 4.0, resume=plain, **kwargs)


def _gd_path(w0, lr, steps):
    """Gradient descent W ← W − η·2(WS − B) in numpy: the iterates W_0 … W_steps."""
    path = [w0]
    for _ in range(steps):
        path.append(path[-1] - lr * 2 * (path[-1] @ S - B))
    return path


def test_train_stops_at_the_first_step_whose_loss_reaches_the_goal(least_squares):
    """Before: no `stop_at_loss`. Now each member stops at the first k with L(W_k) ≤ L*
    (numpy recursion): `final` = W_k, `num_steps` = k; one that never gets there takes every
    step; one that starts there takes none."""
    ensemble, objective = least_squares
    lr, steps = 0.05, 40
    result = cn.train(objective, ensemble, cn.optimizer("gd", lr=lr), steps, n_save=5,
                      stop_at_loss=GOAL)
    paths = [_gd_path(w, lr, steps) for w in STARTS]
    first = [next((k for k, w in enumerate(p) if _loss(w) <= GOAL), None) for p in paths]
    assert first[0] is not None and 0 < first[0] < steps and first[1] is None and first[2] == 0
    assert result.status_names() == ["reached_loss", "success", "reached_loss"]
    np.testing.assert_array_equal(result.num_steps, [first[0], steps, 0])
    expected = np.stack([paths[0][first[0]], paths[1][-1], paths[2][0]])
    np.testing.assert_allclose(_weights(result.final), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(cn.ArgumentError, match="stop_at_loss"):
        cn.train(objective, ensemble, cn.optimizer("gd", lr=lr), steps, stop_at_loss=0.0)
    with pytest.raises(cn.ArgumentError, match="stop_at_loss"):
        cn.gradient_flow(objective, ensemble, 1.0, stop_at_loss=float("nan"))


def test_resumed_training_is_bit_identical_to_one_run(deep_linear):
    """0 → 10 steps against 0 → 4 resumed to 10 (heavy ball on minibatches: the optimizer's
    velocity, the step count and the PRNG keys carry over): the same steps, so the same
    parameters, optimizer state, saves and drifts bit for bit."""
    ensemble, objective = deep_linear
    key = jax.random.PRNGKey(1)

    def optim():  # made anew each time, as a research loop does
        return cn.optimizer("momentum", lr=0.05, momentum=0.9)

    kwargs = dict(batch_size=8, key=key, resumable=True)
    whole = cn.train(objective, ensemble, optim(), 10, n_save=6, **kwargs)  # 2 steps a save
    first = cn.train(objective, ensemble, optim(), 4, n_save=3, **kwargs)
    both = cn.train(objective, first.final, optim(), 10, n_save=4, resume=first, **kwargs)
    np.testing.assert_array_equal(both.t, whole.t)
    np.testing.assert_array_equal(both.num_steps, [10, 10])
    for a, b in zip(jax.tree_util.tree_leaves((whole.final.models, whole.train_state,
                                               whole.loss, whole.drift, whole.max_drift)),
                    jax.tree_util.tree_leaves((both.final.models, both.train_state,
                                               both.loss, both.drift, both.max_drift))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(cn.ArgumentError, match="steps"):
        cn.train(objective, first.final, optim(), 4, resume=first, **kwargs)


def test_config_takes_a_loss_goal_and_passes_it_on(monkeypatch):
    """`[[dynamics]] stop_at_loss` is checked (> 0, finite) and reaches `train`/`gradient_flow`."""
    import math

    from conservation._experiments import runner
    from conservation._experiments.config import ConfigError, parse_config

    def raw(**extra):
        return {"name": "goal", "model": {"kind": "deep_linear", "widths": [3, 4, 2]},
                "data": {"n": 8}, "dynamics": [{"kind": "gd", "lr": 0.1, "steps": 3} | extra]}

    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError, match="dynamics\\[0\\].stop_at_loss"):
            parse_config(raw(stop_at_loss=bad))
    run = parse_config(raw(stop_at_loss=1e-3)).dynamics[0]
    assert parse_config(raw()).dynamics[0].stop_at_loss is None
    seen = {}
    monkeypatch.setattr(runner, "train", lambda *a, **k: seen.update(k))
    runner.execute(run, None, None, key=None, progress=False)
    assert seen["stop_at_loss"] == 1e-3


def test_resumed_training_keeps_stopped_members_and_continues_the_others(deep_linear):
    """A member that reached its loss goal or diverged before the stop keeps its status, step
    count and parameters through `resume`; a running one goes on to its own goal, and one
    whose loss had risen 10× (`loss_increased` is a verdict on the end point, not a stop)
    goes on too. The resumed run equals one run of all 10 steps bit for bit (statuses from
    the loss curves: GD at lr 0.05 crosses 0.5 after 4 steps for member 0 and 8 for member 1;
    member 2 is NaN from the start; member 3, member 1 scaled 5.5×, is at 1e8 × its start
    loss after 6 steps and overflows at the 7th)."""
    ensemble, _ = deep_linear
    nan = jax.tree.map(lambda a: a * jnp.nan, ensemble[0])
    steep = jax.tree.map(lambda a: a * 5.5, ensemble[1])
    members = cn.Ensemble.stack([ensemble[0], ensemble[1], nan, steep])
    objective = cn.make_objective(cn.MSE(), _deep_linear_data(), members)
    kwargs = dict(resumable=True, stop_at_loss=0.5)
    whole = cn.train(objective, members, cn.optimizer("gd", lr=0.05), 10, n_save=6, **kwargs)
    first = cn.train(objective, members, cn.optimizer("gd", lr=0.05), 6, n_save=4, **kwargs)
    assert first.status_names() == ["reached_loss", "success", "diverged", "loss_increased"]
    np.testing.assert_array_equal(first.num_steps, [4, 6, 0, 6])
    both = cn.train(objective, first.final, cn.optimizer("gd", lr=0.05), 10, n_save=3,
                    resume=first, **kwargs)
    assert both.status_names() == ["reached_loss", "reached_loss", "diverged", "diverged"]
    assert whole.status_names() == both.status_names()
    np.testing.assert_array_equal(both.num_steps, whole.num_steps)
    np.testing.assert_array_equal(both.num_steps[:3], [4, 8, 0])
    for a, b, c in zip(jax.tree_util.tree_leaves(whole.final.models),
                       jax.tree_util.tree_leaves(both.final.models),
                       jax.tree_util.tree_leaves(first.final.models)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b[0], c[0])  # member 0 did not move after its goal


def test_a_resumed_flow_reports_the_statuses_of_its_continuation(least_squares):
    """0 → 1 then resumed to t1 = 4 with a loss goal: member 0 crosses the goal at the closed-form
    t* ≈ 1.59, inside the continuation, and says `reached_loss` there (its stop, not the
    first part's `success`); member 1 runs to t1 (`success`); member 2 was below the goal at
    its start and keeps its 0 steps."""
    ensemble, objective = least_squares
    kwargs = dict(solver="tsit5", rtol=1e-10, batch_size=2, resumable=True, stop_at_loss=GOAL)
    first = cn.gradient_flow(objective, ensemble, 1.0, n_save=2, **kwargs)
    assert first.status_names() == ["success", "success", "reached_loss"]
    both = cn.gradient_flow(objective, first.final, T1, n_save=3, resume=first, **kwargs)
    assert both.status_names() == ["reached_loss", "success", "reached_loss"]
    t_star = so.brentq(lambda t: _loss(_w_flow(STARTS[0], t)) - GOAL, 0.0, T1, xtol=1e-14)
    assert abs(float(both.t_final[0]) - t_star) < 1e-8
    assert float(both.t_final[1]) == T1 and int(both.num_steps[2]) == 0


def test_a_member_starting_just_above_its_goal_runs_to_the_crossing(least_squares):
    """A start 1 % of the way above the goal (in loss above the minimum) is not at the goal:
    the member takes steps and stops at the closed-form crossing time, which is early but not
    0 (the lanes decide "starts at its goal" themselves)."""
    ensemble, objective = least_squares
    goal = _loss(STARTS[0]) - 0.01 * (_loss(STARTS[0]) - L_MIN)
    result = cn.gradient_flow(objective, ensemble, T1, solver="tsit5", rtol=1e-10, n_save=5,
                              batch_size=2, stop_at_loss=goal)
    assert result.status_names() == ["reached_loss", "reached_loss", "reached_loss"]
    t_star = so.brentq(lambda t: _loss(_w_flow(STARTS[0], t)) - goal, 0.0, T1, xtol=1e-14)
    assert 0 < t_star < 0.1
    assert abs(float(result.t_final[0]) - t_star) < 1e-8
    assert int(result.num_steps[0]) > 0 and int(result.num_steps[2]) == 0
