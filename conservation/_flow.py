"""Gradient flow dθ/dt = −∇L(θ), integrated with diffrax for a whole ensemble at once."""

import abc
import warnings
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu

from ._custom_types import Array, ScalarLike
from ._laws import check_unique_names
from ._model import AbstractModel, Ensemble, as_ensemble
from ._monitor import DIVERGED, FAILED, MAX_STEPS, SUCCESS, LawMonitor, Result, finite_max
from ._objective import Objective
from ._solvers import ROCK4, _choose


SOLVERS = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "heun": dfx.Heun,
    "kvaerno5": dfx.Kvaerno5,  # implicit (stiff); dense Jacobian: small parameter counts
    "stabilized": ROCK4,  # stabilised explicit (stiff gradient flows, any parameter count)
}


class AbstractVectorField(eqx.Module):
    """The right-hand side dθ/dt of a flow, from the loss gradient."""

    @abc.abstractmethod
    def __call__(self, grad: Callable, y: Array) -> Array:
        """dθ/dt at the flat parameters `y`; `grad(y)` is ∇L(y)."""


class GradientField(AbstractVectorField):
    """Gradient flow dθ/dt = −∇L(θ) − λθ (weight decay λ, default 0)."""

    # Arrays, not Python floats: a new value must not recompile the solve.
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __call__(self, grad, y):
        return -(grad(y) + self.weight_decay * y)


class ModifiedGradientField(AbstractVectorField):
    """The modified equation of gradient descent / heavy ball with learning rate η, momentum β
    and weight decay λ (time t = η·step):

        dθ/dt = −g/(1 − β) − η(1 + β)/(2(1 − β)³) · H g,    g = ∇L + λθ, H = ∇²L + λI,

    i.e. −∇L − (η/2)H∇L for plain GD. It follows the discrete iterates to O(η²) per unit
    time where plain gradient flow is O(η) off (Kunin et al. 2021, §A.4)."""

    lr: Array = eqx.field(converter=jnp.asarray)
    momentum: Array = eqx.field(default=0.0, converter=jnp.asarray)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __call__(self, grad, y):
        beta, lam = self.momentum, self.weight_decay
        g, hg = jax.jvp(lambda z: grad(z) + lam * z, (y,), (grad(y) + lam * y,))
        return -g / (1 - beta) - self.lr * (1 + beta) / (2 * (1 - beta) ** 3) * hg


def _resolve_solver(solver) -> dfx.AbstractSolver:
    if isinstance(solver, dfx.AbstractSolver):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise ValueError(
        f"unknown `solver` {solver!r}; choose one of {['auto', *sorted(SOLVERS)]} or pass a "
        "diffrax solver."
    )


def _check_positive(name, value):
    if not jnp.all(jnp.asarray(value) > 0):
        raise ValueError(f"`{name}` must be > 0, got {value}.")


def gradient_flow(
    objective: Objective,
    model: AbstractModel | Ensemble,
    t1: ScalarLike,
    *,
    n_save: int = 101,
    solver="auto",
    rtol: ScalarLike = 1e-8,
    atol: ScalarLike | None = None,
    max_steps: int = 100_000,
    laws=None,
    progress: bool = False,
    divergence: ScalarLike = 1e8,
    batch_size: int | None = None,
    field: AbstractVectorField | None = None,
) -> Result:
    """Integrate the gradient flow of `objective` from `model` (or every member of an ensemble).

    Law values and drifts are evaluated inside the solve at the `n_save` save times (the full
    trajectory is never stored). Tolerances, `t1` and `divergence` are traced, so sweeping them
    reuses one compiled program. Work in float64 (conservation enables it on import): drifts
    are compared with tolerances far below float32 resolution.

    **Arguments:**

    - `objective`: from `conservation.make_objective`.
    - `model`: a model or an `Ensemble`.
    - `t1`: final time (the flow starts at t = 0).
    - `n_save`: number of evenly spaced save times in [0, t1].
    - `solver`: `"auto"` (default: `conservation.choose_solver` probes the flow's stiffness and
      picks `"tsit5"`, `"stabilized"` or `"kvaerno5"`), `"tsit5"`, `"dopri5"`, `"dopri8"`,
      `"heun"` (explicit), `"stabilized"` (ROCK4, stabilised explicit: stiff flows at any
      parameter count), `"kvaerno5"` (implicit, dense Jacobian: small models), or any diffrax
      solver.
    - `rtol`, `atol`: PID step-size controller tolerances (`atol` defaults to `rtol`).
    - `max_steps`: solver step budget per member; a member that runs out gets status
      `max_steps` and keeps the values saved so far.
    - `laws`: laws to monitor; default `model.laws()` (the architecture laws).
    - `progress`: show a progress bar.
    - `divergence`: a member whose parameter norm exceeds this (or becomes non-finite) is
      stopped and reported as `diverged`; the others carry on.
    - `batch_size`: members integrated together in one vmapped solve. Batched members step
      in lockstep until the slowest finishes, so on CPU one at a time (the default there) is
      fastest; on GPU/TPU the default is the whole ensemble, which fills the device.
    - `field`: the right-hand side: `GradientField(weight_decay=λ)` (default λ = 0) or
      `ModifiedGradientField(lr, momentum, weight_decay)` to follow a discrete optimizer.

    **Returns:** a `conservation.Result`.
    """
    ensemble = as_ensemble(model)
    if not isinstance(objective, Objective):
        raise TypeError("`objective` must come from `conservation.make_objective(...)`.")
    if not isinstance(n_save, int) or n_save < 2:
        raise ValueError(f"`n_save` must be an int ≥ 2, got {n_save!r}.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {max_steps!r}.")
    atol = rtol if atol is None else atol
    for name, value in (("t1", t1), ("rtol", rtol), ("atol", atol), ("divergence", divergence)):
        _check_positive(name, value)
    if batch_size is None:
        batch_size = 1 if jax.default_backend() == "cpu" else ensemble.size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
    field = GradientField() if field is None else field
    if not isinstance(field, AbstractVectorField):
        raise TypeError(f"`field` must be a `GradientField` or `ModifiedGradientField`, "
                        f"got {field!r}.")
    laws = check_unique_names(ensemble[0].laws() if laws is None else laws)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    if isinstance(solver, str) and solver == "auto":
        solver = _choose(*eqx.partition(ensemble[0], eqx.is_inexact_array), objective, field,
                         t1, max_steps).name
    progress_meter = dfx.TqdmProgressMeter() if progress else dfx.NoProgressMeter()
    result = _flow(
        params, static, objective, field, LawMonitor(laws), _resolve_solver(solver),
        *(jnp.asarray(v, float) for v in (t1, rtol, atol, divergence)),
        n_save, max_steps, progress_meter, ensemble.size, min(batch_size, ensemble.size),
    )
    _warn_max_steps(result.status, solver, max_steps)
    return result


