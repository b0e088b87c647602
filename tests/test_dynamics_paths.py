"""Paths of the dynamics layer that the rest of the default suite never executes, each checked
against an independent reference (numpy, closed forms, a hand count of the loop's iterations):

- per-leaf learning rates (`optimizer(lr_scales=...)`) against a numpy heavy-ball loop;
- a resumed flow with `solver="auto"` going on with the solver that ran (the solver handed to
  the integration);
- the progress reports of the lanes loop, of one diffrax solve and of the host-side bar,
  against the step times of a constant-step flow counted by hand;
- monitors on stacked (time-major) law values against numpy's max |Q − Q₀| / scale;
- the auto choice's "kvaerno5" branch at its threshold (t1·ρ / h_max > max_steps / 4);
- `StabilizedRK`'s declared order against the measured local error order of its stiff steps;
- `Sharpness` on fewer parameters than `k`, against numpy's eigenvalues;
- the argument checks of `gradient_flow`, `train`, `optimizer`, observables and solvers.

The file runs in about 20 s: tiny models (a 2-3-1 deep linear net), one shape per
compiled program, module-scoped fixtures.
"""

import dataclasses
import types

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conservation as cn
from conservation._dynamics.flow import SOLVERS, _FlowBar, _MemberProgress, _PhaseMonitor
from conservation._dynamics.lockstep import solve_lanes
from conservation._dynamics.monitor import SUCCESS, LawMonitor
from conservation._dynamics.observables import (
    check_observables,
    check_resumed_observables,
    top_eigenvalues,
)

# ---------------------------------------------------------------------------------------------
# A 2-3-1 deep linear regression and its gradient written out in numpy (the reference).

N_SAMPLES = 8


def _numpy_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_SAMPLES, 2))
    y = x @ rng.normal(size=(2, 1)) + 0.3 * rng.normal(size=(N_SAMPLES, 1))
    w1 = 0.6 * rng.normal(size=(3, 2))
    w2 = 0.6 * rng.normal(size=(1, 3))
    return x, y, w1, w2


def numpy_loss(w1, w2, x, y):
    """L = mean_i ‖W₂W₁x_i − y_i‖² (MSE: no ½, summed over outputs)."""
    return float(np.mean(np.sum((x @ w1.T @ w2.T - y) ** 2, axis=1)))


def numpy_grads(w1, w2, x, y):
    """(∂L/∂W₁, ∂L/∂W₂) by hand: with E = XW₁ᵀW₂ᵀ − Y (n × 1),
    ∂L/∂W₂ = (2/n) Eᵀ X W₁ᵀ and ∂L/∂W₁ = (2/n) W₂ᵀ Eᵀ X."""
    e = x @ w1.T @ w2.T - y
    n = len(x)
    return 2.0 / n * w2.T @ e.T @ x, 2.0 / n * e.T @ x @ w1.T


@pytest.fixture(scope="module")
def problem():
    x, y, w1, w2 = _numpy_problem()
    model = cn.DeepLinear([jnp.asarray(w1), jnp.asarray(w2)])
    objective = cn.make_objective(cn.MSE(), cn.Dataset(jnp.asarray(x), jnp.asarray(y)), model)
    return model, objective, (x, y, w1, w2)


# ---------------------------------------------------------------------------------------------
# Per-leaf learning rates (optimizer(lr_scales=...)).

ETA, BETA, SCALES = 0.1, 0.5, (1.0, 0.25)
HEAVY_BALL = cn.optimizer("momentum", lr=ETA, momentum=BETA, lr_scales=SCALES)


@pytest.fixture(scope="module")
def scaled_run(problem):
    model, objective, _ = problem
    return cn.train(objective, model, HEAVY_BALL, 3, n_save=4, resumable=True)


