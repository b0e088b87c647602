"""Honest statuses of flows: a non-finite loss is `diverged` where it happens, a loss that ends
far above its start is named, tolerances that cannot give a drift and non-finite times are
refused, and final losses below the accuracy every objective guarantees are counted.

One tiny flow family shares its compiled programs (the loss's target, the weight decay, `t1`
and the tolerances are traced): a one-layer linear net with two outputs on one sample, the
loss ‖p − y‖² — NaN, with a NaN gradient, inside the band p₁ < 0.5, p₂ > 1 — whose gradient
flow dw/dt = −2(w − y) − λw has the closed form w(t) = w∞ + (w₀ − w∞)e^{−(2+λ)t},
w∞ = 2y/(2 + λ).
"""

import warnings

import diffrax as dfx
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._dynamics.monitor import below_accuracy, mark_loss_increased
from conservation._dynamics.solvers import StopOnNonFinite


class BandLoss(cn.AbstractLoss):
    """‖p − y‖², NaN (and so is its gradient) where p₁ < 0.5 and p₂ > 1."""

    @property
    def name(self):
        return "band"

    def __call__(self, prediction, target):
        inside = jnp.maximum(prediction[0] - 0.5, 1.0 - prediction[1])  # < 0 in the band
        return jnp.sum((prediction - target) ** 2) + 0.0 * jnp.sqrt(inside)


T1 = 3.0
N_SAVE = 11
# Members for the NaN tests (target y = 0, λ = 0: w(t) = w₀e^{−2t}, straight to 0):
# 0 and 4 never enter the band; 1 enters it at t* = ln(4)/2 (w₁ = 0.5, w₂ = 1.5 > 1);
# 2 starts in it (its loss is NaN at finite parameters); 3 starts with a NaN parameter.
NAN_STARTS = [(2.0, 3.0), (2.0, 6.0), (0.4, 2.0), (np.nan, 1.0), (1.0, 1.5)]
T_STAR = np.log(4.0) / 2


def _problem(starts, target):
    data = cn.Dataset(jnp.ones((1, 1)), jnp.asarray([target], float))
    ensemble = cn.Ensemble.stack([cn.DeepLinear([jnp.asarray([[a], [b]])]) for a, b in starts])
    return ensemble, cn.make_objective(BandLoss(), data, ensemble)


def _closed_form_loss(starts, target, weight_decay, t):
    """L(t) = ‖w(t) − y‖² of each member, shape (B, T) (numpy)."""
    w0, y = np.asarray(starts, float), np.asarray(target, float)
    w_inf = 2 * y / (2 + weight_decay)
    w = w_inf + (w0 - w_inf)[:, None, :] * np.exp(-(2 + weight_decay) * np.asarray(t))[:, None]
    return np.sum((w - y) ** 2, axis=-1)


