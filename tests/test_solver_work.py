"""Solvers checked by their work, not only by their answer: the vector-field evaluations a step
makes, counted at run time (a `jax.debug.callback` in the field fires once per evaluation,
inside loops and under `jax.jvp` alike), against each method's definition.

A method that takes one stage fewer can still meet its tolerance — by taking more steps — so
accuracy tests alone do not see it; the counts below do.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._dynamics.flow import SOLVERS

INIT_ITERATIONS = 20  # power iterations at a Chebyshev solver's start (its default)
_calls = []


def _record():
    _calls.append(1)


def counted_field(t, y, lam):
    """dy/dt = −λy, recording every evaluation when it runs."""
    del t
    jax.debug.callback(_record)
    return -lam * y


def evaluations(fn, *args):
    """(fn(*args), how many times the field ran)."""
    _calls.clear()
    out = jax.block_until_ready(fn(*args))
    jax.effects_barrier()  # every callback has run
    return out, len(_calls)


@eqx.filter_jit
def chebyshev_step(solver, h):
    """`solver.init` then one step of size h on dy/dt = −y (y ∈ R⁴), whose Jacobian −I has
    spectral radius exactly 1: the step's h·ρ is h × `safety` (1.2), whatever the power
    iteration's start."""
    term = dfx.ODETerm(counted_field)
    y0 = jnp.arange(1.0, 5.0)
    state = solver.init(term, 0.0, h, y0, 1.0)
    y1, _, _, state, _ = solver.step(term, 0.0, h, y0, 1.0, state, False)
    return y1, state


# ROCK4 (Abdulle 2002; the degree as in Abdulle's code): m = ⌊√((3 + h·ρ)/0.353)⌋ + 1,
# m = max(m, 5) − 4, and the degree s is the smallest tabulated degree ≥ m (1 … 20, 22, 24, …,
# 38, 41, …, 59, 63, 67, 71, 76, …). E.g. h·ρ = 10: ⌊√(13/0.353)⌋ = ⌊6.07⌋ = 6 → m = 7 − 4 = 3;
# h·ρ = 2000: ⌊√(2003/0.353)⌋ = ⌊75.3⌋ = 75 → m = 72 → s = 76.
ROCK4_DEGREES = [(3.0, 1), (10.0, 3), (40.0, 8), (100.0, 14), (400.0, 30), (2000.0, 76)]
# RKC (Sommeijer, Shampine & Verwer 1997): s = 1 + ⌊√(1 + 1.54·h·ρ)⌋ stages (at least 2).
# E.g. h·ρ = 10: 1 + ⌊√16.4⌋ = 5; h·ρ = 1000: 1 + ⌊√1541⌋ = 1 + 39 = 40.
# (1.5 and 5.0 sit just below a jump of the floor: 1 + 1.54·h·ρ = 3.31 and 8.7.)
RKC_STAGES = [(0.5, 2), (1.5, 2), (5.0, 3), (10.0, 5), (100.0, 13), (400.0, 25), (1000.0, 40)]


@pytest.mark.parametrize("h_rho, degree", ROCK4_DEGREES)
def test_rock4_step_evaluates_its_degree_plus_five(h_rho, degree):
    """A ROCK4 step of degree s: the Chebyshev stages y₁ … y_s need f(y₀) … f(y_{s−1}) (s
    evaluations, f(y₀) coming with the step's power iteration, a jvp), the 4-stage finishing
    procedure 4, and f(y₁) for the embedded error estimate 1: s + 5. The solver's own counts
    say the same: f-evaluations s + 4 and one jvp per step (after `init_iterations`)."""
    (_, state), calls = evaluations(chebyshev_step, cn.ROCK4(), jnp.asarray(h_rho / 1.2))
    assert calls == INIT_ITERATIONS + degree + 5
    assert int(state[3]) == degree + 4 and int(state[4]) == INIT_ITERATIONS + 1
    np.testing.assert_allclose(float(state[1]), 1.0, rtol=1e-14)  # ρ, the step's h·ρ/h/1.2