def test_lr_scales_step_each_leaf_with_its_own_learning_rate(problem, scaled_run):
    """Heavy ball with per-leaf factors s_i: v_i ← βv_i + g_i, W_i ← W_i − η s_i v_i (PyTorch
    convention, v₀ = 0). Reference: the same three steps in numpy with the gradient written out;
    the final weights and the loss at every step agree to round-off. A factor applied as η/s_i,
    or to the wrong leaf, moves W₂ by 16× or W₁ by 4× too much."""
    _, _, (x, y, w1, w2) = problem
    weights, velocity, losses = [w1.copy(), w2.copy()], [0.0, 0.0], []
    for _ in range(3):
        losses.append(numpy_loss(*weights, x, y))
        grads = numpy_grads(*weights, x, y)
        for i in range(2):
            velocity[i] = BETA * velocity[i] + grads[i]
            weights[i] = weights[i] - ETA * SCALES[i] * velocity[i]
    losses.append(numpy_loss(*weights, x, y))
    assert scaled_run.status_names() == ["success"]
    assert int(scaled_run.num_steps[0]) == 3
    for got, want in zip(scaled_run.final.models.weights, weights):
        np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(scaled_run.loss[0]), losses, rtol=1e-12)
    # Negative control: the factors matter here (the unscaled run ends elsewhere).
    plain = w2 - ETA * numpy_grads(w1, w2, x, y)[1]
    assert np.max(np.abs(np.asarray(scaled_run.final.models.weights[1][0]) - plain)) > 1e-3


def test_lr_scales_must_match_the_parameter_arrays(problem):
    """One factor per parameter array: three for a two-layer net is refused, naming
    `lr_scales` and both counts; a string or a bare number is not a sequence of factors."""
    model, objective, _ = problem
    three = cn.optimizer("momentum", lr=ETA, momentum=BETA, lr_scales=(1.0, 0.5, 0.25))
    with pytest.raises(cn.ArgumentError, match=r"`lr_scales` has 3 factors .* has 2 "):
        cn.train(objective, model, three, 1, n_save=2)
    for bad in ("ab", 0.5):
        with pytest.raises(cn.ArgumentError, match="`lr_scales`"):
            cn.optimizer("gd", lr=ETA, lr_scales=bad)


# ---------------------------------------------------------------------------------------------
# train's argument checks on resume, hyperparams and resumable.


def test_train_resume_refuses_what_does_not_continue_the_run(problem, scaled_run):
    """`train(resume=)` needs a resumable train Result, its own final model, its step time
    and the optimizer of the run (the state's structure); each refusal names the argument."""
    model, objective, _ = problem
    final = scaled_run.final
    with pytest.raises(cn.ArgumentError, match="`resume` must be the Result of a previous"):
        cn.train(objective, final, HEAVY_BALL, 5,
                 resume=dataclasses.replace(scaled_run, train_state=None))
    with pytest.raises(cn.ArgumentError, match="`model` must be `resume.final`"):
        cn.train(objective, model, HEAVY_BALL, 5, resume=scaled_run)
    with pytest.raises(cn.ArgumentError, match=r"`step_time` must be the resumed run's \(1\)"):
        cn.train(objective, final, HEAVY_BALL, 5, resume=scaled_run, step_time=0.5)
    with pytest.raises(cn.ArgumentError, match="`optim` is not the optimizer of the resumed"):
        cn.train(objective, final, optax.sgd(ETA), 5, resume=scaled_run)


def test_train_refuses_bad_resumable_and_hyperparams(problem):
    """`resumable` is a bool; `hyperparams` a dict of injected hyperparameters (a plain optax
    transformation has none to override)."""
    model, objective, _ = problem
    with pytest.raises(cn.ArgumentError, match="`resumable` must be True or False"):
        cn.train(objective, model, HEAVY_BALL, 1, resumable="yes")
    with pytest.raises(cn.ArgumentError, match="`hyperparams` must be a dict"):
        cn.train(objective, model, HEAVY_BALL, 1, hyperparams=[("learning_rate", 0.1)])
    with pytest.raises(cn.ArgumentError, match=r"`hyperparams` \['learning_rate'\] are not"):
        cn.train(objective, model, optax.sgd(ETA), 1, n_save=2,
                 hyperparams={"learning_rate": 0.1})