def _flow(ensemble, objective, batch_size, t1=T1, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cn.gradient_flow(objective, ensemble, t1, solver="tsit5", n_save=N_SAVE,
                                  batch_size=batch_size, **kwargs)
    return result, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def nan_runs():
    ensemble, objective = _problem(NAN_STARTS, (0.0, 0.0))
    return {b: _flow(ensemble, objective, b) for b in (1, 2)}


@pytest.mark.parametrize("batch_size", [1, 2], ids=["one-at-a-time", "lanes"])
def test_nan_loss_stops_that_member_as_diverged(nan_runs, batch_size):
    """Before: the members whose loss is NaN ran 100 000 steps to `max_steps` (warned as
    stiff); their neighbours were unaffected. Now each stops as `diverged` where its loss
    became NaN (0 steps when it starts there), and only there."""
    result, caught = nan_runs[batch_size]
    assert result.status_names() == ["success", "diverged", "diverged", "diverged", "success"]
    steps = np.asarray(result.num_steps)
    assert steps[2] == steps[3] == 0
    # Member 1: ~30 steps to the band's edge, then rejections shrinking the step 5× each
    # (and steps creeping up to the edge) until a step of ≤ 1e-12 is let into the band.
    assert steps[1] < 300, steps
    assert not any("max_steps" in m for m in caught), caught  # no stiffness warning
    loss = np.asarray(result.loss)
    expected = _closed_form_loss(NAN_STARTS, (0.0, 0.0), 0.0, result.t)
    ok = [0, 4]
    np.testing.assert_allclose(loss[ok], expected[ok], rtol=1e-6)
    before = np.asarray(result.t) < T_STAR  # saves before member 1 entered the band
    np.testing.assert_allclose(loss[1, before], expected[1, before], rtol=1e-6)
    assert not np.any(np.isfinite(loss[1, ~before]))
    assert not np.any(np.isfinite(loss[2:4]))  # no loss reported for what never ran
    final = np.asarray(result.final.models.weights[0])[..., 0]
    np.testing.assert_array_equal(final[2], NAN_STARTS[2])  # stopped where it started
    assert np.all(np.isfinite(final[[0, 4]])) and not np.all(np.isfinite(final[1]))
    assert result.summary()["status"]["diverged"] == 3


def _linear_solves(solver, t1, band):
    """diffrax solves of dy/dt = −r·y (r = 0.1…1e3, and 1e8 for the stabilised solver: steps
    beyond its stability interval), NaN where `band` and y₅ < 0.5 < 1 < y₀ (entered at
    t = ln 2 / 1e3), stopped by an event on a non-finite y: with `step_size_controller` and
    with diffrax's PIDController of the same coefficients."""
    stiff = isinstance(solver, cn.StabilizedRK)
    rates = jnp.asarray([0.1, 0.3, 1.0, 10.0, 100.0, 1e3, 1e8 if stiff else 1.0])
    y0 = jnp.asarray([3.0, 1, 1, 1, 1, 1, 1])

    def field(t, y, args):
        inside = args & (y[5] < 0.5) & (y[0] > 1.0)
        return -rates * y + jnp.where(inside, jnp.nan, 0.0)

    pid = dict(pcoeff=0.2, icoeff=0.6) if stiff else {}
    return [dfx.diffeqsolve(dfx.ODETerm(field), solver, 0.0, t1, 0.01, y0, args=jnp.asarray(band),
                            max_steps=3000, throw=False, stepsize_controller=controller,
                            event=dfx.Event(lambda t, y, args, **kw: ~jnp.all(jnp.isfinite(y))))
            for controller in (cn.step_size_controller(solver, 1e-8, 1e-8),
                               dfx.PIDController(rtol=1e-8, atol=1e-8, **pid))]


@pytest.mark.parametrize("solver, t1", [(dfx.Tsit5(), 2.0), (cn.StabilizedRK(), 0.1)],
                         ids=["tsit5", "stabilized"])
def test_stop_on_non_finite(solver, t1):
    """On a finite stiff flow `step_size_controller` takes exactly diffrax's PIDController's
    steps; where the field is NaN it stops the solve (the event), where diffrax's rejects
    every step to `max_steps` (the stabilised solver used to return such a step as y0 with a
    finite error, and crept up to the NaN region)."""
    ours, theirs = _linear_solves(solver, t1, False)
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    assert int(ours.stats["num_rejected_steps"]) > 0  # the stiff part limits the steps
    assert ours.result == theirs.result == dfx.RESULTS.successful
    # Equal to round-off: the two controllers are compiled into different fusions. The
    # round-off of hundreds of stages is relative to the start's scale (|y₀| ≤ 3), not to a
    # component decayed to e⁻¹⁰ (on an H200: 7e-14 apart at 4.5e-5, 1.5e-9 relative).
    np.testing.assert_allclose(ours.ys, theirs.ys, rtol=1e-9, atol=1e-12)
    ours, theirs = _linear_solves(solver, t1, True)
    assert ours.result == dfx.RESULTS.event_occurred and bool(ours.event_mask)
    assert int(ours.stats["num_steps"]) < 300
    # It stops at the band's edge (as computed: to within the solution's global error).
    assert float(ours.ts[-1]) == pytest.approx(np.log(2) / 1e3, rel=1e-4)
    assert theirs.result == dfx.RESULTS.max_steps_reached


# -- the loss-increase rule


def test_loss_increase_rule_at_its_threshold():
    loss = np.array([
        [1.0, 0.5, 9.9],        # 9.9× its start: success
        [1.0, 0.5, 10.1],       # 10.1×: loss_increased
        [1.0, 1e3, 2.0],        # a transient spike that comes back: success
        [0.0, 0.0, 1e-3],       # from an exact fit: increased
        [-1.0, -1.0, 5.0],      # a negative start gives no scale: untouched
        [1.0, 1.0, np.inf],     # non-finite end: untouched (that is `diverged`'s business)
        [1.0, 1.0, 50.0],       # increased, but the run already has another status
    ])
    status = np.array([0, 0, 0, 0, 0, 0, 1])
    first, last = loss[:, 0], loss[:, -1]
    with np.errstate(invalid="ignore"):
        flagged = ((status == 0) & np.isfinite(first) & np.isfinite(last) & (first >= 0)
                   & (last > 10 * first))
    expected = np.where(flagged, 4, status)
    np.testing.assert_array_equal(expected, [0, 4, 0, 4, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(mark_loss_increased(loss, status)), expected)
    assert cn.STATUS_NAMES[4] == "loss_increased"


# Weight decay λ = 1 pulls every member to w∞ = 2y/3, whose loss is ‖y‖²/9 = 5/9.
GROWTH_STARTS = [(1.0, 2.0), (1.1, 2.2), (1.2, 2.4), (2.0, 3.0), (3.0, 5.0)]
TARGET = (1.0, 2.0)


@pytest.mark.parametrize("batch_size", [1, 2], ids=["one-at-a-time", "lanes"])
def test_flow_whose_loss_ends_far_above_its_start_is_named(batch_size):
    """Members starting at or near the fit end at loss 5/9 (∞×, 11× their start):
    `loss_increased` (before: `success`); the others end below or near their start."""
    ensemble, objective = _problem(GROWTH_STARTS, TARGET)
    result, _ = _flow(ensemble, objective, batch_size, field=cn.GradientField(1.0))
    expected = _closed_form_loss(GROWTH_STARTS, TARGET, 1.0, result.t)
    loss = np.asarray(result.loss)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-12)
    increased = expected[:, -1] > 10 * expected[:, 0]  # the rule, on the closed form
    np.testing.assert_array_equal(increased, [True, True, False, False, False])
    assert result.status_names() == ["loss_increased" if i else "success" for i in increased]
    assert result.summary()["status"]["loss_increased"] == 2


# -- arguments


def test_tolerances_that_cannot_give_a_drift_are_refused(nan_runs):
    ensemble, objective = _problem(NAN_STARTS, (0.0, 0.0))
    # Before: rtol=inf reported `success` with the loss 3.36 → 5e28, rtol=10 with 3.36 → 18.3.
    for kwargs in (dict(rtol=np.inf), dict(rtol=10.0), dict(rtol=0.02), dict(rtol=0.01),
                   dict(atol=0.02), dict(rtol=np.array([1e-8, 0.5])), dict(rtol=np.nan)):
        name = next(iter(kwargs))
        with pytest.raises(cn.ArgumentError, match=f"`{name}` must be a finite real number in "
                                                   r"\(0, 0.01\)"):
            cn.gradient_flow(objective, ensemble, 1.0, **kwargs)
    # Just below the bound it runs (the compiled program of `nan_runs`: rtol is traced).
    result, _ = _flow(ensemble, objective, 2, rtol=0.009)
    assert result.status_names()[0] == "success"
    assert np.asarray(result.num_steps)[0] < np.asarray(nan_runs[2][0].num_steps)[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(t1=np.inf), "`t1` must be a finite real number > 0, got inf"),
    (dict(t1="1.0"), "`t1` must be a finite real number > 0, got '1.0'"),
    (dict(t1=np.nan), "`t1` must be"),
    (dict(t1=0.0), "`t1` must be"),
    (dict(divergence=np.nan), "`divergence` must be a finite real number > 0, got nan"),
    (dict(divergence=-1.0), "`divergence` must be"),
    (dict(n_save=1), "`n_save` must be an int ≥ 2"),
    (dict(n_save=11.0), "`n_save` must be an int"),
    (dict(max_steps=0), "`max_steps` must be an int ≥ 1"),
    (dict(max_steps=True), "`max_steps` must be an int"),
    (dict(batch_size=0), "`batch_size` must be an int ≥ 1"),
    (dict(solver="rk45"), "`solver` must be one of"),
    (dict(solver=dfx.Euler()), "`solver` Euler gives no error estimate"),
    (dict(field="gradient"), "`field` must be an `AbstractVectorField`"),
    (dict(progress="yes"), "`progress` must be True, False or None"),
    (dict(values="everything"), "`values` must be 'none', 'final', 'all'"),
    (dict(values=3), "`values` must be 'none', 'final', 'all'"),
    (dict(values=["nope"]), "`values` names \\['nope'\\]"),
    (dict(laws=[cn.BalanceLaw(5)]), "`laws`"),
    (dict(objective="mse"), "`objective` must come from"),
])
def test_flow_arguments_are_refused_by_name(kwargs, match):
    ensemble, objective = _problem(GROWTH_STARTS[:2], TARGET)
    args = dict(objective=objective, t1=1.0) | kwargs
    with pytest.raises(cn.ArgumentError, match=match):
        cn.gradient_flow(args.pop("objective"), ensemble, args.pop("t1"), **args)


