"""Gradient flow: laws conserved to tolerance, closed forms matched, statuses reported."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

WIDTHS = (6, 8, 8, 3)


@pytest.fixture(scope="module")
def linear_problem():
    key = jax.random.PRNGKey(0)
    k_teacher, k_x, k_models = jax.random.split(key, 3)
    teacher = cn.DeepLinear.random(WIDTHS, key=k_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, 64, (WIDTHS[0],)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random(WIDTHS, key=k, init_scale=0.6), k_models, 4)
    return ensemble, cn.make_objective(cn.MSE(), data, ensemble)


def test_balance_laws_drift_within_tolerance_and_shrink_with_it(linear_problem):
    ensemble, objective = linear_problem
    worst = []
    for rtol in (1e-6, 1e-7, 1e-8, 1e-9, 1e-10):
        result = cn.gradient_flow(objective, ensemble, 50.0, solver="tsit5", rtol=rtol, n_save=51)
        assert result.status_names() == ["success"] * 4
        # What ran is recorded: the solver, and the CPU default of 4 lanes (4 members).
        assert (result.solver, result.batch_size) == ("tsit5", 4)
        drift = max(float(jnp.max(d)) for d in result.max_drift.values())
        assert drift <= 10 * rtol, (rtol, drift)
        worst.append(drift)
        assert float(jnp.max(result.loss[:, -1])) < 1e-6 * float(jnp.min(result.loss[:, 0]))
    assert all(b < a for a, b in zip(worst, worst[1:])), worst


@pytest.mark.slow  # end-to-end; keeps the default suite under 10 min on 2 cores
def test_ensemble_members_equal_individual_runs(linear_problem):
    ensemble, objective = linear_problem
    together = cn.gradient_flow(objective, ensemble, 5.0, rtol=1e-9, n_save=11,
                                values=("balance[1]",))
    for i in (0, 3):
        alone = cn.gradient_flow(objective, ensemble[i], 5.0, rtol=1e-9, n_save=11,
                                 values=("balance[1]",))
        np.testing.assert_allclose(alone.loss[0], together.loss[i], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(alone.values["balance[1]"][0],
                                   together.values["balance[1]"][i], rtol=1e-12, atol=1e-14)
        assert int(alone.num_steps[0]) == int(together.num_steps[i])
    # Vmapped (lockstep) batches keep per-member step control: same numbers as sequential.
    for batch_size in (3, 4):
        batched = cn.gradient_flow(objective, ensemble, 5.0, rtol=1e-9, n_save=11,
                                   batch_size=batch_size)
        np.testing.assert_allclose(batched.loss, together.loss, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(batched.num_steps, together.num_steps)


def test_saxe_closed_form_is_matched(getkey):
    """2-layer linear net, whitened inputs, balanced decoupled init: each mode follows
    u(t) = s e^{4st} / (e^{4st} − 1 + s/u₀) (τ = 1/2 for the un-halved MSE)."""
    d, h, m = 5, 3, 3
    x = cn.whiten(jax.random.normal(getkey(), (40, d)))
    target_map = jax.random.normal(getkey(), (m, d))
    data = cn.Dataset(x, x @ target_map.T)  # Σ_yx = target_map since xᵀx/n = I
    u, s, vt = jnp.linalg.svd(target_map, full_matrices=False)
    rotation, _ = jnp.linalg.qr(jax.random.normal(getkey(), (h, h)))
    a0 = jnp.array([0.05, 0.2, 0.6])
    model = cn.DeepLinear([rotation @ jnp.diag(a0) @ vt, u @ jnp.diag(a0) @ rotation.T])
    objective = cn.make_objective(cn.MSE(), data, model)
    end_to_end = cn.FunctionLaw(lambda net: net.end_to_end(), "end_to_end")
    result = cn.gradient_flow(objective, model, 3.0, solver="dopri8", rtol=1e-12, atol=1e-12,
                              n_save=31, laws=[end_to_end], values="all")
    modes = cn.saxe_balanced_mode(s[None, :], a0[None, :] ** 2, result.t[:, None])
    predicted = jnp.einsum("ma,ta,ad->tmd", u, modes, vt)
    assert float(jnp.max(jnp.abs(result.values["end_to_end"][0] - predicted))) <= 1e-8
    # The run covers the whole sigmoidal transition of the weakest mode.
    assert float(modes[-1, 0]) > 0.9 * float(s[0])


def test_polynomial_rescale_law_conserved_along_flow(getkey):
    widths = (3, 5, 2)
    teacher = cn.PolynomialNet.random(widths, key=getkey())
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(getkey(), 50, (3,)))
    ensemble = cn.Ensemble.init(lambda k: cn.PolynomialNet.random(widths, key=k), getkey(), 3)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    rtol = 1e-9
    result = cn.gradient_flow(objective, ensemble, 10.0, solver="tsit5", rtol=rtol)
    assert result.status_names() == ["success"] * 3
    assert float(jnp.max(result.max_drift["rescale[0]"])) <= 10 * rtol
    # The law is not trivially constant: the weights moved by O(1).
    moved = result.final.models.weights[0] - ensemble.models.weights[0]
    assert float(jnp.max(jnp.abs(moved))) > 0.1


# LogCosh is slow (~18 s), to keep the default suite under 10 min on 2 cores.
@pytest.mark.parametrize("loss", [cn.MSE(), pytest.param(cn.LogCosh(), marks=pytest.mark.slow)])
def test_attention_laws_conserved_along_flow(getkey, loss):
    def make(key):
        return cn.LightningAttention.random(4, key=key, heads=2, key_dim=2, value_dim=2,
                                            out_dim=1, decay=0.9)

    teacher = make(getkey())
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(getkey(), 24, (5, 4)))
    ensemble = cn.Ensemble.init(make, getkey(), 2)
    objective = cn.make_objective(loss, data, ensemble)
    rtol = 1e-9
    result = cn.gradient_flow(objective, ensemble, 4.0, solver="tsit5", rtol=rtol)
    assert result.status_names() == ["success"] * 2
    for name, drift in result.max_drift.items():
        assert float(jnp.max(drift)) <= 10 * rtol, name
    assert float(jnp.max(result.loss[:, -1] / result.loss[:, 0])) < 0.9  # it actually trained


def test_exhausted_member_is_reported_others_keep_results(linear_problem):
    ensemble, objective = linear_problem
    # Member 2 starts 40× larger: its flow is stiff and needs far more steps than the others.
    big = cn.DeepLinear([40.0 * w for w in ensemble[2].weights])
    mixed = cn.Ensemble.stack([ensemble[0], ensemble[1], big, ensemble[3]])
    # A named solver: "auto" would probe each ensemble (tested in test_solvers).
    reference = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=1e-8, n_save=11)
    limit = int(jnp.max(reference.num_steps)) + 20
    with pytest.warns(UserWarning, match="1 member.*max_steps"):
        result = cn.gradient_flow(objective, mixed, 5.0, solver="tsit5", rtol=1e-8, n_save=11,
                                  max_steps=limit)
    assert result.status_names() == ["success", "success", "max_steps", "success"]
    for i in (0, 1, 3):
        np.testing.assert_allclose(result.loss[i], reference.loss[i], rtol=1e-12)
    # Member 2 ran out of steps before the first save after t = 0: that save carries its true
    # loss (numpy), every later one is inf — marked, not faked, nor frozen at a last value —
    # and its final state is the real point where it stopped (finite, lower loss).
    x, y = np.asarray(objective.data.x), np.asarray(objective.data.y)

    def numpy_loss(weights):
        w1, w2, w3 = (np.asarray(w) for w in weights)
        return np.mean(np.sum((x @ (w3 @ w2 @ w1).T - y) ** 2, axis=1))

    stuck = np.asarray(result.loss[2])
    assert int(np.sum(np.isfinite(stuck))) == 1
    np.testing.assert_allclose(stuck[0], numpy_loss(big.weights), rtol=1e-12)
    assert numpy_loss(result.final[2].weights) < 1e-3 * stuck[0]
    assert np.all(np.isposinf(stuck[1:]))


@pytest.fixture(scope="module")
def mixed_members(linear_problem):
    """Five members: two that succeed, one that runs out of steps (40× larger: stiff), one
    that starts diverged (norm > the 1e8 threshold), one more that succeeds; integrated one
    at a time, each in its own diffrax solve (`batch_size=1`; the CPU default is 2 lanes, which
    made this reference the lanes it checks)."""
    ensemble, objective = linear_problem
    big = cn.DeepLinear([40.0 * w for w in ensemble[2].weights])
    blown = cn.DeepLinear([1e9 * w for w in ensemble[1].weights])
    mixed = cn.Ensemble.stack([ensemble[0], big, blown, ensemble[1], ensemble[3]])
    limit = 150
    with pytest.warns(UserWarning, match="max_steps"):
        sequential = cn.gradient_flow(objective, mixed, 5.0, solver="tsit5", rtol=1e-8,
                                      n_save=11, max_steps=limit, values=("balance[1]",),
                                      batch_size=1)
    assert sequential.batch_size == 1
    return mixed, objective, limit, sequential


def test_lanes_take_each_members_own_steps(mixed_members):
    """`batch_size=2` on 5 members: two lanes stepping together, each refilled with the next
    member as its member finishes (whatever its status): every member's steps, saves, final
    parameters and status equal its own diffrax solve."""
    mixed, objective, limit, sequential = mixed_members
    assert sequential.status_names() == ["success", "max_steps", "diverged", "success",
                                         "success"]
    assert int(sequential.num_steps[2]) == 0 and int(sequential.num_steps[1]) == limit
    with pytest.warns(UserWarning, match="max_steps"):
        lanes = cn.gradient_flow(objective, mixed, 5.0, solver="tsit5", rtol=1e-8, n_save=11,
                                 max_steps=limit, values=("balance[1]",), batch_size=2)
    assert lanes.status_names() == sequential.status_names()
    np.testing.assert_array_equal(lanes.num_steps, sequential.num_steps)
    # Save times a member never reached are inf in both, the rest equal to round-off.
    np.testing.assert_array_equal(np.isinf(lanes.loss), np.isinf(sequential.loss))
    assert np.isinf(lanes.loss[2]).all() and np.isinf(lanes.loss[1, -1])
    np.testing.assert_allclose(lanes.loss, sequential.loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(lanes.values["balance[1]"], sequential.values["balance[1]"],
                               rtol=1e-12, atol=1e-14)
    for name in sequential.drift:
        np.testing.assert_allclose(lanes.drift[name], sequential.drift[name], rtol=1e-9,
                                   atol=1e-15)
    # Lanes vmap the gradient (batched products sum in another order): round-off apart,
    # except in the stiff member, whose Tsit5 steps sit at the stability limit, where the
    # error estimate amplifies a rounding difference up to the step tolerance (3e-9 here).
    for a, b in zip(jax.tree_util.tree_leaves(lanes.final.models),
                    jax.tree_util.tree_leaves(sequential.final.models)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(np.delete(a, 1, 0), np.delete(b, 1, 0), rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=10 * 1e-8 * np.abs(b[1]).max())


def _numpy_flow(weights, x, y, ts):
    """Gradient flow of mean_i ‖W3 W2 W1 x_i − y_i‖² at the times `ts`, integrated by scipy
    (DOP853, rtol 1e-11) with the gradients by hand: (parameter norms, losses)."""
    from scipy.integrate import solve_ivp

    shapes = [w.shape for w in weights]
    splits = np.cumsum([np.prod(s) for s in shapes])[:-1]

    def unflat(theta):
        return [a.reshape(s) for a, s in zip(np.split(theta, splits), shapes)]

    def field(t, theta):
        w1, w2, w3 = unflat(theta)
        g = 2.0 / len(x) * (x @ (w3 @ w2 @ w1).T - y).T @ x  # dL/dP, P = W3 W2 W1
        return -np.concatenate([((w3 @ w2).T @ g).ravel(), (w3.T @ g @ w1.T).ravel(),
                                (g @ (w2 @ w1).T).ravel()])

    theta0 = np.concatenate([np.ravel(w) for w in weights])
    sol = solve_ivp(field, (ts[0], ts[-1]), theta0, method="DOP853", t_eval=ts, rtol=1e-11,
                    atol=1e-12)
    losses = [np.mean(np.sum((x @ (w3 @ w2 @ w1).T - y) ** 2, axis=1))
              for w1, w2, w3 in map(unflat, sol.y.T)]
    return np.linalg.norm(sol.y, axis=0), np.asarray(losses)


def test_divergence_threshold_stops_exactly_the_members_that_cross_it(linear_problem):
    """The flows integrated independently (scipy) say which members' parameter norms cross a
    threshold set between two members' peaks, and at which save; with that threshold exactly
    those are `diverged`, their losses equal the flow's until the crossing and are inf after
    it, and the other members run to t1 untouched."""
    ensemble, objective = linear_problem
    x, y = np.asarray(objective.data.x), np.asarray(objective.data.y)
    ts = np.linspace(0.0, 5.0, 51)  # the save times of n_save=51
    flows = [_numpy_flow([np.asarray(w) for w in ensemble[i].weights], x, y, ts)
             for i in range(4)]
    peaks = np.array([norms.max() for norms, _ in flows])
    ranked = np.sort(peaks)
    threshold = 0.5 * (ranked[1] + ranked[2])
    assert ranked[2] > 1.002 * threshold and ranked[1] < 0.998 * threshold  # clear of it
    result = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=1e-8, n_save=51,
                              divergence=threshold)
    crosses = peaks > threshold
    assert result.status_names() == ["diverged" if c else "success" for c in crosses]
    loss = np.asarray(result.loss)
    for i, (norms, want) in enumerate(flows):
        if not crosses[i]:
            np.testing.assert_allclose(loss[i], want, rtol=1e-6)
            continue
        k = int(np.argmax(norms > threshold))  # the first save past the threshold
        np.testing.assert_allclose(loss[i, :k], want[:k], rtol=1e-6)
        assert np.all(np.isinf(loss[i, k + 1:])) and k + 1 < loss.shape[1]
        final = np.sqrt(sum(float(jnp.sum(w**2)) for w in result.final[i].weights))
        assert final > threshold  # it stopped past the threshold, not before


def test_flow_argument_errors(linear_problem):
    ensemble, objective = linear_problem
    with pytest.raises(ValueError, match="rtol"):
        cn.gradient_flow(objective, ensemble, 1.0, rtol=-1e-8)
    with pytest.raises(ValueError, match="t1"):
        cn.gradient_flow(objective, ensemble, 0.0)
    with pytest.raises(ValueError, match="solver"):
        cn.gradient_flow(objective, ensemble, 1.0, solver="rk4")
    with pytest.raises(ValueError, match="`solver` Euler gives no error estimate"):
        cn.gradient_flow(objective, ensemble, 1.0, solver=diffrax.Euler())
    with pytest.raises(ValueError, match="batch_size"):
        cn.gradient_flow(objective, ensemble, 1.0, batch_size=0)
    with pytest.raises(TypeError, match="make_objective"):
        cn.gradient_flow(lambda m: 0.0, ensemble, 1.0)
    with pytest.raises(TypeError, match="model"):
        cn.gradient_flow(objective, [1.0], 1.0)


def test_monitor_memory_scales_with_members_saves_laws_not_law_size():
    """The issue's H100 case (DLN 128-256-256-32, P = 106 k, n = 4096, 256 members): stored
    monitors are B·T scalars per law by default; only `values="all"` holds B·T·256² per law.
    `eval_shape` traces the whole run without allocating it."""
    widths, size, n_save = (128, 256, 256, 32), 256, 101
    k_teacher, k_x, k_model = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = cn.DeepLinear.random(widths, key=k_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, 4096, (widths[0],)))
    objective = cn.make_objective(cn.MSE(), data, teacher)
    ensemble = eqx.filter_eval_shape(
        cn.Ensemble.init, lambda k: cn.DeepLinear.random(widths, key=k), k_model, size)
    parameters = sum(a * b for a, b in zip(widths, widths[1:]))
    assert parameters == 106_496

    def stored(values):
        return eqx.filter_eval_shape(lambda e: cn.gradient_flow(
            objective, e, 1.0, n_save=n_save, batch_size=size, values=values,
            solver="tsit5"), ensemble)  # "auto" probes concrete values: name the solver

    result = stored("final")
    laws = ("balance[0]", "balance[1]")
    assert tuple(result.drift) == laws and result.values == {}
    for name in laws:
        for monitor in (result.drift, result.condition):
            assert monitor[name].shape == (size, n_save)
        assert result.max_drift[name].shape == (size,)
        assert result.final_values[name].shape == (size, 256, 256)
    per_save = sum(x.size for x in jax.tree_util.tree_leaves(
        (result.t, result.loss, result.drift, result.condition)))
    assert per_save == n_save + size * n_save * (1 + 2 * len(laws))
    everything = sum(x.size for x in jax.tree_util.tree_leaves(result))
    # per-save scalars + final parameters + final law values (+ per-member scalars)
    assert everything == (per_save + size * parameters + size * len(laws) * 256**2
                          + size * (2 + len(laws)))


def test_values_modes_keep_the_same_drifts(linear_problem):
    # Same programs as test_ensemble_members_equal_individual_runs / test_exhausted_member_...
    ensemble, objective = linear_problem
    kept = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=1e-9, n_save=11,
                            values=("balance[1]",))
    lean = cn.gradient_flow(objective, ensemble, 5.0, solver="tsit5", rtol=1e-9, n_save=11)
    assert set(kept.values) == {"balance[1]"} and lean.values == {}
    w = kept.final.models.weights
    for name, drift in kept.drift.items():
        np.testing.assert_array_equal(lean.drift[name], drift)
        layer = int(name[-2])
        gram = (jnp.einsum("bji,bjk->bik", w[layer + 1], w[layer + 1])
                - jnp.einsum("bij,bkj->bik", w[layer], w[layer]))
        np.testing.assert_allclose(lean.final_values[name], gram, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(kept.values["balance[1]"][:, -1], lean.final_values["balance[1]"],
                               rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="values"):
        cn.gradient_flow(objective, ensemble, 1.0, values=("nope",))


@pytest.mark.slow  # compiles the progress variant of the solve (~10 s)
def test_one_progress_bar_per_ensemble_flow(linear_problem, capsys):
    ensemble, objective = linear_problem
    cn.gradient_flow(objective, ensemble, 5.0, rtol=1e-8, n_save=11)  # not a TTY: no bar
    assert capsys.readouterr().err == ""
    result = cn.gradient_flow(objective, ensemble, 5.0, rtol=1e-8, n_save=11, progress=True,
                              batch_size=3)
    err = capsys.readouterr().err
    assert result.status_names() == ["success"] * 4
    assert err.count("\n") == 1, err  # one bar, closed once (not one per member)
    final = err.rstrip().split("\r")[-1]  # the bar as it was left, after its last redraw
    assert final.endswith("]") and final.startswith("flow: t=5/5, members 4/4 |"), err


def test_progress_bar_shows_the_slowest_running_members_time(capsys):
    """The host side of the bar, without compiling a flow (the slow test above runs it
    whole): its time is that of the member furthest behind among those still running, its
    count the members finished, its fill their summed progress."""
    from conservation._dynamics.flow import _FlowBar

    with _FlowBar(4, 5.0, show=True) as bar:
        _FlowBar.update(np.array([0, 1, 2]), np.array([0.2, 0.6, 0.9]),
                        np.array([False, False, True]))
        assert bar.bar.desc == "flow: t=0/5, members 1/4"  # member 3 has not started
        assert bar.bar.n == pytest.approx(0.2 + 0.6 + 1.0)
        _FlowBar.update(np.array([3]), np.array([0.8]), np.array([False]))
        assert bar.bar.desc == "flow: t=1/5, members 1/4"  # min(0.2, 0.6, 0.8)·5
        _FlowBar.update(np.array([0]), np.array([0.7]), np.array([False]))
        assert bar.bar.desc == "flow: t=3/5, members 1/4"  # now member 1 is furthest behind
        _FlowBar.update(np.array([0, 1, 3]), np.array([1.0, 1.0, 1.0]),
                        np.array([True, True, True]))
        assert bar.bar.desc == "flow: t=5/5, members 4/4" and bar.bar.n == pytest.approx(4.0)
    assert _FlowBar.active is None
    capsys.readouterr()


def _refill_schedule(steps, lanes):
    """Loop iterations of `lanes` lanes taking members in order, each lane loading the next
    member in the iteration after its member's last step (list scheduling, simulated)."""
    free = [0] * lanes  # iteration from which each lane is free
    for s in steps:
        lane = min(range(lanes), key=lambda i: (free[i], i))
        free[lane] += int(s)
    return max(free)