# ---------------------------------------------------------------------------------------------
# gradient_flow(resume=...): which solver goes on, and the argument checks. No flow is
# compiled: the Result to resume is the train run's without its optimizer state (what the
# checks read of a flow's Result: `final`, `t`, `reference`, `values`, `solver`), and the
# integration `_flow` is replaced by a stub that reports the solver it was handed.


class _Handed(Exception):
    """Raised by the `_flow` stub, carrying the solver `gradient_flow` handed it."""


@pytest.fixture
def stub_flow(monkeypatch):
    from conservation._dynamics import flow, solvers

    def handed(*args, **kwargs):
        raise _Handed(args[5])  # (params, static, objective, field, monitor, solver, ...)

    def no_probe(*args, **kwargs):
        raise AssertionError("solver='auto' probed the flow instead of reusing the solver")

    monkeypatch.setattr(flow, "_flow", handed)
    monkeypatch.setattr(flow, "_choose", no_probe)
    monkeypatch.setattr(solvers, "_choose", no_probe)


@pytest.fixture(scope="module")
def flow_like(scaled_run):
    """A resumable Result as a flow leaves it (no `train_state`), run to t = 3."""
    return dataclasses.replace(scaled_run, train_state=None, solver="heun")


@pytest.mark.parametrize("ran, asked, used", [
    ("heun", "auto", dfx.Heun), ("dopri8", "auto", SOLVERS["dopri8"]),
    ("heun", "tsit5", SOLVERS["tsit5"])])
def test_a_flow_resumed_with_auto_goes_on_with_the_solver_that_ran(
        problem, flow_like, stub_flow, ran, asked, used):
    """`gradient_flow(resume=r, solver="auto")` integrates with `r.solver` (Heun, Dopri8),
    without probing the flow (the probe would pick Tsit5 on this non-stiff flow); a solver
    given by name is used as given (negative control: Tsit5 although Heun ran)."""
    _, objective, _ = problem
    resume = dataclasses.replace(flow_like, solver=ran)
    with pytest.raises(_Handed) as handed:
        cn.gradient_flow(objective, resume.final, 5.0, resume=resume, solver=asked)
    assert type(handed.value.args[0]) is used, handed.value.args[0]


def test_gradient_flow_resume_refuses_what_does_not_continue_the_run(problem, scaled_run,
                                                                      flow_like):
    """`gradient_flow(resume=)` needs a flow's Result (not train's), the same laws, the same
    `values`, a field of the same order; `velocity` belongs to second-order fields and
    `resumable` is a bool. Each refusal names the argument."""
    model, objective, _ = problem
    first, final = flow_like, flow_like.final
    with pytest.raises(cn.ArgumentError, match="`resume` must be the Result of a previous "
                                               "`gradient_flow`"):
        cn.gradient_flow(objective, scaled_run.final, 5.0, resume=scaled_run)
    square = cn.FunctionLaw(lambda m: jnp.sum(m.weights[0] ** 2), "square")
    with pytest.raises(cn.ArgumentError, match=r"`laws` \['square'\] differ"):
        cn.gradient_flow(objective, final, 5.0, resume=first, values="none", laws=[square])
    with pytest.raises(cn.ArgumentError, match=r"`values` keeps \['balance\[0\]'\]"):
        cn.gradient_flow(objective, final, 5.0, resume=first, values="all")
    with pytest.raises(cn.ArgumentError, match="`resume` is a first-order flow's Result but "
                                               "`field` is MomentumField"):
        cn.gradient_flow(objective, final, 5.0, resume=first, values="none",
                         field=cn.MomentumField(mass=0.5))
    with pytest.raises(cn.ArgumentError, match="`velocity` is the start velocity"):
        cn.gradient_flow(objective, model, 1.0, velocity=model)
    with pytest.raises(cn.ArgumentError, match="`resumable` must be True or False"):
        cn.gradient_flow(objective, model, 1.0, resumable="yes")


