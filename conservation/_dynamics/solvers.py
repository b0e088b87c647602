"""Stabilised explicit Runge–Kutta (ROCK4, RKC, both) for stiff gradient flows, and `"auto"`.

The Jacobian of gradient flow dθ/dt = −∇L(θ) is −∇²L: symmetric, with its spectrum on the
negative real axis. Near a minimum its largest eigenvalue ρ fixes the step of an explicit
method (Tsit5: h·ρ ≲ 3.3) however smooth the trajectory is. Chebyshev-type methods use s
stages whose stability interval along the negative real axis grows like s², so the
work per unit time grows like √ρ instead of ρ, with nothing but gradient evaluations (no
Jacobian, no linear solve, usable at any parameter count).

`ROCK4` is Abdulle's fourth-order orthogonal-Chebyshev method: an s-stage three-term
recurrence of orthogonal polynomials followed by a 4-stage finishing procedure, with an
embedded third-order error estimate (A. Abdulle, "Fourth order Chebyshev methods with
recurrence relation", SIAM J. Sci. Comput. 23 (2002) 2041–2054; the stage choice follows
Abdulle's ROCK4 code as in Julia's OrdinaryDiffEq.jl). The coefficient tables are in
`rock4_coefficients.py`. `RKC` is the second-order damped Runge–Kutta–Chebyshev method
(Sommeijer, Shampine & Verwer 1997), whose coefficients are closed-form Chebyshev values.
`StabilizedRK` (`solver="stabilized"`) takes ROCK4 steps where accuracy limits the step and
RKC steps where stability does."""

import abc
from collections.abc import Callable
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from equinox import internal as eqxi

from .._validation import as_float64
from . import rock4_coefficients as _tables
from .lockstep import _clip_floor, attempt_step

_MS = np.asarray(_tables.MS, np.int32)  # Chebyshev degrees with tabulated coefficients (1..148)
# Offset of each degree's coefficients in RECF:
_STARTS = np.concatenate([[0], np.cumsum(2 * _MS - 1)[:-1]]).astype(np.int32)
_RECF = np.asarray(_tables.RECF)
_FPA = np.asarray(_tables.FPA).reshape(-1, 6)
_FPB = np.asarray(_tables.FPB).reshape(-1, 4)
_FPBE = np.asarray(_tables.FPBE).reshape(-1, 5)
_MAX_STAGES = int(_MS[-1]) + 4  # 152
# The stability interval of degree-s ROCK4 is about [−0.353·s², 0]; ROCK4 asks
# (3 + h·ρ) ≤ 0.353·s² (Abdulle's code), so the largest h·ρ it can take is:
_MAX_H_RHO = 0.353 * _MAX_STAGES**2 - 3.0


def _unit(x):
    norm = jnp.linalg.norm(x)
    return x / jnp.where(norm > 0, norm, 1.0), norm


