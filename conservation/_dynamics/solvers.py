"""Stabilised explicit Runge–Kutta (ROCK4) for stiff gradient flows, and the `"auto"` choice.

The Jacobian of gradient flow dθ/dt = −∇L(θ) is −∇²L: symmetric, with its spectrum on the
negative real axis. Near a minimum its largest eigenvalue ρ fixes the step of an explicit
method (Tsit5: h·ρ ≲ 3.3) however smooth the trajectory is. Chebyshev-type methods use s
stages whose stability interval along the negative real axis grows like 0.35·s², so the
work per unit time grows like √ρ instead of ρ, with nothing but gradient evaluations (no
Jacobian, no linear solve, usable at any parameter count).

`ROCK4` is Abdulle's fourth-order orthogonal-Chebyshev method: an s-stage three-term
recurrence of orthogonal polynomials followed by a 4-stage finishing procedure, with an
embedded third-order error estimate (A. Abdulle, "Fourth order Chebyshev methods with
recurrence relation", SIAM J. Sci. Comput. 23 (2002) 2041–2054; the stage choice follows
Abdulle's ROCK4 code as in Julia's OrdinaryDiffEq.jl). The coefficient tables are in
`_rock4_coefficients.py`.
"""

from collections.abc import Callable
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import rock4_coefficients as _tables

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