def test_vector_field_values_are_refused_by_name():
    for make, match in ((lambda: cn.GradientField(weight_decay=np.nan), "`weight_decay`"),
                        (lambda: cn.GradientField(weight_decay=-0.1), "`weight_decay`"),
                        (lambda: cn.ModifiedGradientField(lr=-0.1), "`lr` must be"),
                        (lambda: cn.ModifiedGradientField(lr=0.1, momentum=1.0), "`momentum`")):
        with pytest.raises(cn.ArgumentError, match=match):
            make()


# -- accuracy


def test_final_losses_below_the_accuracy_floor_are_flagged(nan_runs):
    """`below_accuracy`: |L_final| < 1e-14·|L_0|. Hand-made losses either side of the floor,
    then a flow run to t1 = 10, where the closed-form loss has fallen by e^{−40} = 4e-18."""
    loss = np.array([[1.0, 5.2e-31], [2.0, 1.9e-14], [2.0, 2.1e-14], [0.0, 0.0],
                     [1.0, np.inf], [1.0, -1e-20]])
    np.testing.assert_array_equal(below_accuracy(loss),
                                  [True, True, False, False, False, True])
    ensemble, objective = _problem(NAN_STARTS, (0.0, 0.0))
    result, _ = _flow(ensemble, objective, 2, t1=10.0)  # the compiled program of `nan_runs`
    expected = _closed_form_loss(NAN_STARTS, (0.0, 0.0), 0.0, result.t)
    ok = np.asarray(result.status) == 0
    assert ok.tolist() == [True, False, False, False, True]
    assert np.all(expected[ok, -1] < 1e-14 * expected[ok, 0])
    assert result.summary()["final_loss_below_accuracy"] == 2
    # At t1 = 3 the loss has fallen by e^{−12} = 6e-6 only: nothing to flag.
    assert nan_runs[2][0].summary()["final_loss_below_accuracy"] == 0