@pytest.mark.parametrize("h_rho, stages", RKC_STAGES)
def test_rkc_step_evaluates_its_stages_plus_one(h_rho, stages):
    """An RKC step with s stages: f(y₀) (from the power iteration's jvp), s − 1 stage
    evaluations and f(y₁) for its error estimate: s + 1; its own count says s f-evaluations
    and one jvp."""
    (_, state), calls = evaluations(chebyshev_step, cn.RKC(), jnp.asarray(h_rho / 1.2))
    assert calls == INIT_ITERATIONS + stages + 1
    assert int(state[3]) == stages and int(state[4]) == INIT_ITERATIONS + 1


def test_stabilized_step_works_as_rock4_below_its_switch_and_as_rkc_above():
    """`StabilizedRK` (switch h·ρ = 50): ROCK4's degree-8 step at h·ρ = 40 (8 + 5
    evaluations), RKC's 25 stages at h·ρ = 400 (25 + 1)."""
    for h_rho, step_calls in ((40.0, 8 + 5), (400.0, 25 + 1)):
        _, calls = evaluations(chebyshev_step, cn.StabilizedRK(), jnp.asarray(h_rho / 1.2))
        assert calls == INIT_ITERATIONS + step_calls, h_rho


@pytest.mark.parametrize("solver", [cn.ROCK4(max_stages=9), cn.RKC(max_stages=5)],
                         ids=["rock4", "rkc"])
def test_step_out_of_reach_is_rejected_without_stage_work(solver):
    """h·ρ = 100 is beyond ROCK4's reach with 9 stages (0.353·9² − 3 = 25.6) and RKC's with 5
    (1 + ⌊√155⌋ = 13 > 5): the step is rejected (y1 = y0 with a huge error) and evaluates
    only f(y₀), which comes with the power iteration's jvp; it records 0 f-evaluations and
    1 jvp. One stage or finishing evaluation more would be wasted work on every rejection."""
    (y1, state), calls = evaluations(chebyshev_step, solver, jnp.asarray(100.0 / 1.2))
    assert calls == INIT_ITERATIONS + 1
    assert int(state[3]) == 0 and int(state[4]) == INIT_ITERATIONS + 1
    np.testing.assert_array_equal(np.asarray(y1), np.arange(1.0, 5.0))


# Stages of each tableau, first same as last (the last stage's f(y₁) is the next step's first):
# Tsit5 (Tsitouras 2011) and Dopri5 (Dormand & Prince 1980) 7 stages, 6 new evaluations a step;
# Dopri8 (Prince & Dormand 1981, RK8(7)13M) 13 stages plus f(y₁): 13 new a step.
NEW_PER_STEP = {"tsit5": 6, "dopri5": 6, "dopri8": 13}


@pytest.mark.parametrize("name", sorted(NEW_PER_STEP))
def test_unrolled_tableaus_evaluate_their_stages_once_per_step(name):
    """Fixed steps: f(y₀) once at the start, then the new stages of every step."""
    solver = SOLVERS[name]()

    @jax.jit
    def solve(lam):
        return dfx.diffeqsolve(dfx.ODETerm(counted_field), solver, 0.0, 1.1, 0.1,
                               jnp.arange(1.0, 4.0), args=lam, saveat=dfx.SaveAt(t1=True),
                               stepsize_controller=dfx.ConstantStepSize()).stats["num_steps"]

    steps, calls = evaluations(solve, jnp.asarray(1.0))
    assert int(steps) == 11
    assert calls == 1 + NEW_PER_STEP[name] * 11


def test_adaptive_tsit5_pays_its_stages_for_rejected_steps_too():
    """An adaptive solve: every attempted step (accepted or rejected) evaluates 6 new stages,
    and nothing else is evaluated (no f(y₀) recomputed after an accepted step)."""
    @jax.jit
    def solve(lam):
        sol = dfx.diffeqsolve(dfx.ODETerm(counted_field), SOLVERS["tsit5"](), 0.0, 3.0, 0.01,
                              jnp.arange(1.0, 4.0), args=lam, saveat=dfx.SaveAt(t1=True),
                              stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8))
        return sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

    (accepted, rejected), calls = evaluations(solve, jnp.array([1.0, 10.0, 100.0]))
    assert int(rejected) > 0  # the count covers rejected steps
    assert calls == 1 + 6 * (int(accepted) + int(rejected))