class AbstractChebyshevSolver(dfx.AbstractAdaptiveSolver):
    """A stabilised explicit Runge–Kutta (Chebyshev) method for stiff flows whose Jacobian has
    real (or nearly real) eigenvalues, above all gradient flow, whose Jacobian −∇²L is
    symmetric: each step's stage count comes from the Jacobian's spectral radius ρ.

    ρ is estimated by power iteration with Jacobian-vector products (a `jax.jvp` of the
    vector field, for gradient flow a Hessian-vector product), warm-started from the previous
    step's vector: one product per step (which also returns f(y₀)), `init_iterations` at the
    start; the estimate is multiplied by `safety`. A step with h·ρ beyond the largest stability
    interval is rejected so that the step-size controller shrinks it. Dense output (for
    `SaveAt(ts=...)`) is the cubic Hermite interpolant of y and f at both ends of a step. The
    solver works on an array state (gradient_flow integrates the flat parameter vector); use it
    with `step_size_controller`, as `gradient_flow` does.

    The state carries (power-iteration vector, ρ, the largest ρ seen, f-evaluations, jvps) —
    the counts cover accepted steps only (diffrax discards the state of a rejected step).
    """

    safety: float = 1.2
    init_iterations: int = eqx.field(default=20, static=True)

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., dfx.ThirdOrderHermitePolynomialInterpolation]] = (
        dfx.ThirdOrderHermitePolynomialInterpolation
    )

    @abc.abstractmethod
    def _advance(self, terms, t0, t1, y0, f0, h_rho, args):
        """One step from (t0, y0) with f0 = f(t0, y0) and h·ρ = `h_rho` (safety included):
        (y1, error estimate, f(t1, y1), f-evaluations made, whether h·ρ is out of reach)."""

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _jvp(self, terms, t, y, v, args):
        return jax.jvp(lambda z: terms.vf(t, z, args), (y,), (v,))

    def init(self, terms, t0, t1, y0, args):
        # A fixed pseudo-random start has a component along the top eigenvector almost surely
        # (the gradient itself need not: near a minimum it lies in the slow directions).
        flat, unravel = jfu.ravel_pytree(y0)
        v = unravel(_unit(jax.random.normal(jax.random.PRNGKey(0), flat.shape, flat.dtype))[0])

        def power(_, carry):
            v, _ = carry
            _, jv = self._jvp(terms, t0, y0, v, args)
            v, rho = _unit(jv)
            return v, rho

        v, rho = jax.lax.fori_loop(0, self.init_iterations, power, (v, jnp.zeros(())))
        zero = jnp.zeros((), jnp.int32)
        return v, rho, rho, zero, jnp.asarray(self.init_iterations, jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump  # f(y0) is recomputed every step (the jvp below returns it for free)
        v, _, rho_max, n_f, n_jvp = solver_state
        # One warm-started power iteration: ‖J v‖ ≤ ρ for a unit v, tight once v has
        # converged to the top eigenvector; `safety` covers the rest.
        f0, jv = self._jvp(terms, t0, y0, v, args)
        v, rho = _unit(jv)
        rho_max = jnp.maximum(rho_max, rho)
        y1, y_error, f1, evaluations, too_stiff = self._advance(
            terms, t0, t1, y0, f0, (t1 - t0) * self.safety * rho, args)
        # Beyond the stability interval the result is meaningless: reject, so that the
        # controller shrinks h (by its largest factor). y1 goes back to y0 too: diffrax scales
        # the error by rtol·max(|y0|, |y1|), so an overflowed y1 (1000 RKC stages past their
        # interval reach inf) would make any error look like zero and the step be accepted.
        y1, f1 = jnp.where(too_stiff, y0, y1), jnp.where(too_stiff, f0, f1)
        y_error = jnp.where(too_stiff, 1e10 * (1.0 + jnp.abs(y0)), y_error)
        # Within it, a non-finite result (the field is non-finite at y0 or near it: a NaN
        # loss) is returned as NaN with an infinite error: diffrax's controller rejects it
        # (it scales the error by y0 where y1 has a NaN; an inf y1 would make any error look
        # like zero), and `StopOnNonFinite` lets it through once the step is tiny, so that
        # the run stops as diverged instead of rejecting every step.
        bad = ~too_stiff & ~jnp.all(jnp.isfinite(y1)) | ~jnp.all(jnp.isfinite(f0))
        y1, f1 = jnp.where(bad, jnp.nan, y1), jnp.where(bad, f0, f1)
        y_error = jnp.where(bad, jnp.inf, y_error)
        h = t1 - t0
        dense_info = dict(y0=y0, y1=y1, k0=h * f0, k1=h * f1)
        state = (v, rho, rho_max, n_f + evaluations.astype(n_f.dtype), n_jvp + 1)
        return y1, y_error, dense_info, state, dfx.RESULTS.successful


def _chebyshev_advance(terms, t0, t1, y0, f0, h_rho, args, use_rkc, rock4_stages, rkc_stages):
    """One step of ROCK4 or, where `use_rkc`, of RKC, from (t0, y0) with f0 = f(t0, y0):
    (y1, error estimate, f(t1, y1), f-evaluations, whether h·ρ = `h_rho` is out of reach).

    Both are a three-term Chebyshev recurrence y_j = α_j·h·f(y_{j−1}) + β_j y_{j−1} +
    γ_j y_{j−2} + δ_j y0 + ε_j·h·f0 started by y_1 = y0 + μ_1·h·f0, so they share one stage
    loop, whose coefficients are picked per stage, and one finishing loop (ROCK4: its 4-stage
    finishing procedure then f(y1); RKC: f(y1) only). Written without `lax.cond`: under vmap
    a cond runs both branches, and even unbatched it cost ~40% (it blocks XLA's fusion
    across the branch); here a batch of members pays the largest stage count among them, once.

    - ROCK4 (Abdulle 2002; stage choice as Abdulle's code): degree from (3 + h·ρ) ≤ 0.353·s²,
      α = μ_j, β = 1 + κ_j, γ = −κ_j, δ = ε = 0 (tabulated μ_j, κ_j); embedded order-3 estimate.
    - RKC (Sommeijer, Shampine & Verwer 1997, their `step` routine): s = 1 + ⌊√(1 + 1.54·h·ρ)⌋,
      damping 2/13, α = μ̃_j, β = μ_j, γ = ν_j, δ = 1 − μ_j − ν_j, ε = −μ̃_j·a_{j−1}, from the
      Chebyshev values T_j, T_j', T_j'' at w0 carried through the loop; RKC's error estimate
      0.8(y0 − y1) + 0.4·h·(f0 + f1).
    """
    h = t1 - t0
    dtype = y0.dtype
    # ROCK4: its degree and coefficient rows.
    mdeg = jnp.floor(jnp.sqrt((3.0 + h_rho) / 0.353)).astype(jnp.int32) + 1
    mdeg = jnp.clip(mdeg, 5, rock4_stages) - 4
    index = jnp.searchsorted(jnp.asarray(_MS), mdeg, side="left")
    deg = jnp.asarray(_MS)[index]
    start = jnp.asarray(_STARTS)[index]
    recf = jnp.asarray(_RECF)
    # RKC: its stage count and the Chebyshev constants w0, w1.
    stages = 1 + jnp.floor(jnp.sqrt(1.0 + 1.54 * h_rho)).astype(jnp.int32)
    too_stiff = jnp.where(use_rkc, stages > rkc_stages,
                          h_rho > 0.353 * rock4_stages**2 - 3.0)
    stages = jnp.clip(stages, 2, rkc_stages)
    sf = stages.astype(dtype)
    w0 = 1.0 + 2.0 / (13.0 * sf**2)
    temp1 = w0**2 - 1.0
    temp2 = jnp.sqrt(temp1)
    arg = sf * jnp.log(w0 + temp2)
    w1 = jnp.sinh(arg) * temp1 / (jnp.cosh(arg) * sf * temp2 - w0 * jnp.sinh(arg))
    b1 = 1.0 / (2.0 * w0) ** 2  # b_0 = b_1 = b_2 = T₂''(w0)/T₂'(w0)²

    mu1 = jnp.where(use_rkc, w1 * b1, recf[start])
    one, zero = jnp.ones_like(w0), jnp.zeros_like(w0)
    # Carry: y_{j−1}, y_{j−2}, their times (RKC: fractions of h), then RKC's b_{j−1},
    # b_{j−2}, T, T', T'' at w0 for j − 1 and j − 2.
    first = (y0 + h * mu1 * f0, y0, jnp.where(use_rkc, mu1, t0 + h * mu1),
             jnp.where(use_rkc, zero, t0), b1, b1, w0, one, one, zero, zero, zero)

    def stage(j, carry):
        y_1, y_2, t_1, t_2, b_1, b_2, z_1, z_2, dz_1, dz_2, d2z_1, d2z_2 = carry
        # RKC's coefficients (Chebyshev recurrences at w0).
        z = 2.0 * w0 * z_1 - z_2
        dz = 2.0 * w0 * dz_1 - dz_2 + 2.0 * z_1
        d2z = 2.0 * w0 * d2z_1 - d2z_2 + 4.0 * dz_1
        b = d2z / dz**2
        a_1 = 1.0 - z_1 * b_1
        mu = 2.0 * w0 * b / b_1
        nu = -b / b_2
        mu_tilde = mu * w1 / w0
        # ROCK4's (tabulated).
        mu4, kappa = recf[start + 2 * j - 3], recf[start + 2 * j - 2]
        alpha = jnp.where(use_rkc, mu_tilde, mu4)
        beta = jnp.where(use_rkc, mu, 1.0 + kappa)
        gamma = jnp.where(use_rkc, nu, -kappa)
        delta = jnp.where(use_rkc, 1.0 - mu - nu, 0.0)
        epsilon = jnp.where(use_rkc, -mu_tilde * a_1, 0.0)
        f = terms.vf(jnp.where(use_rkc, t0 + h * t_1, t_1), y_1, args)
        y = h * alpha * f + beta * y_1 + gamma * y_2 + delta * y0 + h * epsilon * f0
        t = jnp.where(use_rkc, mu * t_1 + nu * t_2 + mu_tilde * (1.0 - a_1),
                      h * mu4 + (1.0 + kappa) * t_1 - kappa * t_2)
        return y, y_1, t, t_1, b, b_1, z, z_1, dz, dz_1, d2z, d2z_1

    # A step out of reach is rejected whatever it computes: skip its stages.
    last = jnp.where(too_stiff, 1, jnp.where(use_rkc, stages, deg))
    u, _, tu, *_ = jax.lax.fori_loop(2, last + 1, stage, first)

    # ROCK4's 4-stage finishing procedure, then f(y1): evaluations 0..4, looped so that the
    # vector field (a gradient) is traced, and compiled, once; RKC runs evaluation 4 only,
    # with y1 = u.
    fpa, b = jnp.asarray(_FPA)[index], jnp.asarray(_FPB)[index]
    be = jnp.asarray(_FPBE)[index]
    zero4 = jnp.zeros_like(b[0])
    # Row j: coefficients of k_0..k_3 in the input of evaluation j (row 4: y1).
    a = h * jnp.stack([
        jnp.stack([zero4, zero4, zero4, zero4]),
        jnp.stack([fpa[0], zero4, zero4, zero4]),
        jnp.stack([fpa[1], fpa[2], zero4, zero4]),
        jnp.stack([fpa[3], fpa[4], fpa[5], zero4]),
        jnp.where(use_rkc, 0.0, b),
    ])
    c = jnp.sum(a, axis=1)

    def finishing(j, ks):
        y = u + jnp.tensordot(a[j], ks[:4], axes=1)
        t = jnp.where(j == 4, t1, tu + c[j])
        return ks.at[j].set(terms.vf(t, y, args))

    # A rejected step (out of reach) skips these too: its y1, f1 and error are replaced.
    ks = jax.lax.fori_loop(jnp.where(too_stiff, 5, jnp.where(use_rkc, 4, 0)), 5, finishing,
                           jnp.zeros((5, *u.shape), dtype))
    y1 = u + jnp.tensordot(a[4], ks[:4], axes=1)
    f1 = ks[4]
    y_error = jnp.where(
        use_rkc, 0.8 * (y0 - y1) + 0.4 * h * (f0 + f1),
        jnp.tensordot(h * jnp.concatenate([be[:4] - b, be[4:]]), ks, axes=1))
    # f-evaluations: RKC s − 1 stages and f(y1); ROCK4 deg − 1 stages, 4 finishing, f(y1);
    # none for a step out of reach (f(y0) comes with the step's jvp).
    evaluations = jnp.where(too_stiff, 0, jnp.where(use_rkc, stages, deg + 4))
    return y1, y_error, f1, evaluations, too_stiff


class ROCK4(AbstractChebyshevSolver):
    """Stabilised explicit Runge–Kutta method ROCK4 (Abdulle 2002): order 4, embedded order 3,
    5 to 152 stages chosen every step from the Jacobian's spectral radius (see
    `AbstractChebyshevSolver` for the spectral radius, state and dense output).

    **Limits (measured on the stiff attention flow of `benchmarks/bench_solvers.py`).** The
    finishing procedure is a 4-stage explicit step of length ~h applied after the damping
    Chebyshev stages, so whatever enters it undamped, the float64 rounding of its input and of
    the gradient (≈ ε·ρ·|θ|), comes out amplified by its stability polynomial, ≈ 0.02·(h·ρ)⁴.
    At an equilibrium (‖∇L‖ ≈ 1e-13) one step with h·ρ = 440 moves θ by 2e-8 along the top
    Hessian eigenvector. So for rtol ≈ 1e-8 the step size is held near h·ρ ≈ 400–450
    (≈ 36 stages) by rounding, not by truncation, in the late stiff phase where an L-stable
    implicit method takes steps of h ~ 10; that floor scales like (rtol/ε)^(1/4). `StabilizedRK`
    (`solver="stabilized"`) takes RKC steps there instead.

    **Dense output.** Values between step ends would come from the cubic Hermite
    interpolant, which multiplies f at both ends by h. ROCK4 leaves stiff components of size
    ~rtol at its step ends (its finishing procedure amplifies rounding; RKC damps them), so
    where h·ρ ≫ 1 the interpolant amplifies them by ~h·ρ/4: on a stiff least-squares flow
    (ρ = 1.5e5) at rtol 1e-4, losses saved inside steps read up to 10 746 against a minimum
    of 1.80 (step ends right). So `gradient_flow` (through `step_size_controller(..., save_ts)`)
    makes ROCK4's steps end on the save times, where the interpolant returns the step's end:
    at most `n_save` more steps. Calling `diffrax.diffeqsolve` yourself, pass
    `step_ts=` your save times to the controller likewise. `StabilizedRK` and `RKC` need
    nothing of the kind (their saved values were right to all digits there).

    **Arguments:**

    - `safety`: factor on the power-iteration estimate (a lower bound of ρ).
    - `init_iterations`: power iterations at the start of a solve.
    - `max_stages`: at most this many stages per step (9..152).
    """

    max_stages: int = eqx.field(default=_MAX_STAGES, static=True)

    def __check_init__(self):
        if not 9 <= self.max_stages <= _MAX_STAGES:
            raise ValueError(f"`max_stages` must be in [9, {_MAX_STAGES}], got {self.max_stages}.")

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 4  # embedded order 3: local error estimate O(h⁴)

    def _advance(self, terms, t0, t1, y0, f0, h_rho, args):
        return _chebyshev_advance(terms, t0, t1, y0, f0, h_rho, args, False, self.max_stages, 2)


class RKC(AbstractChebyshevSolver):
    """Runge–Kutta–Chebyshev method RKC (Sommeijer, Shampine & Verwer, "RKC: an explicit
    solver for parabolic PDEs", J. Comput. Appl. Math. 88 (1997) 315–326): order 2, s ≥ 2
    damped Chebyshev stages (damping 2/13), stability interval ≈ [−0.65·s², 0], s chosen every
    step as 1 + ⌊√(1 + 1.54·h·ρ)⌋ (see `AbstractChebyshevSolver` for ρ, state, dense output).

    A pure three-term recurrence with no finishing procedure: rounding errors grow only like
    s² (Verwer, Hundsdorfer & Sommeijer 1990), so, unlike ROCK4, h·ρ has no rounding floor.

    **Arguments:**

    - `safety`: factor on the power-iteration estimate (a lower bound of ρ).
    - `init_iterations`: power iterations at the start of a solve.
    - `max_stages`: at most this many stages per step (≥ 2; RKC's own code allows
      √(rtol/(10ε)): 3000 at rtol 1e-8, 300 at 1e-10).
    """

    max_stages: int = eqx.field(default=1000, static=True)

    def __check_init__(self):
        if self.max_stages < 2:
            raise ValueError(f"`max_stages` must be ≥ 2, got {self.max_stages}.")

    def order(self, terms):
        return 2

    def error_order(self, terms):
        return 3  # the estimate is O(h³)

    def _advance(self, terms, t0, t1, y0, f0, h_rho, args):
        return _chebyshev_advance(terms, t0, t1, y0, f0, h_rho, args, True, 9, self.max_stages)


class StabilizedRK(AbstractChebyshevSolver):
    """The stabilised explicit solver of `solver="stabilized"`: ROCK4 (order 4) on steps with
    h·ρ ≤ `switch`, RKC (order 2) on stiffer ones.

    Gradient flows of this kind have a fast transient, where steps are limited by accuracy
    and the conservation laws' drift is set, and a long stiff tail near a minimum, where the
    step is limited by stability and the solution moves on time scales ≫ 1/ρ. ROCK4 takes the
    first: order 4 at 5–6 stages. On the tail ROCK4's finishing procedure amplifies float64
    rounding like (h·ρ)⁴ (see `ROCK4`) and holds h·ρ near 440 at rtol 1e-8; RKC's pure
    Chebyshev recurrence has no such floor, so its steps grow until accuracy limits them, with
    √(1.54·h·ρ) stages. On the Lightning-Attention flow of `bench_solvers.py` this cuts
    ROCK4's work several-fold at the same law drift (the drift is set in the transient; see
    the README's solver benchmark). The error estimate of either method drives the same PI
    controller (error order 4). Members of a vmapped batch each take their own method; the
    batch pays the largest stage count among them (see `_chebyshev_advance`).

    `rtol` is, as for every diffrax solver, a tolerance on each step's local error: over the
    many small RKC steps of a long stiff tail the global error of slowly moving components
    can reach ~10–40× rtol (on a linear flow with eigenvalues 0.1…1e4, rtol 1e-8: 4e-7, as
    Kvaerno5's 4e-7 there).

    **Arguments:**

    - `safety`: factor on the power-iteration estimate (a lower bound of ρ).
    - `init_iterations`: power iterations at the start of a solve.
    - `switch`: RKC steps when h·ρ (safety included) exceeds this. ROCK4's rounding floor is
      h·ρ ≈ 440 at rtol 1e-8 and falls like rtol^(1/4) (≈ 140 at 1e-10): the switch must stay
      below it. On the full-size attention flow the cost was the same for 50, 100 and 200.
    - `max_stages`: at most this many RKC stages per step.
    """

    switch: float = 50.0
    max_stages: int = eqx.field(default=1000, static=True)

    def __check_init__(self):
        if not 0 < self.switch <= _MAX_H_RHO:
            raise ValueError(f"`switch` must be in (0, {_MAX_H_RHO:.0f}], got {self.switch}.")
        if self.max_stages < 2:
            raise ValueError(f"`max_stages` must be ≥ 2, got {self.max_stages}.")

    def order(self, terms):
        return 2  # ROCK4's order 4 holds on the accuracy-limited steps (h·ρ ≤ switch)

    def error_order(self, terms):
        return 4

    def _advance(self, terms, t0, t1, y0, f0, h_rho, args):
        return _chebyshev_advance(terms, t0, t1, y0, f0, h_rho, args, h_rho > self.switch,
                                  _MAX_STAGES, self.max_stages)


for _cls in (ROCK4, RKC, StabilizedRK):
    _cls.__init__.__doc__ = None


# Proportional-integral step control for the Chebyshev solvers. ROCK4's late stiff steps sit
# at a rounding limit (see `ROCK4`), where integral-only control (diffrax's default)
# oscillates around it. On the stiff
# attention flow (d = 4, 8 members, rtol 1e-8) 25% of its step attempts were rejected; with
# these coefficients 16%, and 7% fewer gradient evaluations in all. Stronger smoothing
# (0.3/0.3: 9%, −10%) slows the step growth after a transient: +28% evaluations on a
# non-stiff deep linear flow, against +6% with these.
_CHEBYSHEV_PI = dict(pcoeff=0.2, icoeff=0.6)


def step_size_controller(solver, rtol, atol, save_ts=None) -> "StopOnNonFinite":
    """The step-size controller `gradient_flow` uses with `solver`: PI control
    (pcoeff = 0.2, icoeff = 0.6) for the Chebyshev solvers (`StabilizedRK`, `ROCK4`, `RKC`),
    diffrax's default integral control otherwise. `ROCK4`'s steps also end on the save times
    (its dense output between step ends is unreliable on stiff flows, see `ROCK4`). Wrapped in
    `StopOnNonFinite`, so that a flow whose vector field is non-finite stops (as diverged)
    instead of shrinking its step forever.

    **Arguments:**

    - `solver`: a diffrax solver.
    - `rtol`, `atol`: tolerances.
    - `save_ts`: the save times of the solve (optional; used for `ROCK4`).

    **Returns:** a `StopOnNonFinite` around a `diffrax.PIDController` (a diffrax adaptive
    step-size controller: pass it to `diffrax.diffeqsolve`).
    """
    coefficients = _CHEBYSHEV_PI if isinstance(solver, AbstractChebyshevSolver) else {}
    if isinstance(solver, ROCK4) and save_ts is not None:
        coefficients = coefficients | dict(step_ts=save_ts)
    return StopOnNonFinite(dfx.PIDController(rtol=rtol, atol=atol, **coefficients))


# `StopOnNonFinite` accepts a non-finite step of size h ≤ this · max(1, |t|).
NONFINITE_STEP_FLOOR = 1e-12


class StopOnNonFinite(dfx.AbstractAdaptiveStepSizeController):
    """An adaptive step-size controller that lets a flow stop where its vector field is not
    finite, instead of shrinking its step forever.

    A step whose result y1 is non-finite (NaN or inf: a NaN loss or gradient, or a stage that
    overflowed) has a non-finite error estimate; `controller` rejects it and shrinks the step
    (by its `factormin`, 5× for diffrax's `PIDController`). When the field is non-finite at
    the current state itself (a loss that is NaN at finite parameters), no step size helps,
    and before this wrapper the step shrank to zero and the run spun to `max_steps` (100 000
    rejected steps), reported as a stiff flow. Here such a step is *accepted* once its size h
    is at most `floor` · max(1, |t|) (`NONFINITE_STEP_FLOOR` = 1e-12): the state becomes
    non-finite, and the run's divergence check (a diffrax `Event` on a non-finite state)
    stops the member as diverged, ~15 rejected steps after the field went bad (from h ~ 0.01
    at 5× per rejection).

    Why 1e-12 · max(1, |t|): a genuine overflow from a too-large step of an explicit solver
    needs the stages to grow by ~1e300, i.e. h·ρ ≫ 1 (ρ: the Jacobian's spectral radius), and
    a too-large step of a finite, smooth field is rejected with a *finite*, large error long
    before. A step of h ≤ 1e-12 moves y by 1e-12·|f(y)|; for it to produce a non-finite
    result the field must be non-finite at y or within that distance of it (a flow that ends
    in finite time, e.g. at a singularity of the loss). Continuing past such a point would
    take ≥ 1e12 steps per unit time (per |t| for |t| > 1) — far beyond any step budget — so
    stopping there loses no run that could have finished; and no step is accepted that is
    *finite* and wrong: only non-finite candidates are accepted, which stops the member.
    Steps with finite results are controlled exactly as by `controller` (same sizes, same
    accept/reject decisions). Around a plain `diffrax.PIDController` (no `dtmin`, `dtmax`,
    `step_ts` or own norm: what `step_size_controller` makes) this controller computes
    diffrax's step itself, reading the candidate once (`_pid_adapt`), to the bit the same.

    - `controller`: the wrapped adaptive controller (its `rtol`, `atol` and `norm` are this
      controller's, e.g. for an implicit solver's root finder).
    - `floor`: the relative step size below which a non-finite step is accepted.
    """

    controller: dfx.AbstractAdaptiveStepSizeController
    floor: float = eqx.field(static=True, default=NONFINITE_STEP_FLOOR)

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        if _plain_pid(self.controller) and y_error is not None:
            keep, next_t0, next_t1, made_jump, controller_state, result, finite = (
                _pid_adapt(self.controller, t0, t1, y0, y1_candidate, y_error, error_order,
                           controller_state))
        else:
            keep, next_t0, next_t1, made_jump, controller_state, result, finite = (
                self._wrapped_adapt(t0, t1, y0, y1_candidate, args, y_error, error_order,
                                    controller_state))
        h = t1 - t0
        stop = ~keep & ~finite & (h <= self.floor * jnp.maximum(1.0, jnp.abs(t0)))
        return (keep | stop, jnp.where(stop, t1, next_t0), jnp.where(stop, t1 + h, next_t1),
                made_jump, controller_state, result)

    def _wrapped_adapt(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                       controller_state):
        # Any other controller: told of a non-finite candidate by what it is given.
        # x·0 is 0 where x is finite and NaN where it is not: one sum tells whether every
        # entry is finite (exactly: the terms are zeros, nothing can overflow), in one
        # reduction where `all(isfinite)` of booleans took three.
        finite = jnp.isfinite(sum(jnp.sum(x * 0) for x in jtu.tree_leaves(y1_candidate)))
        # The wrapped controller sees a non-finite candidate as NaN with an infinite error:
        # a rejection by its largest factor. (diffrax scales the error by max(|y0|, |y1|)
        # after replacing a NaN y1 by y0, but not an inf one: inf/inf would make the next
        # step size NaN.)
        y1_seen = jtu.tree_map(lambda x: jnp.where(finite, x, jnp.nan), y1_candidate)
        error_seen = jtu.tree_map(lambda e: jnp.where(finite, e, jnp.inf), y_error)
        return (*self.controller.adapt_step_size(t0, t1, y0, y1_seen, args, error_seen,
                                                 error_order, controller_state), finite)


def _plain_pid(controller) -> bool:
    """Whether `controller` is a `diffrax.PIDController` that `_pid_adapt` reproduces: no
    `dtmin`, `dtmax`, and diffrax's default norm (`step_ts` makes a ClipStepSizeController
    around it, which is not plain)."""
    return (type(controller) is dfx.PIDController and controller.dtmin is None
            and controller.dtmax is None and controller.norm is optx.rms_norm)


def _pid_adapt(pid, t0, t1, y0, y1_candidate, y_error, error_order, controller_state):
    """`diffrax.PIDController.adapt_step_size` without `dtmin` and `dtmax`: the same
    operations on a finite candidate, with the finiteness of the candidate folded into the
    error norm. Returns diffrax's six results and whether every entry of the candidate (and
    of its scaled error) is finite.

    Wrapped (`_wrapped_adapt`), the candidate is read in three reductions each step: one to
    tell whether it is finite, diffrax's own `isnan(y1).any()`, and the norm. Here each
    scaled error entry is NaN where the candidate's entry is not finite, in the pass that
    computes it, so the norm's reduction alone is NaN exactly when some entry is; a NaN norm
    is then an infinite error, as the wrapped path gives a non-finite candidate. A NaN error
    of a finite candidate is an infinite error too (diffrax's loop makes it so before its
    controller sees it; given one, diffrax's controller returns a NaN step). The norm is
    the same `rms_norm` of the same entries, so the steps are diffrax's to the bit
    (`tests/test_statuses.py`); what this saves a step is in `docs/guides/first_call.md`."""
    prev_inv_scaled_error, prev_prev_inv_scaled_error, at_dtmin = controller_state
    error_order = pid._get_error_order(error_order)
    prev_dt = t1 - t0

    def scale(y0, y1, error):
        # + y₁·0: + 0 where y₁ is finite, NaN where it is not (an `isfinite` select here
        # measured slower on the CPU, and changed the norm's last bits).
        # Standard promotion, as diffrax's: a float32 state with float64 tolerances.
        with jax.numpy_dtype_promotion("standard"):
            return error / (pid.atol + jnp.maximum(jnp.abs(y0), jnp.abs(y1)) * pid.rtol) + y1 * 0

    scaled_error = pid.norm(jtu.tree_map(scale, y0, y1_candidate, y_error))
    finite = ~jnp.isnan(scaled_error)
    scaled_error = jnp.where(finite, scaled_error, jnp.inf)
    keep_step = scaled_error < 1
    inv_scaled_error = jax.lax.stop_gradient(1 / jnp.asarray(scaled_error))

    def zero(c):
        return isinstance(c, (int, float)) and c == 0

    coeff1 = (pid.icoeff + pid.pcoeff + pid.dcoeff) / error_order
    coeff2 = -(pid.pcoeff + 2 * pid.dcoeff) / error_order
    coeff3 = pid.dcoeff / error_order
    factor1 = 1 if zero(coeff1) else inv_scaled_error**coeff1
    factor2 = 1 if zero(coeff2) else prev_inv_scaled_error**coeff2
    factor3 = 1 if zero(coeff3) else prev_prev_inv_scaled_error**coeff3
    factormin = jnp.where(keep_step, 1, pid.factormin)
    factormax = jnp.where(keep_step, pid.factormax, pid.safety)
    factor = jnp.clip(pid.safety * factor1 * factor2 * factor3, min=factormin, max=factormax)
    factor = eqxi.nondifferentiable(jax.lax.stop_gradient(factor))
    dt = prev_dt * factor.astype(jnp.result_type(prev_dt))
    # After an infinite error (a rejected non-finite step) the next steps are not shrunk
    # again by the integral and derivative terms (as diffrax).
    pred = (inv_scaled_error == 0) | jnp.isinf(inv_scaled_error)
    inv_scaled_error = jnp.where(pred, 1, inv_scaled_error)
    next_t0 = jnp.where(keep_step, t1, t0)
    next_t1 = next_t0 + dt
    inv_scaled_error = jnp.where(keep_step, inv_scaled_error, prev_inv_scaled_error)
    prev_inv_scaled_error = jnp.where(keep_step, prev_inv_scaled_error,
                                      prev_prev_inv_scaled_error)
    controller_state = inv_scaled_error, prev_inv_scaled_error, at_dtmin
    return (keep_step, next_t0, next_t1, False, controller_state, dfx.RESULTS.successful,
            finite)


# Real-axis stability boundary of Tsit5 (|R(z)| ≤ 1 for z ∈ [−3.5, 0]).
_EXPLICIT_STABILITY = 3.5
# Below this many stability-limited Tsit5 steps, stiffness costs an explicit solver little.
_STIFF_STEPS = 5_000
def _stabilized_max_h_rho():
    # The h·ρ at which StabilizedRK's RKC steps reach `max_stages` stages (1 + ⌊√(1 + 1.54·h·ρ)⌋):
    # the size of its largest steps, for the auto choice's step estimate.
    stages = StabilizedRK().max_stages
    return ((stages - 1) ** 2 - 1) / 1.54


# Kvaerno5's dense Newton solves (O(D³) per Jacobian) only pay off for small D.
_IMPLICIT_MAX_PARAMS = 2_000


class SolverChoice(eqx.Module):
    """What `choose_solver` picked and why.

    - `name`: `"tsit5"`, `"stabilized"` or `"kvaerno5"`.
    - `reason`: one sentence.
    - `num_params`: parameters of one model.
    - `rho0`, `rho_max`: spectral radius of the field's Jacobian (−∇²L for gradient flow) at
      θ₀, and the largest seen along a loose-tolerance probe flow to `t1` (or to a minimum).
    - `explicit_steps`: t1·rho_max / 3.5, the steps Tsit5 needs for stability alone.
    - `probe_t`: where the probe flow stopped: `t1`, earlier at a minimum (loss below 1e-12 of
      its start), or where its step budget ran out.
    """

    name: str = eqx.field(static=True)
    reason: str = eqx.field(static=True)
    num_params: int = eqx.field(static=True)
    rho0: float
    rho_max: float
    explicit_steps: float
    probe_t: float


# The probe stops once the loss (≥ 0 for every shipped loss) is below this fraction of a
# positive start: the flow is then at a minimum, where the Hessian (and so ρ) no longer
# changes, and the rest of the way to t1 is
# the stiff tail whose stages would cost most of the probe (full-size attention flow: the
# loss falls by 1e-12 by t = 0.05 of t1 = 50; 614 gradient evaluations instead of 10 433,
# the same ρ_max).
_PROBE_CONVERGED = 1e-12


@eqx.filter_jit
def _probe(params, static, objective, field, t1, rtol, max_steps):
    # Everything traced or a Module: one compile per model/objective structure. The loop is a
    # plain `lax.while_loop` of `attempt_step` (the lanes' step attempt, which makes the calls
    # `diffeqsolve` makes: the same steps), without diffrax's saving, event and dense-output
    # machinery, which the probe does not need.
    y0, unravel = jfu.ravel_pytree(params)

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    grad = jax.jit(jax.grad(loss))  # traced once, not at each of the solver's calls
    term = dfx.ODETerm(lambda t, y, args: field(grad, y))
    # StabilizedRK, not ROCK4 alone: even at rtol 1e-4 ROCK4's rounding floor holds its
    # steps at h·ρ ~ 2000 in a stiff tail (a flow that never converges), ~10× the work.
    solver = StabilizedRK()
    controller = step_size_controller(solver, rtol, rtol)
    error_order = solver.error_order(term)
    t0 = jnp.zeros((), y0.dtype)
    loss0 = loss(y0)
    state = solver.init(term, t0, t1, y0, None)
    # First step 0.01: what `diffeqsolve` took with dt0=None (its wrapped term is no
    # `ODETerm`, so diffrax's initial-step heuristic answers 0.01).
    next_t, controller_state = controller.init(term, t0, t1, y0, 0.01, None, solver.func,
                                               error_order)
    next_t = jnp.minimum(next_t, t1)
    t1_clip_floor = _clip_floor(t1)

    def stopped(y):
        # At a minimum: the loss below 1e-12 of a positive start (a start at L ≤ 0, a custom
        # loss, gives no scale: probe to t1). A non-finite state (a NaN loss, let through by
        # `StopOnNonFinite`) ends the probe too.
        return (loss0 > 0) & (loss(y) <= _PROBE_CONVERGED * loss0) | ~jnp.all(jnp.isfinite(y))

    def running(carry):
        t, _, _, _, _, steps, done = carry
        return (t < t1) & (steps < max_steps) & ~done

    def attempt(carry):
        t, next_t, y, state, controller_state, steps, _ = carry
        y, t, next_t, state, controller_state, keep, _, _ = attempt_step(
            solver, controller, term, error_order, t1, t1_clip_floor, y, t, next_t, state,
            controller_state)
        return t, next_t, y, state, controller_state, steps + 1, keep & stopped(y)

    rho0 = state[1]
    t, _, _, state, *_ = jax.lax.while_loop(
        running, attempt, (t0, next_t, y0, state, controller_state,
                           jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
    return rho0, jnp.maximum(rho0, state[2]), t


def _choose(params, static, objective, field, t1, max_steps, probe_rtol=1e-4,
            probe_steps=2_000):
    """The solver for the flow of `objective` from the model (params, static) to `t1`."""
    num_params = int(sum(x.size for x in jtu.tree_leaves(params)))
    if getattr(field, "phase_space", False):
        # Unprobed: the probe integrates θ alone, and a second-order flow's spectrum (−1/μ
        # and complex pairs) is not the stabilised solvers' real negative one. The evidence
        # fields are NaN (not measured).
        nan = float("nan")
        return SolverChoice(
            "tsit5", f"a second-order flow ({type(field).__name__}) is integrated in phase "
            "space by Tsit5 (not probed); a small mass μ makes its fast mode −1/μ stiff: "
            'pass solver="kvaerno5" there', num_params, nan, nan, nan, nan)
    rho0, rho_max, probe_t = (float(x) for x in _probe(
        params, static, objective, field, as_float64(t1), as_float64(probe_rtol),
        probe_steps))
    # A probe that stopped early (its step budget, a blow-up) has seen part of the path
    # only: its rho_max is a lower bound, which can only under-call stiffness.
    explicit_steps = float(t1) * rho_max / _EXPLICIT_STABILITY
    if not explicit_steps > _STIFF_STEPS:
        name, reason = "tsit5", (
            f"not stiff: Tsit5 needs about {explicit_steps:.3g} steps for stability "
            f"(t1·ρ/3.5, ρ ≤ {rho_max:.3g})")
    elif (float(t1) * rho_max / _stabilized_max_h_rho() > max_steps / 4
          and num_params <= _IMPLICIT_MAX_PARAMS):
        name, reason = "kvaerno5", (
            f"very stiff (t1·ρ = {float(t1) * rho_max:.3g}) even for the stabilised solver's "
            f"largest steps, and {num_params} parameters make dense Newton solves affordable")
    else:
        name, reason = "stabilized", (
            f"stiff: Tsit5 would need about {explicit_steps:.3g} steps for stability "
            f"(t1·ρ/3.5, ρ ≤ {rho_max:.3g}); a stabilised step needs only √(h·ρ) stages")
    return SolverChoice(name, reason, num_params, rho0, rho_max, explicit_steps, probe_t)


def choose_solver(objective, model, t1, *, max_steps: int = 100_000, field=None) -> SolverChoice:
    """The solver `gradient_flow(..., solver="auto")` uses for this flow, and why.

    Stiffness of gradient flow is the Hessian's spectral radius ρ times the time scale, and
    it often appears only late, near a minimum (attention flows). So the probe estimates ρ by
    power iteration (Hessian-vector products) at θ₀ and along a cheap loose-tolerance
    (rtol 1e-4, ≤ 2000 steps) stabilised flow of the first member to `t1` — or until its
    loss has fallen below 1e-12 of its start: at a minimum ρ no longer changes — then picks

    - `"tsit5"` when t1·ρ/3.5 (Tsit5's steps for stability alone) ≤ 5000;
    - `"kvaerno5"` when even the stabilised solver's largest steps (1000 RKC stages,
      h·ρ ≈ 6.5e5) would need more than max_steps/4 steps and the model has ≤ 2000
      parameters;
    - `"stabilized"` (`StabilizedRK`) otherwise.

    **Arguments:**

    - `objective`, `model`, `t1`: as for `gradient_flow` (an ensemble's first member is probed).
    - `max_steps`: the step budget of the solve.
    - `field`: the flow's `AbstractVectorField` (default: plain gradient flow). A
      second-order field (`MomentumField`, `NesterovField`) is not probed: the answer is
      `"tsit5"`, what `gradient_flow` runs it with, with NaN evidence.

    **Returns:** a `SolverChoice` (`name`, `reason`, and the evidence).
    """
    from .._models.base import as_ensemble
    from .flow import GradientField, _remade  # _flow imports this module

    first = as_ensemble(model)[0]
    field = GradientField() if field is None else _remade(field)
    params, static = eqx.partition(first, eqx.is_inexact_array)
    return _choose(params, static, objective, field, t1, max_steps)