# ---------------------------------------------------------------------------------------------
# Progress reports: the lanes loop, one diffrax solve, the host-side bar. A flow of constant
# speed dy/dt = 1 with steps capped at h = 1/32 (dtmax) takes exactly 64 steps to t1 = 2, every
# step accepted (the error estimate is round-off), at binary-exact times k/32.

H, T1, STEPS = 1.0 / 32.0, 2.0, 64
CONSTANT_STEPS = dfx.PIDController(rtol=1e-8, atol=1e-8, dtmax=H)


def _unit_speed(*ty):
    return jnp.ones_like(ty[-1])


def test_lanes_report_every_20_iterations_with_each_members_time(monkeypatch):
    """`solve_lanes(report=)` on 3 members, 2 lanes: members 0 and 1 run iterations 0…63
    (64 steps), member 2 loads into the freed lane at iteration 64 and runs 64…127. Reports
    come after iterations 0, 20, …, 120 and once at the end (8 calls), each with t/t1 of every
    member (member m after its k-th step: k/64) and which have finished, as counted by hand."""
    calls = []

    def report(members, fraction, finished):
        calls.append((np.array(members), np.array(fraction), np.array(finished)))

    @jax.jit
    def run(y0):
        return solve_lanes(_unit_speed, dfx.Tsit5(), CONSTANT_STEPS, lambda row: (row, None),
                           lambda t, y, aux: y[0], y0, jnp.asarray(T1),
                           jnp.linspace(0.0, T1, 3), H, lanes=2, max_steps=1000,
                           diverged=lambda y: ~jnp.all(jnp.isfinite(y)), report=report)

    y0 = jnp.arange(3.0)[:, None]
    saved, final, status, steps, iterations = jax.block_until_ready(run(y0))
    jax.effects_barrier()  # every callback has run
    assert int(iterations) == 2 * STEPS
    np.testing.assert_array_equal(np.asarray(status), [SUCCESS] * 3)
    np.testing.assert_array_equal(np.asarray(steps), [STEPS] * 3)
    np.testing.assert_allclose(np.asarray(saved), np.arange(3.0)[:, None] + [0.0, 1.0, 2.0],
                               rtol=1e-14)  # y = y0 + t at the saves
    np.testing.assert_allclose(np.asarray(final)[:, 0], np.arange(3.0) + T1, rtol=1e-14)

    expected = []
    for i in range(0, 2 * STEPS, 20):
        first_two = min(i + 1, STEPS) / STEPS
        third = 0.0 if i < STEPS else (i + 1 - STEPS) / STEPS
        done = i + 1 >= STEPS
        expected.append(([first_two, first_two, third], [done, done, False]))
    expected.append(([1.0, 1.0, 1.0], [True, True, True]))
    assert len(calls) == len(expected), [c[1] for c in calls]
    for (members, fraction, finished), (want_fraction, want_finished) in zip(calls, expected):
        np.testing.assert_array_equal(members, [0, 1, 2])
        np.testing.assert_allclose(fraction, want_fraction, rtol=1e-15, atol=0)
        np.testing.assert_array_equal(finished, want_finished)


def test_member_progress_reports_every_20_steps_and_finishes_its_member(monkeypatch):
    """`_MemberProgress(member)` in one diffrax solve of 64 steps: a report after steps 1, 21,
    41 and 61 (its counter starts at 0 and calls back when it is a multiple of 20), each
    (member, t/t1) = (3, k/64), and one `finish(3)` when the solve closes."""
    reports, finished = [], []
    monkeypatch.setattr(_FlowBar, "report",
                        staticmethod(lambda m, p: reports.append((int(m), float(p)))))
    monkeypatch.setattr(_FlowBar, "finish", staticmethod(lambda m: finished.append(int(m))))
    sol = dfx.diffeqsolve(dfx.ODETerm(lambda t, y, args: _unit_speed(y)), dfx.Tsit5(), 0.0, T1,
                          H, jnp.zeros(1), stepsize_controller=CONSTANT_STEPS,
                          progress_meter=_MemberProgress(jnp.asarray(3)))
    jax.effects_barrier()
    assert int(sol.stats["num_steps"]) == STEPS
    assert sorted(reports) == [(3, k / STEPS) for k in (1, 21, 41, 61)], reports
    assert finished == [3]


