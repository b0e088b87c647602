"""Second-order flows as a user runs them: configs that monitor the phase-space laws, runs
continued from a checkpoint (θ, v and Nesterov's time), the memory estimate of the doubled
state, `choose_solver` on a phase-space field.

References are independent of the library: scipy `solve_ivp` on Nesterov's ODE with the
gradient written in numpy, the angular law and its drift written in numpy, the memory
estimate's definition written out."""

import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import conservation as cn
import conservation._experiments.runner as runner
from conservation._experiments import memory
from conservation._experiments.config import parse_config

NESTEROV = """
name = "nesterov_segments"
seed = 5
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[ensemble]
size = 2
[[dynamics]]
kind = "nesterov_flow"
start_time = 0.2
start_velocity = 1.0
weight_decay = 0.05
t1 = 3.0
rtol = 1e-10
n_save = 5
checkpoints = 2
"""


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """The Nesterov entry in 2 segments, killed after the first and continued by a second
    `run_config` (which must start at the checkpoint)."""
    config = parse_config(tomllib.loads(NESTEROV), default_name="nesterov_segments")
    out = tmp_path_factory.mktemp("nesterov")
    execute, calls, lines = runner.execute, [], []

    def counted(run, *args, segment=(1, 1), **kwargs):
        if len(calls) == 1:
            raise _Stop
        calls.append(segment)
        return execute(run, *args, segment=segment, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "execute", counted)
    with pytest.raises(_Stop):
        runner.run_config(config, out_dir=out, progress=False, log=lines.append)
    mp.undo()
    assert calls == [(1, 2)] and (out / "0-nesterov-flow.partial.npz").exists()

    def second(run, *args, segment=(1, 1), **kwargs):
        calls.append(segment)
        return execute(run, *args, segment=segment, **kwargs)

    mp.setattr(runner, "execute", second)
    try:
        summary = runner.run_config(config, out_dir=out, progress=False, log=lines.append)
    finally:
        mp.undo()
    assert calls == [(1, 2), (2, 2)], calls  # continued from segment 1, not from t = 0
    assert any("continuing from checkpoint 1/2" in line for line in lines), lines
    with np.load(out / "0-nesterov-flow.npz") as f:
        arrays = {k: f[k] for k in f.files}
    ensemble, objectives, _ = runner.build(config)
    return dict(summary=summary, arrays=arrays, ensemble=ensemble,
                data=objectives[""].data)


def _nesterov_reference(theta0, x, y, t0, decay, ts, *, restart=None):
    """solve_ivp on θ̈ + 3/(t + t₀)θ̇ + ∇L + λθ = 0 for the 3-4-2 net, L = (1/n)‖W₂W₁X − Y‖²,
    from v₀ = −(∇L(θ₀) + λθ₀). `restart` = (t_s, "rest" | "clock"): the wrong continuations
    a checkpoint without the velocity, or without Nesterov's time, would give."""
    p1 = 12

    def grad(z):
        a, b = z[:p1].reshape(4, 3), z[p1:].reshape(2, 4)
        g = 2.0 / x.shape[1] * (b @ a @ x - y) @ x.T
        return np.concatenate([(b.T @ g).ravel(), (g @ a.T).ravel()]) + decay * z

    def rhs(t, s, shift=0.0):
        z, v = s[:20], s[20:]
        return np.concatenate([v, -3 * v / (t - shift + t0) - grad(z)])

    s0 = np.concatenate([theta0, -grad(theta0)])
    options = dict(method="DOP853", rtol=1e-12, atol=1e-13)
    if restart is None:
        return solve_ivp(rhs, (0, ts[-1]), s0, t_eval=ts, **options).y.T[:, :20]
    split, how = restart
    first = solve_ivp(rhs, (0, split), s0, **options).y[:, -1]
    if how == "rest":
        first[20:] = 0.0
    shift = split if how == "clock" else 0.0
    return solve_ivp(lambda t, s: rhs(t, s, shift), (split, ts[-1]), first,
                     **options).y[:, -1, None].T[:, :20]


def test_nesterov_config_resumes_from_its_checkpoint_to_the_reference(segmented):
    """The continued run's final θ equals scipy's solution of the whole ODE to 1e-8 (rtol
    1e-10), while a continuation from rest (velocity lost) or with Nesterov's clock reset
    (time lost) misses it by > 1e-3: the tolerance tells them apart."""
    arrays, data = segmented["arrays"], segmented["data"]
    x, y = np.asarray(data.x).T, np.asarray(data.y).T
    ensemble = segmented["ensemble"]
    np.testing.assert_allclose(arrays["t"], np.linspace(0, 3.0, 5), rtol=0, atol=1e-15)
    assert list(arrays["status"]) == [0, 0]
    for i in range(2):
        member = ensemble[i]
        theta0 = np.concatenate([np.asarray(w).ravel() for w in member.weights])
        exact = _nesterov_reference(theta0, x, y, 0.2, 0.05, np.array([0.0, 3.0]))[-1]
        got = np.concatenate([arrays["final.weights[0]"][i].ravel(),
                              arrays["final.weights[1]"][i].ravel()])
        assert np.max(np.abs(got - exact)) < 1e-8, np.max(np.abs(got - exact))
        for how in ("rest", "clock"):
            wrong = _nesterov_reference(theta0, x, y, 0.2, 0.05, np.array([0.0, 3.0]),
                                        restart=(1.5, how))[-1]
            assert np.max(np.abs(wrong - exact)) > 1e-3, how