@eqx.filter_jit
def _forced_step(solver, h):
    """One step of y₀' = −100 y₀ (from 0: it stays 0; it sets ρ = 100, so the step runs 5–13
    stages) and y₁' = cos t (the time dependence: exact y₁(h) = sin h)."""
    term = dfx.ODETerm(lambda t, y, args: jnp.stack([-100.0 * y[0], jnp.cos(t)]))
    y0 = jnp.zeros(2)
    state = solver.init(term, 0.0, h, y0.at[0].set(1e-300), None)  # the power iteration's v
    return solver.step(term, 0.0, h, y0, None, state, False)[0][1]


@pytest.mark.parametrize("solver, order, ratio, worst", [
    (cn.ROCK4(), 4, (20.0, 40.0), 1e-8), (cn.RKC(), 2, (6.0, 10.0), 2e-4)],
    ids=["rock4", "rkc"])
def test_stage_times_of_a_time_dependent_field(solver, order, ratio, worst):
    """Each stage evaluates the field at its own time: the local error of y₁' = cos t falls
    like h^(order + 1) (2⁵ = 32 and 2³ = 8 per halving, pre-asymptotically a bit less). A
    wrong stage time (an autonomous field never sees it) leaves the method of order ≤ 1."""
    errors = [abs(float(_forced_step(solver, jnp.asarray(h))) - np.sin(h)) for h in (0.2, 0.1)]
    assert ratio[0] < errors[0] / errors[1] < ratio[1], (order, errors)
    assert errors[1] < worst
    # The order the solver declares (diffrax's step-size controller reads it) is the measured
    # one.
    term = dfx.ODETerm(lambda t, y, args: -y)
    assert solver.order(term) == order


@eqx.filter_jit
def _error_estimate(solver, h):
    """The embedded error estimate of one step of the stiff-plus-forced system of
    `_forced_step`, with the forcing cos(t + 0.5) (cos t would zero the h⁴ term by symmetry)."""
    term = dfx.ODETerm(lambda t, y, args: jnp.stack([-100.0 * y[0], jnp.cos(t + 0.5)]))
    y0 = jnp.zeros(2)
    state = solver.init(term, 0.0, h, y0.at[0].set(1e-300), None)
    return solver.step(term, 0.0, h, y0, None, state, False)[1][1]


@pytest.mark.parametrize("solver", [cn.ROCK4(), cn.RKC()], ids=["rock4", "rkc"])
def test_declared_error_order_is_the_estimates_slope(solver):
    """The step-size controller scales h by (tol/err)^(1/error_order), so the declared
    `error_order` must be the order of the estimate: its measured slope over one halving of h
    (ROCK4 ≈ 4.0, RKC ≈ 2.9) lies within 0.35 of it."""
    errors = [abs(float(_error_estimate(solver, jnp.asarray(h)))) for h in (0.025, 0.0125)]
    slope = np.log2(errors[0] / errors[1])
    assert abs(slope - solver.error_order(None)) < 0.35, (slope, errors)


def test_the_auto_choice_sizes_stabilized_steps_by_the_rkc_stage_formula():
    """`choose_solver` calls a flow too stiff for the stabilised solver when t1·ρ divided by
    its largest step's h·ρ exceeds a quarter of `max_steps`: that h·ρ is where RKC's stage
    count 1 + ⌊√(1 + 1.54·h·ρ)⌋ (numpy here) reaches StabilizedRK's `max_stages`."""
    from conservation._dynamics.solvers import _stabilized_max_h_rho

    h_rho = _stabilized_max_h_rho()
    stages = cn.StabilizedRK().max_stages
    assert 1 + int(np.floor(np.sqrt(1.0 + 1.54 * h_rho) + 1e-12)) == stages
    assert 1 + int(np.floor(np.sqrt(1.0 + 1.54 * h_rho * (1 - 1e-6)))) == stages - 1