def test_flow_bar_report_keeps_each_members_furthest_time_and_finish_fills_it(capsys):
    """The host side of one-solve-per-member progress: `report(members, t/t1)` keeps each
    member's furthest fraction (a later, smaller one does not lower it) and shows the
    smallest reported time; `finish(member)` sets it to 1 and counts it finished. With no
    bar active (progress off) both do nothing."""
    _FlowBar.report(np.array([0]), np.array([0.5]))  # no bar: ignored, no error
    _FlowBar.finish(np.array([0]))
    with _FlowBar(3, 5.0, show=True) as bar:
        _FlowBar.report(np.array([0, 2]), np.array([0.4, 0.6]))
        np.testing.assert_allclose(bar.fraction, [0.4, 0.0, 0.6], rtol=1e-15)
        assert bar.bar.desc == "flow: t=2/5, members 0/3"  # min(0.4, 0.6) · 5
        assert bar.bar.n == pytest.approx(1.0, rel=1e-12)
        _FlowBar.report(np.int64(0), np.float64(0.2))  # a scalar: one member
        np.testing.assert_allclose(bar.fraction, [0.4, 0.0, 0.6], rtol=1e-15)
        assert bar.bar.desc == "flow: t=1/5, members 0/3"  # 0.2 · 5
        _FlowBar.finish(np.array([2]))
        np.testing.assert_allclose(bar.fraction, [0.4, 0.0, 1.0], rtol=1e-15)
        np.testing.assert_array_equal(bar.finished, [False, False, True])
        assert bar.bar.desc == "flow: t=5/5, members 1/3"
        assert bar.bar.n == pytest.approx(1.4, rel=1e-12)
    assert _FlowBar.active is None
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# Monitors on stacked values; the default field methods.


def test_monitor_drifts_of_stacked_values_match_numpy():
    """`LawMonitor.drifts` on law values with leading (member, save) axes: max over each law's
    components of |Q − Q₀| / scale per (member, save), with a scalar scale (a balance law) and
    a per-component one; `_PhaseMonitor.drifts` without a state is the same. Reference:
    numpy on the same arrays."""
    rng = np.random.default_rng(1)
    vec = cn.FunctionLaw(lambda m: m.weights[0][:, 0], "vec",
                         scale_fn=lambda m: jnp.abs(m.weights[0][:, 0]))
    laws = (cn.BalanceLaw(0), vec)
    values = {"balance[0]": rng.normal(size=(2, 4, 3, 3)), "vec": rng.normal(size=(2, 4, 3))}
    ref = {"balance[0]": rng.normal(size=(3, 3)), "vec": rng.normal(size=3)}
    scales = {"balance[0]": np.asarray(2.5), "vec": np.array([0.5, 1.0, 4.0])}
    want = {"balance[0]": np.max(np.abs(values["balance[0]"] - ref["balance[0]"]) / 2.5,
                                 axis=(2, 3)),
            "vec": np.max(np.abs(values["vec"] - ref["vec"]) / scales["vec"], axis=2)}
    jvalues = {k: jnp.asarray(v) for k, v in values.items()}
    reference = ({k: jnp.asarray(v) for k, v in ref.items()},
                 {k: jnp.asarray(v) for k, v in scales.items()})
    for monitor in (LawMonitor(laws), _PhaseMonitor(laws)):
        got = monitor.drifts(jvalues, reference)
        for name in want:
            assert got[name].shape == (2, 4)
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-15)
    # One save (no leading axis): a scalar per law.
    one = LawMonitor(laws).drifts({k: v[1, 2] for k, v in jvalues.items()}, reference)
    for name in want:
        np.testing.assert_allclose(float(one[name]), want[name][1, 2], rtol=1e-15)