def test_summary_of_observables_when_no_member_ran_to_the_end():
    """Every member diverged: the observables' medians are None (nothing to take them over),
    not a crash; a vector observable gives one None per component."""
    b, t = 2, 3
    result = cn.Result(
        t=np.linspace(0, 1, t), loss=np.full((b, t), np.nan), values={}, drift={},
        max_drift={}, condition={}, final=None, status=np.array([2, 2]),
        num_steps=np.zeros(b, int),
        observables={"sharpness": np.ones((b, t, 2)), "gradient_norm": np.ones((b, t))})
    summary = result.summary()
    assert summary["observables_final_median"] == {"sharpness": [None, None],
                                                   "gradient_norm": None}
    assert summary["status"]["diverged"] == 2


def test_a_candidate_is_non_finite_when_any_entry_is_inf_or_nan():
    """`StopOnNonFinite` rejects a step whose candidate has any non-finite entry, NaN, +inf
    or −inf, alone in a vector of finite numbers (and accepts it once the step is below the
    floor: the member then stops as diverged); a candidate of huge finite entries, whose sum
    overflows, is finite and controlled as diffrax's controller controls it."""
    controller = cn.step_size_controller(dfx.Tsit5(), 1e-8, 1e-8)
    pid = dfx.PIDController(rtol=1e-8, atol=1e-8)
    y0 = jnp.asarray([1e308, 1e308, 1.0])
    error = jnp.full(3, 1e-20)
    term = dfx.ODETerm(lambda t, y, args: -y)
    _, state = pid.init(term, 0.0, 1.0, y0, 0.1, None, dfx.Tsit5().func, 5)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        y1 = y0.at[2].set(bad)
        for h, kept in ((0.1, False), (1e-13, True)):
            keep, *_ = controller.adapt_step_size(0.0, h, y0, y1, None, error, 5, state)
            assert bool(keep) is kept, (bad, h)
    ours = controller.adapt_step_size(0.0, 0.1, y0, y0, None, error, 5, state)
    theirs = pid.adapt_step_size(0.0, 0.1, y0, y0, None, error, 5, state)
    assert bool(ours[0]) and bool(theirs[0])
    np.testing.assert_array_equal(ours[2], theirs[2])  # the same next step