def _warn_max_steps(status, solver, max_steps):
    hit = int(jnp.sum(status == MAX_STEPS))
    if hit:
        name = solver if isinstance(solver, str) else type(solver).__name__
        warnings.warn(
            f"{hit} member(s) hit `max_steps` = {max_steps} before t1 with solver {name!r}; "
            "a stiff flow (large Hessian eigenvalues) needs `solver=\"stabilized\"` (or "
            "`\"kvaerno5\"` for small models), otherwise raise `max_steps`.",
            stacklevel=3)


@eqx.filter_jit
def _flow(params, static, objective, field, monitor, solver, t1, rtol, atol, divergence, n_save,
          max_steps, progress_meter, size, batch):
    ts = jnp.linspace(0.0, t1, n_save)
    # The solver state is one flat vector per member: diffrax's per-step work is a tree_map
    # over the state, so one leaf instead of one per parameter array is ~20% faster.
    _, unravel = jfu.ravel_pytree(jtu.tree_map(lambda x: x[0], params))

    def as_model(y):
        return eqx.combine(unravel(y), static)

    def vector_field(t, y, args):
        del t, args
        return field(jax.grad(lambda z: objective(as_model(z))), y)

    def observe(t, y, args):
        del t, args
        model = as_model(y)
        return objective(model), monitor.values(model), monitor.conditions(model)

    def diverged(t, y, args, **kwargs):
        del t, args, kwargs
        return ~(jnp.linalg.norm(y) < divergence)  # also true for nan

    def solve_one(p0):
        y0, _ = jfu.ravel_pytree(p0)
        reference = monitor.reference(as_model(y0))
        saveat = dfx.SaveAt(subs=[dfx.SubSaveAt(ts=ts, fn=observe), dfx.SubSaveAt(t1=True)])
        sol = dfx.diffeqsolve(
            dfx.ODETerm(vector_field), solver, 0.0, t1, None, y0,
            saveat=saveat,
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
            event=dfx.Event(diverged),
            progress_meter=progress_meter,
            throw=False,
        )
        (loss, values, condition), final = sol.ys
        drift = monitor.drifts(values, reference)
        status = jnp.where(
            sol.result == dfx.RESULTS.successful, SUCCESS,
            jnp.where(sol.result == dfx.RESULTS.max_steps_reached, MAX_STEPS,
                      jnp.where(sol.event_mask, DIVERGED, FAILED)))
        return loss, values, drift, condition, unravel(final[-1]), status, sol.stats["num_steps"]

    loss, values, drift, condition, final, status, num_steps = jax.lax.map(
        solve_one, params, batch_size=batch)
    return Result(
        t=ts,
        loss=loss,
        values=values,
        drift=drift,
        max_drift={k: finite_max(d) for k, d in drift.items()},
        condition=condition,
        final=Ensemble(eqx.combine(final, static), size),
        status=status,
        num_steps=num_steps,
    )