def test_default_field_methods_are_the_autonomous_first_order_ones():
    """`AbstractVectorField.rhs(grad, t, y)` is the field at y whatever t (an autonomous
    field), and `position(y)` is y (a first-order state is the parameters): for
    `GradientField(λ)`, −(∇L(y) + λy) with ∇L(y) = A y written out."""
    a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    y = jnp.array([0.5, -1.5])
    field = cn.GradientField(weight_decay=0.1)
    want = -(np.asarray(a) @ np.asarray(y) + 0.1 * np.asarray(y))
    for t in (0.0, 7.0):
        np.testing.assert_allclose(np.asarray(field.rhs(lambda z: a @ z, jnp.asarray(t), y)),
                                   want, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(field.position(y)), np.asarray(y))


def test_gradient_field_leaves_a_zero_weight_decay_out_and_traces_a_non_zero_one():
    """`GradientField()` (λ = 0) is −∇L with no λy term in its program (with the term, XLA
    recomputed every Runge–Kutta stage's input in each of its consumers: a third of a flow's
    time); any non-zero λ keeps the term with λ traced, so that two values share one program
    (and a λ traced where the field is made keeps it), and asks a gradient that has one for
    its `decayed` sum. Numbers against numpy."""
    a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    y = jnp.array([0.5, -1.5])

    def grad(z):
        return a @ z

    zero = cn.GradientField()
    assert not zero.decays and not cn.GradientField(0.0).decays
    assert cn.GradientField(0.1).decays
    eqns = jax.make_jaxpr(lambda z: zero(grad, z))(y).jaxpr.eqns
    assert [e.primitive.name for e in eqns] == ["dot_general", "neg"], eqns
    np.testing.assert_allclose(np.asarray(zero(grad, y)), -(np.asarray(a) @ np.asarray(y)),
                               rtol=1e-15)

    traces = []

    @eqx.filter_jit
    def apply(field, z):
        traces.append(field)
        return field(grad, z)

    for lam in (0.1, 0.25):
        want = -(np.asarray(a) @ np.asarray(y) + lam * np.asarray(y))
        np.testing.assert_allclose(np.asarray(apply(cn.GradientField(lam), y)), want,
                                   rtol=1e-15)
    assert len(traces) == 1  # the second λ reused the first one's program
    apply(zero, y)
    assert len(traces) == 2  # λ = 0: a program of its own

    @jax.jit
    def traced(lam):
        field = cn.GradientField(lam)
        assert field.decays
        return field(grad, y)

    np.testing.assert_allclose(np.asarray(traced(0.5)),
                               -(np.asarray(a) @ np.asarray(y) + 0.5 * np.asarray(y)),
                               rtol=1e-15)

    # The other fields with a weight decay leave it out the same way, and keep it otherwise:
    # the heavy-ball acceleration −(v + ∇L + λθ)/μ and Nesterov's −3v/τ − ∇L − λθ.
    an, yn, v = np.asarray(a), np.asarray(y), np.array([0.25, 2.0])
    for make in (lambda lam: cn.MomentumField(0.5, lam), lambda lam: cn.NesterovField(2.0, lam),
                 lambda lam: cn.SignField(lam, 0.1),
                 lambda lam: cn.PreconditionedField(jnp.array([1.0, 0.5]), lam)):
        assert not make(0.0).decays and make(0.1).decays
    # A gradient with a `decayed(θ, λ)` (gradient_flow's, which adds λθ array by array) is
    # asked for ∇L + λθ; at λ = 0 it is not.
    def routed(z):
        return a @ z

    routed.decayed = lambda z, lam: a @ z + lam * z + 100.0  # (marked: not the fallback)
    np.testing.assert_allclose(np.asarray(cn.GradientField(0.1)(routed, y)),
                               -(an @ yn + 0.1 * yn + 100.0), rtol=1e-15)
    np.testing.assert_allclose(np.asarray(cn.GradientField()(routed, y)), -(an @ yn),
                               rtol=1e-15)
    state = jnp.concatenate([y, jnp.asarray(v)])
    for lam in (0.0, 0.1):
        heavy = cn.MomentumField(0.5, lam).rhs(grad, jnp.asarray(0.0), state)
        np.testing.assert_allclose(np.asarray(heavy[2:]), -(v + an @ yn + lam * yn) / 0.5,
                                   rtol=1e-15)
        nesterov = cn.NesterovField(2.0, lam).rhs(grad, jnp.asarray(1.0), state)
        np.testing.assert_allclose(np.asarray(nesterov[2:]),
                                   -3.0 * v / 3.0 - an @ yn - lam * yn, rtol=1e-15)