def test_config_monitors_the_phase_space_laws_of_second_order_entries(segmented):
    """A `nesterov_flow` entry of a deep linear net monitors `angular[0]` (the model's
    `phase_space_laws`) beside the balance law: the first kept to ~rtol (a start along −∇L:
    J ≡ 0), the second broken; both stored, summarised and listed."""
    summary, arrays = segmented["summary"], segmented["arrays"]
    assert summary["laws"] == ["balance[0]", "angular[0]"]
    run = summary["runs"][0]
    assert run["max_drift"]["angular[0]"] < 1e-8, run["max_drift"]
    assert run["max_drift"]["balance[0]"] > 1e-3, run["max_drift"]
    assert arrays["drift/angular[0]"].shape == (2, 5)
    assert "final_values/angular[0]" in arrays


def test_angular_drift_is_measured_against_the_terms_now():
    """`AngularMomentumLaw.drift_at` = |Q(t) − Q(0)| / max(scale(0), w(t)·size(t)), written
    in numpy: at w = e^{40} a J(t) within 1e-10 of J(0)/w(t) reads ~1e-10, not
    e^{40}·1e-10; a J(t) that did not decay reads O(1)."""
    rng = np.random.default_rng(0)
    w1, w2, v1, v2 = (rng.standard_normal(s) for s in [(4, 3), (2, 4), (4, 3), (2, 4)])
    law = cn.AngularMomentumLaw(0)

    def state(t, weight, a, b, va, vb):
        return cn.PhaseState(jnp.asarray(t), jnp.asarray(weight), cn.DeepLinear([a, b]),
                             cn.DeepLinear([va, vb]))

    def antisym(a, b, va, vb):
        m = a @ va.T - vb.T @ b
        return 0.5 * (m - m.T)

    start = state(0.0, 1.0, w1, w2, v1, v2)
    q0, scale0 = law(start), law.scale(start)
    size0 = np.linalg.norm(w1) * np.linalg.norm(v1) + np.linalg.norm(w2) * np.linalg.norm(v2)
    np.testing.assert_allclose(scale0, size0, rtol=1e-14)
    weight = np.exp(40.0)
    # A later velocity of O(1) whose J is J(0)/w plus an error 1e-10 × the size of its
    # terms: a random velocity, corrected (least squares on the linear map V ↦ J(V)).
    def j_of(z):
        return antisym(w1, w2, z[:12].reshape(4, 3), z[12:].reshape(2, 4))[np.triu_indices(4, 1)]

    basis = np.stack([j_of(e) for e in np.eye(20)], axis=1)
    raw = rng.standard_normal(20)
    size_now = (np.linalg.norm(w1) * np.linalg.norm(raw[:12])
                + np.linalg.norm(w2) * np.linalg.norm(raw[12:]))
    target = (j_of(np.concatenate([v1.ravel(), v2.ravel()])) / weight
              + 1e-10 * size_now * rng.standard_normal(6))
    fixed = raw + np.linalg.lstsq(basis, target - j_of(raw), rcond=None)[0]
    va, vb = fixed[:12].reshape(4, 3), fixed[12:].reshape(2, 4)
    later = state(8.0, weight, w1, w2, va, vb)
    size_now = np.linalg.norm(w1) * np.linalg.norm(va) + np.linalg.norm(w2) * np.linalg.norm(vb)
    q_now = weight * antisym(w1, w2, va, vb)
    expected = np.max(np.abs(q_now - np.asarray(q0))) / max(float(scale0), weight * size_now)
    got = float(law.drift_at(law(later), q0, scale0, later))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert 1e-12 < got < 1e-9, got
    assert float(law.drift(law(later), q0, scale0)) > 1e3  # against the start alone: e^{40}·
    # Negative control: J(t) = J(0) (no decay) with the same weight: O(1) drift.
    stuck = state(8.0, weight, w1, w2, v1, v2)
    assert float(law.drift_at(law(stuck), q0, scale0, stuck)) > 1e-2


def test_phase_space_laws_are_declared_per_model():
    key = jax.random.PRNGKey(0)
    deep = cn.DeepLinear.random([3, 4, 5, 2], key=key)
    assert cn.phase_space_laws(deep) == (cn.AngularMomentumLaw(0), cn.AngularMomentumLaw(1))
    relu = cn.MLP.random([3, 4, 2], key=key)
    assert cn.phase_space_laws(relu) == ()  # rescalings only: momentum keeps none
    # The ReLU config parses, and its momentum entries get no phase-space law to monitor.
    config = cn.load_config("configs/momentum_flow_relu.toml")
    assert [run.kind for run in config.dynamics] == ["flow", "momentum_flow", "momentum"]
    assert config.model.kind == "mlp" and config.model.activation == "relu"