class ROCK4(dfx.AbstractAdaptiveSolver):
    """Stabilised explicit Runge–Kutta method ROCK4 (Abdulle 2002): order 4, embedded order 3,
    5 to 152 stages chosen every step from the Jacobian's spectral radius.

    For stiff flows whose Jacobian has real (or nearly real) eigenvalues, above all gradient
    flow, whose Jacobian −∇²L is symmetric. The spectral radius ρ is estimated by power
    iteration with Jacobian-vector products (a `jax.jvp` of the vector field, for gradient
    flow a Hessian-vector product), warm-started from the previous step's vector: one
    product per step, `init_iterations` at the start; the estimate is multiplied by `safety`.
    A step with h·ρ beyond the 152-stage stability interval is rejected so that the step-size
    controller shrinks it. Dense output (for `SaveAt(ts=...)`) is the cubic Hermite
    interpolant of y and f at both ends of a step.

    The solver works on an array state (gradient_flow integrates the flat parameter vector).
    Use it with `step_size_controller` (PI control), as `gradient_flow` does.

    **Limits (measured on the stiff attention flow of `benchmarks/bench_solvers.py`).** The
    finishing procedure is a 4-stage explicit step of length ~h applied after the damping
    Chebyshev stages, so whatever enters it undamped, the float64 rounding of its input and of
    the gradient (≈ ε·ρ·|θ|), comes out amplified by its stability polynomial, ≈ 0.02·(h·ρ)⁴.
    At an equilibrium (‖∇L‖ ≈ 1e-13) one step with h·ρ = 440 moves θ by 2e-8 along the top
    Hessian eigenvector. So for rtol ≈ 1e-8 the step size is held near h·ρ ≈ 400–450
    (≈ 36 stages) by rounding, not by truncation, in the late stiff phase where an L-stable
    implicit method takes steps of h ~ 10; that floor scales like (rtol/ε)^(1/4). Such
    rounding noise lies along the stiff directions and leaves the conservation laws alone;
    law drift comes from the early, fast phase, where ROCK4 runs its 5-stage member (order 4,
    embedded order 3) and ends up with a drift near rtol, ~20–50× that of Kvaerno5 (order 5)
    at the same rtol.

    **Arguments:**

    - `safety`: factor on the power-iteration estimate (a lower bound of ρ).
    - `init_iterations`: power iterations at the start of a solve.
    - `max_stages`: at most this many stages per step (9..152).
    """

    safety: float = 1.2
    init_iterations: int = 20
    max_stages: int = _MAX_STAGES

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., dfx.ThirdOrderHermitePolynomialInterpolation]] = (
        dfx.ThirdOrderHermitePolynomialInterpolation
    )

    def __check_init__(self):
        if not 9 <= self.max_stages <= _MAX_STAGES:
            raise ValueError(f"`max_stages` must be in [9, {_MAX_STAGES}], got {self.max_stages}.")

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 4  # embedded order 3: local error estimate O(h⁴)

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
        # state: (unit vector, spectral-radius estimate, its running max, f-evaluations,
        # jvps) — the counts cover accepted steps only (diffrax discards the state of a
        # rejected step).
        return v, rho, rho, zero, jnp.asarray(self.init_iterations, jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump  # f(y0) is recomputed every step (the jvp below returns it for free)
        v, _, rho_max, n_f, n_jvp = solver_state
        h = t1 - t0
        # One warm-started power iteration: ‖J v‖ ≤ ρ for a unit v, tight once v has
        # converged to the top eigenvector; `safety` covers the rest.
        f0, jv = self._jvp(terms, t0, y0, v, args)
        v, rho = _unit(jv)
        rho_max = jnp.maximum(rho_max, rho)
        rho_safe = self.safety * rho
        h_rho = h * rho_safe
        too_stiff = h_rho > 0.353 * self.max_stages**2 - 3.0
        mdeg = jnp.floor(jnp.sqrt((3.0 + h_rho) / 0.353)).astype(jnp.int32) + 1
        mdeg = jnp.clip(mdeg, 5, self.max_stages) - 4
        index = jnp.searchsorted(jnp.asarray(_MS), mdeg, side="left")
        deg = jnp.asarray(_MS)[index]
        start = jnp.asarray(_STARTS)[index]
        recf = jnp.asarray(_RECF)

        # Chebyshev part: y_j = h μ_j f(y_{j−1}) − ν_j y_{j−1} − κ_j y_{j−2}, ν_j = −1 − κ_j.
        mu1 = recf[start]
        first = (y0 + h * mu1 * f0, y0, t0 + h * mu1, t0)

        def stage(i, carry):
            y_1, y_2, t_1, t_2 = carry
            mu, kappa = recf[start + 2 * i - 3], recf[start + 2 * i - 2]
            nu = -1.0 - kappa
            y = h * mu * terms.vf(t_1, y_1, args) - nu * y_1 - kappa * y_2
            t = h * mu - nu * t_1 - kappa * t_2
            return y, y_1, t, t_1

        u, _, tu, _ = jax.lax.fori_loop(2, deg + 1, stage, first)

        # 4-stage finishing procedure, then f(y1) for the embedded order-3 companion and the
        # dense output: five evaluations, looped so that the vector field (a gradient) is
        # traced, and compiled, once.
        fpa, b = jnp.asarray(_FPA)[index], jnp.asarray(_FPB)[index]
        be = jnp.asarray(_FPBE)[index]
        zero = jnp.zeros_like(b[0])
        # Row j: coefficients of k_0..k_3 in the input of evaluation j (row 4: y1).
        a = h * jnp.stack([
            jnp.stack([zero, zero, zero, zero]),
            jnp.stack([fpa[0], zero, zero, zero]),
            jnp.stack([fpa[1], fpa[2], zero, zero]),
            jnp.stack([fpa[3], fpa[4], fpa[5], zero]),
            b,
        ])
        c = jnp.sum(a, axis=1)

        def finishing(j, ks):
            y = u + jnp.tensordot(a[j], ks[:4], axes=1)
            t = jnp.where(j == 4, t1, tu + c[j])
            return ks.at[j].set(terms.vf(t, y, args))

        ks = jax.lax.fori_loop(0, 5, finishing, jnp.zeros((5, *u.shape), u.dtype))
        y1 = u + jnp.tensordot(a[4], ks[:4], axes=1)
        f1 = ks[4]
        y_error = jnp.tensordot(h * jnp.concatenate([be[:4] - b, be[4:]]), ks, axes=1)
        # Beyond the stability interval the result is meaningless: reject, so that the
        # controller shrinks h (by its largest factor).
        y_error = jnp.where(too_stiff, 1e10 * (1.0 + jnp.abs(y0)), y_error)
        dense_info = dict(y0=y0, y1=y1, k0=h * f0, k1=h * f1)
        # f-evaluations: deg − 1 recurrence stages, 4 finishing, f(y1); the jvp (f0, J v).
        state = (v, rho, rho_max, n_f + (deg + 4).astype(n_f.dtype), n_jvp + 1)
        return y1, y_error, dense_info, state, dfx.RESULTS.successful


ROCK4.__init__.__doc__ = None


# Proportional-integral step control. ROCK4's late stiff steps sit at a rounding limit (see
# `ROCK4`), where integral-only control (diffrax's default) oscillates around it. On the stiff
# attention flow (d = 4, 8 members, rtol 1e-8) 25% of its step attempts were rejected; with
# these coefficients 16%, and 7% fewer gradient evaluations in all. Stronger smoothing
# (0.3/0.3: 9%, −10%) slows the step growth after a transient: +28% evaluations on a
# non-stiff deep linear flow, against +6% with these.
_ROCK4_PI = dict(pcoeff=0.2, icoeff=0.6)


def step_size_controller(solver, rtol, atol) -> dfx.PIDController:
    """The step-size controller `gradient_flow` uses with `solver`: PI control
    (pcoeff = 0.2, icoeff = 0.6) for `ROCK4`, diffrax's default integral control otherwise.

    **Arguments:**

    - `solver`: a diffrax solver.
    - `rtol`, `atol`: tolerances.

    **Returns:** a `diffrax.PIDController`.
    """
    coefficients = _ROCK4_PI if isinstance(solver, ROCK4) else {}
    return dfx.PIDController(rtol=rtol, atol=atol, **coefficients)


# Real-axis stability boundary of Tsit5 (|R(z)| ≤ 1 for z ∈ [−3.5, 0]).
_EXPLICIT_STABILITY = 3.5
# Below this many stability-limited Tsit5 steps, stiffness costs an explicit solver little.
_STIFF_STEPS = 5_000
# Kvaerno5's dense Newton solves (O(D³) per Jacobian) only pay off for small D.
_IMPLICIT_MAX_PARAMS = 2_000


class SolverChoice(eqx.Module):
    """What `choose_solver` picked and why.

    - `name`: `"tsit5"`, `"stabilized"` or `"kvaerno5"`.
    - `reason`: one sentence.
    - `num_params`: parameters of one model.
    - `rho0`, `rho_max`: spectral radius of the field's Jacobian (−∇²L for gradient flow) at
      θ₀, and the largest seen along a loose-tolerance probe flow to `t1`.
    - `explicit_steps`: t1·rho_max / 3.5, the steps Tsit5 needs for stability alone.
    """

    name: str
    reason: str
    num_params: int
    rho0: float
    rho_max: float
    explicit_steps: float


@eqx.filter_jit
def _probe(params, static, objective, field, t1, rtol, max_steps):
    # Everything traced or a Module: one compile per model/objective structure.
    y0, unravel = jfu.ravel_pytree(params)

    def vector_field(t, y, args):
        return field(jax.grad(lambda z: objective(eqx.combine(unravel(z), static))), y)

    term = dfx.ODETerm(vector_field)
    solver = ROCK4()
    rho0 = solver.init(term, 0.0, t1, y0, None)[1]
    sol = dfx.diffeqsolve(
        term, solver, 0.0, t1, None, y0,
        saveat=dfx.SaveAt(t1=True, solver_state=True),
        stepsize_controller=step_size_controller(solver, rtol, rtol),
        max_steps=max_steps, throw=False)
    return rho0, jnp.maximum(rho0, sol.solver_state[2])


def _choose(params, static, objective, field, t1, max_steps, probe_rtol=1e-4,
            probe_steps=2_000):
    """The solver for the flow of `objective` from the model (params, static) to `t1`."""
    rho0, rho_max = (float(x) for x in _probe(
        params, static, objective, field, jnp.asarray(t1, float),
        jnp.asarray(probe_rtol, float), probe_steps))
    # A probe that stopped early (its step budget, a blow-up) has seen part of the path
    # only: its rho_max is a lower bound, which can only under-call stiffness.
    num_params = int(sum(x.size for x in jtu.tree_leaves(params)))
    explicit_steps = float(t1) * rho_max / _EXPLICIT_STABILITY
    if not explicit_steps > _STIFF_STEPS:
        name, reason = "tsit5", (
            f"not stiff: Tsit5 needs about {explicit_steps:.3g} steps for stability "
            f"(t1·ρ/3.5, ρ ≤ {rho_max:.3g})")
    elif (float(t1) * rho_max / _MAX_H_RHO > max_steps / 4
          and num_params <= _IMPLICIT_MAX_PARAMS):
        name, reason = "kvaerno5", (
            f"very stiff (t1·ρ = {float(t1) * rho_max:.3g}) even for a 152-stage stabilised "
            f"step, and {num_params} parameters make dense Newton solves affordable")
    else:
        name, reason = "stabilized", (
            f"stiff: Tsit5 would need about {explicit_steps:.3g} steps for stability "
            f"(t1·ρ/3.5, ρ ≤ {rho_max:.3g}); a stabilised step needs only √(h·ρ) stages")
    return SolverChoice(name, reason, num_params, rho0, rho_max, explicit_steps)


def choose_solver(objective, model, t1, *, max_steps: int = 100_000, field=None) -> SolverChoice:
    """The solver `gradient_flow(..., solver="auto")` uses for this flow, and why.

    Stiffness of gradient flow is the Hessian's spectral radius ρ times the time scale, and
    it often appears only late, near a minimum (attention flows). So the probe estimates ρ by
    power iteration (Hessian-vector products) at θ₀ and along a cheap loose-tolerance
    (rtol 1e-4, ≤ 2000 steps) stabilised flow of the first member to `t1`, then picks

    - `"tsit5"` when t1·ρ/3.5 (Tsit5's steps for stability alone) ≤ 5000;
    - `"kvaerno5"` when even 152-stage stabilised steps would need more than max_steps/4
      steps and the model has ≤ 2000 parameters;
    - `"stabilized"` (ROCK4) otherwise.

    **Arguments:**

    - `objective`, `model`, `t1`: as for `gradient_flow` (an ensemble's first member is probed).
    - `max_steps`: the step budget of the solve.
    - `field`: the flow's `AbstractVectorField` (default: plain gradient flow).

    **Returns:** a `SolverChoice` (`name`, `reason`, and the evidence).
    """
    from .._models.base import as_ensemble
    from .flow import GradientField  # _flow imports this module

    first = as_ensemble(model)[0]
    field = GradientField() if field is None else field
    params, static = eqx.partition(first, eqx.is_inexact_array)
    return _choose(params, static, objective, field, t1, max_steps)