def test_a_weight_decay_set_after_the_field_was_made_is_kept():
    """`decays` is set when a field is made; a λ put in afterwards (`eqx.tree_at`) must not be
    left out: `gradient_flow` makes the field again, and runs it as `GradientField(0.1)` (the
    same numbers), not as λ = 0. The translation-like check: with λ the parameters shrink
    faster, so the final losses differ from λ = 0's."""
    key = jax.random.PRNGKey(11)
    teacher = cn.DeepLinear.random([2, 3, 2], key=key)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(jax.random.PRNGKey(12), 8, (2,)))
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random([2, 3, 2], key=k),
                                jax.random.PRNGKey(13), 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    late = eqx.tree_at(lambda f: f.weight_decay, cn.GradientField(), 0.1)
    assert not late.decays  # what a run must not trust
    # Called directly, such a field refuses (one line naming the argument and the fix).
    with pytest.raises(cn.ArgumentError, match=r"`weight_decay` of this GradientField was set "
                                               r"after it was made.*GradientField\(\.\.\., "
                                               r"weight_decay=λ\)"):
        late(lambda z: z, jnp.ones(2))

    def run(field):
        return cn.gradient_flow(objective, ensemble, 1.0, n_save=3, solver="tsit5",
                                progress=False, field=field)

    made, zero = run(cn.GradientField(0.1)), run(cn.GradientField())
    np.testing.assert_array_equal(np.asarray(run(late).loss), np.asarray(made.loss))
    assert not np.allclose(np.asarray(made.loss[:, -1]), np.asarray(zero.loss[:, -1]))
    assert cn.choose_solver(objective, ensemble, 1.0, field=late).rho0 > \
        cn.choose_solver(objective, ensemble, 1.0, field=cn.GradientField()).rho0


# ---------------------------------------------------------------------------------------------
# Solvers: the auto choice's kvaerno5 branch, StabilizedRK's order and checks.


class _Point(eqx.Module):
    theta: jax.Array


class _Well(eqx.Module):
    """L(θ) = ½·a·θ², at its minimum θ = 0: the flow stays there and the Hessian is a (the
    probe's ρ exactly, all along)."""

    a: jax.Array

    def __call__(self, model):
        return 0.5 * self.a * jnp.sum(model.theta**2)


def test_auto_chooses_kvaerno5_below_the_step_budget_threshold():
    """`choose_solver` picks "kvaerno5" (a small, very stiff flow) when even the stabilised
    solver's largest steps, h·ρ = h_max with RKC's 1 + ⌊√(1 + 1.54·h_max)⌋ = 1000 stages,
    i.e. h_max = (999² − 1)/1.54, need more than max_steps / 4 steps: t1·ρ/h_max > max_steps/4.
    Here ρ = 1000 and t1 puts the threshold at max_steps = 100.5: 100 gives "kvaerno5",
    101 "stabilized" (a threshold off by 1 % either way flips one of them)."""
    a = 1000.0
    h_max = (999.0**2 - 1.0) / 1.54
    t1 = 100.5 * h_max / (4.0 * a)
    names = {}
    for max_steps in (100, 101):
        choice = cn.choose_solver(_Well(jnp.asarray(a)), _Point(jnp.zeros(1)), t1,
                                  max_steps=max_steps)
        assert choice.rho_max == pytest.approx(a, rel=1e-12), choice
        names[max_steps] = choice.name
    assert names == {100: "kvaerno5", 101: "stabilized"}, names