def test_lanes_are_refilled_as_members_finish():
    """Members of very different difficulty (decay rates 0.5…60 on one linear field): lanes
    take the next member as soon as theirs finishes, so the loop runs exactly the list
    schedule of the members' step counts, well under a lockstep of fixed chunks."""
    from conservation._dynamics.lockstep import solve_lanes
    from conservation._dynamics.unrolled import Tsit5

    rates = jnp.asarray([60.0, 0.5, 1.0, 30.0, 2.0, 4.0, 0.5])
    y0 = jnp.diag(jnp.ones(7))  # member i decays at rates[i]
    ts = jnp.linspace(0.0, 5.0, 6)

    @jax.jit
    def run(y0):
        return {lanes: solve_lanes(
            lambda y: -rates * y, Tsit5(), cn.step_size_controller(Tsit5(), 1e-8, 1e-8),
            lambda row: (row, None), lambda t, y, aux: y, y0, jnp.asarray(5.0), ts, 0.01,
            lanes=lanes, max_steps=10_000, diverged=lambda y: ~jnp.all(jnp.isfinite(y)))
            for lanes in (1, 2, 3)}

    runs = run(y0)
    steps = np.asarray(runs[1][3])
    assert len(set(steps.tolist())) >= 4, steps  # the members differ in difficulty
    for lanes, (saved, final, status, member_steps, iterations) in runs.items():
        assert np.all(np.asarray(status) == 0)
        np.testing.assert_array_equal(member_steps, steps)
        assert int(iterations) == _refill_schedule(steps, lanes), (lanes, iterations)
        exact = np.exp(-np.outer(np.asarray(ts), np.asarray(rates))).T  # member i, time t
        np.testing.assert_allclose(np.asarray(saved)[np.arange(7), :, np.arange(7)], exact,
                                   rtol=0, atol=1e-7)
    chunked = sum(steps[i:i + 2].max() for i in range(0, 7, 2))  # fixed chunks of 2
    assert _refill_schedule(steps, 2) < 0.8 * chunked, (steps, chunked)