@pytest.mark.parametrize("coefficients", [{}, dict(pcoeff=0.2, icoeff=0.6),
                                          dict(pcoeff=0.1, icoeff=0.3, dcoeff=0.05)],
                         ids=["integral", "chebyshev_pi", "pid"])
def test_controller_is_diffraxs_pid_to_the_bit(coefficients):
    """`step_size_controller` computes diffrax's `PIDController.adapt_step_size` itself (its
    candidate's finiteness folded into the error norm): on finite candidates, with scaled
    errors from 1e-8 to 2.3 (steps accepted and rejected), after steps of both kinds, every
    one of diffrax's results is equal to the bit."""
    ours = StopOnNonFinite(dfx.PIDController(rtol=1e-6, atol=1e-8, **coefficients))
    pid = dfx.PIDController(rtol=1e-6, atol=1e-8, **coefficients)
    rng = np.random.default_rng(0)
    kept = set()
    for scale in (1e-14, 1e-11, 1e-8, 1e-5):
        y0 = jnp.asarray(rng.normal(size=(5,)) * 3)
        y1 = y0 + jnp.asarray(rng.normal(size=(5,)) * 1e-2)
        error = jnp.asarray(rng.normal(size=(5,)) * scale)
        # the errors of the last two steps (1/scaled error), as after accepted steps and
        # after a rejection
        for state in ((jnp.asarray(0.7), jnp.asarray(1.3), jnp.asarray(False)),
                      (jnp.asarray(2.0), jnp.asarray(0.4), jnp.asarray(False))):
            a = ours.adapt_step_size(0.25, 0.5, y0, y1, None, error, 5, state)
            b = pid.adapt_step_size(0.25, 0.5, y0, y1, None, error, 5, state)
            assert bool(a[0]) == bool(b[0]) and a[3] is b[3] is False and a[5] == b[5]
            for x, y in zip(jax.tree.leaves(a[1:3] + a[4:5]), jax.tree.leaves(b[1:3] + b[4:5])):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            kept.add(bool(a[0]))
    assert kept == {True, False}