@eqx.filter_jit
def _stiff_forced_step(solver, h):
    """One step of y₀' = −1000 y₀ (ρ = 1000: h·ρ = 1200·h with the safety factor, above
    StabilizedRK's switch 50 for h ≥ 0.05, so an RKC step) and y₁' = cos(t + 0.5) from 0
    (exact y₁(h) = sin(h + 0.5) − sin 0.5)."""
    term = dfx.ODETerm(lambda t, y, args: jnp.stack([-1000.0 * y[0], jnp.cos(t + 0.5)]))
    y0 = jnp.zeros(2)
    state = solver.init(term, 0.0, h, y0.at[0].set(1e-300), None)  # the power iteration's v
    return solver.step(term, 0.0, h, y0, None, state, False)[0][1]


def test_stabilized_declares_the_order_of_its_stiff_steps():
    """`StabilizedRK.order` is 2, the order of the RKC steps it takes above its switch (ROCK4's
    4 holds only below): measured, the local error of the forced component falls like
    h^(order + 1) = h³ over h = 0.2, 0.1, 0.05 (all RKC steps)."""
    solver = cn.StabilizedRK()
    hs = (0.2, 0.1, 0.05)
    errors = [abs(float(_stiff_forced_step(solver, jnp.asarray(h)))
                  - (np.sin(h + 0.5) - np.sin(0.5))) for h in hs]
    slopes = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    term = dfx.ODETerm(lambda t, y, args: -y)
    assert solver.order(term) == 2
    assert np.all(np.abs(slopes - (solver.order(term) + 1)) < 0.3), (slopes, errors)


def test_stabilized_checks_max_stages_and_evaluates_its_field():
    """`max_stages` ≥ 2, for StabilizedRK as for RKC (2 is allowed, 1 refused naming it);
    `func` is the term's vector field at (t0, y0)."""
    for cls in (cn.StabilizedRK, cn.RKC):
        assert cls(max_stages=2).max_stages == 2
        with pytest.raises(ValueError, match="`max_stages` must be ≥ 2, got 1"):
            cls(max_stages=1)
    term = dfx.ODETerm(lambda t, y, args: -args * y + t)
    y0 = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(np.asarray(cn.StabilizedRK().func(term, 0.5, y0, 3.0)),
                               [-3.0 + 0.5, 6.0 + 0.5], rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Observables.


def test_sharpness_of_fewer_parameters_than_k_pads_with_nan():
    """With P = 3 parameters and k = 5, the top eigenvalues are all 3 of the (symmetric)
    operator, largest first (numpy's eigvalsh), then k − P = 2 NaN: no eigenvalue exists
    there, and none is made up."""
    rng = np.random.default_rng(2)
    m = rng.normal(size=(3, 3))
    a = m + m.T
    top = np.asarray(jax.jit(lambda a: top_eigenvalues(lambda v: a @ v, jnp.zeros(3), 5, 40,
                                                       jnp.asarray(1e-10)))(jnp.asarray(a)))
    assert top.shape == (5,)
    np.testing.assert_allclose(top[:3], np.sort(np.linalg.eigvalsh(a))[::-1], rtol=1e-10,
                               atol=1e-12)
    assert np.all(np.isnan(top[3:]))
    assert cn.Sharpness(k=5).shape == (5,) and cn.GradientNorm().shape == ()


def test_observable_arguments_are_checked():
    """Observables: a non-empty `name`; `observables` None (none), one observable (a tuple of
    it) or a sequence of them, not a string; a resumed run cannot go on with one that compares
    with the start (`KernelDistance`)."""
    with pytest.raises(cn.ArgumentError, match="`name` must be a non-empty string"):
        cn.Sharpness(name="")
    assert check_observables(None) == ()
    norm = cn.GradientNorm()
    assert check_observables(norm) == (norm,)
    with pytest.raises(cn.ArgumentError, match="`observables` must be a sequence"):
        check_observables("sharpness")
    kernel = cn.KernelDistance(jnp.zeros((2, 2)))
    resumed = types.SimpleNamespace(observables={"kernel_distance": None})
    with pytest.raises(cn.ArgumentError, match=r"`observables` \['kernel_distance'\] compare"):
        check_resumed_observables(resumed, (kernel,))