def _config(kind, **extra):
    return parse_config({"model": {"kind": "deep_linear", "widths": [5, 7, 6, 3]},
                         "data": {"n": 8},
                         "dynamics": [{"kind": kind, "t1": 1.0, "solver": "tsit5",
                                       "n_save": 11, **extra}]})


def test_memory_estimate_counts_the_phase_space_state():
    """By `run_estimate`'s definition (bytes = 8 × numbers): a second-order flow's solver
    state and resident copies hold (θ, v), 2P numbers per copy, and its saved values the
    angular laws too (one k × k matrix per pair of layers, k the hidden width: 7² + 6²)."""
    from conservation._dynamics.batching import _CPU_LANES
    from conservation._memory import FLOW_RESIDENT_COPIES, FLOW_STATE_COPIES

    P = 5 * 7 + 7 * 6 + 6 * 3
    flow, momentum = (memory.estimate(_config(kind, **extra)) for kind, extra in
                      (("flow", {}), ("momentum_flow", {"mass": 0.5})))
    lanes = min(1 if memory.free_device_memory() is not None else _CPU_LANES, 1)  # 1 member
    assert flow.parts["solver state"] == lanes * FLOW_STATE_COPIES * P * 8
    assert momentum.parts["solver state"] == lanes * FLOW_STATE_COPIES * 2 * P * 8
    assert momentum.parts["parameters"] == FLOW_RESIDENT_COPIES * 2 * P * 8
    laws, entries = 2, 7 * 7 + 6 * 6  # balance[0], balance[1]: k × k at k = 7, 6
    assert flow.parts["saved values"] == (11 * (1 + 2 * laws) + entries) * 8
    assert momentum.parts["saved values"] == (11 * (1 + 2 * 2 * laws) + 2 * entries) * 8


def test_choose_solver_answers_for_a_phase_space_field():
    key = jax.random.PRNGKey(1)
    net = cn.DeepLinear.random([3, 4, 2], key=key)
    data = cn.teacher_dataset(net, cn.gaussian_inputs(key, 8, (3,)))
    objective = cn.make_objective(cn.MSE(), data, net)
    for field in (cn.MomentumField(0.5), cn.NesterovField(start_time=0.5)):
        choice = cn.choose_solver(objective, net, 1.0, field=field)
        assert choice.name == "tsit5" and "kvaerno5" in choice.reason
        assert choice.num_params == 20 and np.isnan(choice.rho_max)


@pytest.mark.slow  # three compiles of the heavy-ball flow (~60 s on 2 loaded cores)
def test_momentum_flow_resumes_through_the_api():
    """`gradient_flow(..., resumable=True)` then `resume=`: the joined run equals the run in
    one go to the solver tolerance (final θ 2e-12, losses 1e-9 relative measured), with the
    velocity carried in `Result.velocity`; resuming without it is refused."""
    key = jax.random.PRNGKey(0)
    kt, kx, kn, kv = jax.random.split(key, 4)
    teacher = cn.DeepLinear.random([3, 4, 2], key=kt)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 16, (3,)))
    net = cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 4, 2], key=k, init_scale=0.8),
                           kn, 2)
    velocity = cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 4, 2], key=k), kv, 2)
    objective = cn.make_objective(cn.MSE(), data, net)
    laws = [cn.AngularMomentumLaw(0), cn.BalanceLaw(0)]
    field = cn.MomentumField(0.1)
    options = dict(field=field, laws=laws, rtol=1e-10, solver="tsit5")
    whole = cn.gradient_flow(objective, net, 4.0, velocity=velocity, n_save=9, **options)
    first = cn.gradient_flow(objective, net, 2.0, velocity=velocity, n_save=5,
                             resumable=True, **options)
    assert first.velocity is not None
    joined = cn.gradient_flow(objective, first.final, 4.0, n_save=5, resume=first, **options)
    assert joined.status_names() == ["success"] * 2
    np.testing.assert_allclose(joined.loss, whole.loss, rtol=1e-8)
    for a, b in zip(jax.tree.leaves(joined.final.models), jax.tree.leaves(whole.final.models)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert float(jnp.max(joined.max_drift["angular[0]"])) < 1e-8
    with pytest.raises(cn.ArgumentError, match="`velocity` and `resume`"):
        cn.gradient_flow(objective, first.final, 4.0, resume=first, velocity=velocity,
                         **options)
    with pytest.raises(cn.ArgumentError, match="second-order"):
        cn.gradient_flow(objective, first.final, 4.0, resume=first, laws=[cn.BalanceLaw(0)],
                         rtol=1e-10)