def test_controller_reads_the_candidate_once():
    """The controller's step reads the candidate y₁ in one reduction over the state (its
    error norm, which also tells whether y₁ is finite), not in three (a finiteness check, the
    wrapped controller's `isnan(y1).any()` and the norm): counted in its jaxpr, where a
    controller that wraps diffrax's counts three."""
    y0, y1, error = jnp.ones(64), jnp.full(64, 1.5), jnp.full(64, 1e-9)
    state = (jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(False))

    def reductions(controller):
        jaxpr = jax.make_jaxpr(lambda *a: controller.adapt_step_size(0.0, 0.1, *a, 5, state))(
            y0, y1, None, error)
        return sum(e.primitive.name.startswith(("reduce_", "dot_general", "argmax"))
                   and any(getattr(v.aval, "size", 0) >= 64 for v in e.invars)
                   for e in _equations(jaxpr.jaxpr))

    assert reductions(cn.step_size_controller(dfx.Tsit5(), 1e-8, 1e-8)) == 1
    # diffrax's controller alone: its `isnan(y1).any()` and its norm
    assert reductions(dfx.PIDController(rtol=1e-8, atol=1e-8)) == 2
    # wrapped (with a `dtmax`, which the controller leaves to diffrax): three
    assert reductions(StopOnNonFinite(dfx.PIDController(rtol=1e-8, atol=1e-8,
                                                           dtmax=1.0))) == 3


def _equations(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _equations(sub)


def test_non_finite_error_of_a_finite_candidate_is_a_rejection():
    """A NaN error estimate of a finite candidate (a solver's failed error estimate) is an
    infinite error: the step is rejected by the controller's smallest factor, as diffrax's
    loop treats it (`diffeqsolve` makes a NaN error infinite), not a NaN next step."""
    controller = cn.step_size_controller(dfx.Tsit5(), 1e-8, 1e-8)
    state = (jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(False))
    y0 = jnp.ones(3)
    keep, t0, t1, *_ = controller.adapt_step_size(0.0, 0.1, y0, y0, None,
                                                  jnp.asarray([0.0, jnp.nan, 0.0]), 5, state)
    assert not bool(keep) and float(t0) == 0.0
    assert float(t1) == pytest.approx(0.1 * 0.2)  # factormin


def test_controller_of_a_float32_state_under_strict_promotion():
    """A float32 state with float64 tolerances, with JAX's strict dtype promotion on (a
    user's setting): the controller promotes as diffrax's does, and its step is diffrax's."""
    tolerance = jnp.asarray(1e-6, jnp.float64)  # not weakly typed, as a flow's are
    pid = dfx.PIDController(rtol=tolerance, atol=tolerance)
    controller = StopOnNonFinite(pid)
    y0 = jnp.ones(4, jnp.float32)
    state = (jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(False))
    with jax.numpy_dtype_promotion("strict"):
        ours = controller.adapt_step_size(0.0, 0.1, y0, y0 * 1.001, None,
                                          jnp.full(4, 1e-7, jnp.float32), 5, state)
        theirs = pid.adapt_step_size(0.0, 0.1, y0, y0 * 1.001, None,
                                     jnp.full(4, 1e-7, jnp.float32), 5, state)
    assert bool(ours[0]) and bool(theirs[0])
    np.testing.assert_array_equal(np.asarray(ours[2]), np.asarray(theirs[2]))
