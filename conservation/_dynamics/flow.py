"""Gradient flow dθ/dt = −∇L(θ), integrated with diffrax for a whole ensemble at once."""

import abc
import atexit
import contextlib
import dataclasses
import os
import threading
import warnings
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from equinox import internal as eqxi
from tqdm.auto import tqdm

from .._custom_types import Array, ScalarLike
from .._data.objective import Objective
from .._laws.base import check_laws
from .._laws.phase_space import AbstractPhaseSpaceLaw, PhaseState
from .._models.base import AbstractModel, Ensemble, as_ensemble, default_laws
from .._validation import (
    ArgumentError,
    as_float64,
    fail,
    integer,
    is_traced,
    model_parameters,
    number,
)
from .arguments import check_divergence, check_objective, same_parameters
from .batching import (
    check_flow_memory,
    default_batch_size,
    flat_member,
    free_device_memory,
    member_parameters,
)
from .lockstep import solve_lanes
from .monitor import (
    DIVERGED,
    FAILED,
    LOSS_INCREASED,
    MAX_STEPS,
    REACHED_LOSS,
    SUCCESS,
    LawMonitor,
    Result,
    finite_max,
    mark_loss_increased,
    show_progress,
    values_to_keep,
)
from .observables import ObservableMonitor, check_observables, check_resumed_observables
from .solvers import StabilizedRK, _choose, step_size_controller
from .unrolled import Dopri5, Dopri8, Tsit5

SOLVERS = {
    # diffrax's explicit tableaus, their stages unrolled (`unrolled.py`): same steps, fewer
    # kernels.
    "tsit5": Tsit5,
    "dopri5": Dopri5,
    "dopri8": Dopri8,
    "heun": dfx.Heun,
    "kvaerno5": dfx.Kvaerno5,  # implicit (stiff); dense Jacobian: small parameter counts
    # Stabilised explicit (stiff gradient flows, any parameter count): ROCK4 + RKC.
    "stabilized": StabilizedRK,
}


def _shown(x):
    """A field's concrete array as plain numbers (for messages); traced values as they are."""
    return x if is_traced(x) else np.asarray(x).tolist()


class AbstractVectorField(eqx.Module):
    """The right-hand side dθ/dt of a flow, from the loss gradient.

    A first-order field's state is the flat parameters θ. A phase-space field
    (`phase_space = True`, e.g. `MomentumField`) integrates a larger state (θ, v) whose
    parameters `position(y)` gives; a time-dependent one overrides `rhs(grad, t, y)`.
    """

    # Class attributes, not fields: True for fields whose state is (θ, v) (their laws may be
    # `AbstractPhaseSpaceLaw`s, evaluated on a `PhaseState`).
    phase_space = False

    @abc.abstractmethod
    def __call__(self, grad: Callable, y: Array) -> Array:
        """dθ/dt at the flat parameters `y`; `grad(y)` is ∇L(y)."""

    def rhs(self, grad: Callable, t: Array, y: Array) -> Array:
        """dy/dt at time `t` and state `y` (default: the autonomous `self(grad, y)`)."""
        del t
        return self(grad, y)

    def start(self, grad: Callable, y: Array) -> Array:
        """The state the flow starts from, given the initial parameters `y` (default `y`)."""
        del grad
        return y

    def position(self, y: Array) -> Array:
        """The flat parameters θ of the state `y` (default: `y` itself)."""
        return y


def _may_be_nonzero(value) -> bool:
    """False only for a concrete zero (a traced value may be anything)."""
    return isinstance(value, jax.core.Tracer) or bool(np.any(np.asarray(value) != 0))


class _WeightDecay(eqx.Module):
    """The weight decay λ of a field (its `weight_decay`), with its λθ term left out of the
    program where λ is a concrete zero: `decays` (static) records, when the field is made,
    whether λ may be non-zero. Any two non-zero λ share one compiled solve (λ is traced); λ = 0
    has a solve of its own.

    (With the term in the program, even at λ = 0, XLA computes every Runge–Kutta stage's input
    y₀ + Σⱼ aᵢⱼkⱼ again in each operation that reads it, recursively since each kⱼ holds the
    λyⱼ of its own stage: a third of a gradient flow's time.)"""

    decays: bool = eqx.field(static=True, init=False, repr=False)

    def __post_init__(self):
        self.decays = _may_be_nonzero(self.weight_decay)

    def decayed_grad(self, grad, theta):
        """∇L(θ) + λθ (∇L(θ) where λ is a concrete zero), for the gradient `grad`; with the
        sum taken parameter array by parameter array where `grad` has a `decayed(θ, λ)`
        (`gradient_flow`'s does)."""
        if not self.decays:
            self._refuse_late_decay()
            return grad(theta)
        if hasattr(grad, "decayed"):
            return grad.decayed(theta, self.weight_decay)
        return grad(theta) + self.weight_decay * theta

    def descent(self, grad, theta):
        """−(∇L(θ) + λθ): `-decayed_grad`, with the sign taken inside the gradient where λ is
        a concrete zero and `grad` has a `descent(θ)` (`gradient_flow`'s, the gradient of
        −L). There the joined parameter vector is the field itself: negated afterwards, each
        Runge–Kutta stage wrote one more state-sized array. The numbers are the same to the
        bit: every backward operation is linear in the cotangent and IEEE negation exact."""
        if not self.decays and hasattr(grad, "descent"):
            self._refuse_late_decay()
            return grad.descent(theta)
        return -self.decayed_grad(grad, theta)

    def _refuse_late_decay(self):
        # A λ put in after the field was made (`gradient_flow` makes it again; a direct call
        # cannot): refused, not left out. (Traced, λ is the one it was made with.)
        if not isinstance(self.weight_decay, jax.core.Tracer) and _may_be_nonzero(
                self.weight_decay):
            raise ArgumentError(
                f"`weight_decay` of this {type(self).__name__} was set after it was made "
                "(eqx.tree_at?), so its program leaves it out; make the field with it, "
                f"e.g. {type(self).__name__}(..., weight_decay=λ).")


def _remade(field):
    """`field`, made again from its own arguments where it has a weight decay: `decays` is
    set when a field is made, so a field whose λ was changed afterwards (`eqx.tree_at`, a
    `tree_map`) would otherwise leave a non-zero λ out of its program."""
    return dataclasses.replace(field) if isinstance(field, _WeightDecay) else field


class GradientField(AbstractVectorField, _WeightDecay):
    """Gradient flow dθ/dt = −∇L(θ) − λθ (weight decay λ, default 0; λ = 0 compiles a solve
    without the λθ term, any two non-zero λ share one)."""

    # Arrays, not Python floats: a new value must not recompile the solve.
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)

    def __call__(self, grad, y):
        return self.descent(grad, y)


class ModifiedGradientField(AbstractVectorField):
    """The modified equation of gradient descent / heavy ball with learning rate η, momentum β
    and weight decay λ (time t = η·step, PyTorch heavy ball v ← βv + g, θ ← θ − ηv, v₀ = 0):

        dθ/dt = −g/(1 − β) − η(1 + β)/(2(1 − β)³) · H g,    g = ∇L + λθ, H = ∇²L + λI,

    i.e. −∇L − (η/2)H∇L for plain GD (Kunin et al. 2021, §A.4; Kovachki & Stuart).

    **Initial layer (β > 0).** The heavy ball starts at rest, v₀ = 0, while on the slow
    manifold v ≈ g/(1 − β): its velocity error e_k = −β^k g(θ₀)/(1 − β) + O(η) decays like β^k,
    and its sum displaces the iterates by η Σ_{k≥1} β^k g(θ₀)/(1 − β) = δ (linearising
    around θ₀; exact for a quadratic loss up to O(η²)), with

        δ = ηβ/(1 − β)² · g(θ₀).

    So the iterates satisfy θ_k = θ̃(ηk) − β^k δ + O(η²) where θ̃ solves the modified equation
    from the *effective initial condition* θ̃(0) = θ₀ + δ. `gradient_flow` starts from θ₀ + δ
    when `effective_start=True` (the default; δ = 0 for β = 0), so its trajectory is O(η²) from
    the iterates once β^k ≲ η (k ≳ log η / log β, the initial layer), and O(η) inside the layer,
    where the iterates still lag by β^k δ; adding −β^k δ makes it O(η²) at every step.
    Without the effective start the modified flow is only O(η) off along the run for β > 0
    (a time lag of ηβ/(1 − β)). The saved loss and `final` are the flow's (at t = 0 the
    loss is L(θ₀ + δ)); law drifts are still measured from Q(θ₀).

    Measured (deep linear net 4-5-3, inputs ×0.3 so ‖H‖ ≈ 0.9, λ = 0.01; max over every step
    k ≤ 5/η of |θ_k − θ(ηk)|, order fitted over η = 0.04, 0.02, 0.01, 0.005; asserted in
    `tests/test_mechanics.py`): β = 0: plain flow order 1.0, modified flow 2.0. β = 0.5:
    plain flow 0.87; modified flow from θ₀ 0.97 (no better than plain); from θ₀ + δ, steps
    after the layer 1.78; with the −β^k δ term, every step 1.85. The expansion needs
    η‖H‖ ≪ (1 − β)² (beyond η‖H‖ = (1 − √β)² the heavy ball oscillates instead of following
    a slow manifold): with ‖H‖ ≈ 10 and β = 0.5 the orders at these η are pre-asymptotic.
    """

    lr: Array = eqx.field(converter=jnp.asarray)
    momentum: Array = eqx.field(default=0.0, converter=jnp.asarray)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)
    effective_start: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        # η = 0 is allowed: the η → 0 limit, the plain (heavy-ball) flow −g/(1 − β).
        number("lr", _shown(self.lr), ">=0", array=True,
               fix="the learning rate η the flow follows")
        number("momentum", _shown(self.momentum), "[0,1)", array=True,
               fix="β ≥ 1 never forgets a gradient (no slow manifold to follow)")
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)

    def __call__(self, grad, y):
        beta, lam = self.momentum, self.weight_decay
        g, hg = jax.jvp(lambda z: grad(z) + lam * z, (y,), (grad(y) + lam * y,))
        return -g / (1 - beta) - self.lr * (1 + beta) / (2 * (1 - beta) ** 3) * hg

    def start(self, grad, y):
        if not self.effective_start:
            return y
        beta = self.momentum
        return y + self.lr * beta / (1 - beta) ** 2 * (grad(y) + self.weight_decay * y)


class _PhaseMonitor(LawMonitor):
    """The laws of a phase-space flow: `AbstractPhaseSpaceLaw`s on the `PhaseState`, the
    others on its position (the model at θ)."""

    def _on(self, law, state):
        return state if isinstance(law, AbstractPhaseSpaceLaw) else state.position

    def values(self, state):
        return {law.name: law(self._on(law, state)) for law in self.laws}

    def conditions(self, state):
        return {law.name: law.condition(self._on(law, state)) for law in self.laws}

    def reference(self, state):
        return self.values(state), {law.name: law.scale(self._on(law, state))
                                    for law in self.laws}

    def drifts(self, values, reference, state=None):
        """As `LawMonitor.drifts`; given the current `state`, a phase-space law measures its
        drift there (`AbstractPhaseSpaceLaw.drift_at`: a time-weighted law against the size
        of its terms now, not only at the start)."""
        if state is None:
            return super().drifts(values, reference)
        ref_values, scales = reference
        return {law.name: (law.drift_at(values[law.name], ref_values[law.name],
                                        scales[law.name], state)
                           if isinstance(law, AbstractPhaseSpaceLaw) else
                           law.drift(values[law.name], ref_values[law.name], scales[law.name]))
                for law in self.laws}


def _check_phase_space(field, laws, velocity, ensemble, resume):
    """The arguments only a phase-space (second-order) field takes; a resumed one continues
    from `resume.velocity`."""
    if resume is not None and (resume.velocity is not None) != bool(field.phase_space):
        raise ArgumentError(
            f"`resume` is a {'second' if resume.velocity is not None else 'first'}-order "
            f"flow's Result but `field` is {type(field).__name__}; resume a run with the "
            "field it ran with.")
    if not field.phase_space:
        phase_laws = [law.name for law in laws if isinstance(law, AbstractPhaseSpaceLaw)]
        if phase_laws:
            raise ArgumentError(
                f"`laws` {phase_laws} are phase-space laws (they read the velocity of a "
                f"second-order flow) but `field` is {type(field).__name__}; use "
                "field=conservation.MomentumField(...) or NesterovField(...).")
        if velocity is not None:
            raise ArgumentError(
                f"`velocity` is the start velocity of a second-order flow, but `field` is "
                f"{type(field).__name__} (first order); leave it out or use a "
                "MomentumField / NesterovField.")
        return None
    if resume is not None:
        if velocity is not None:
            raise ArgumentError(
                "`velocity` and `resume` were both given; a resumed second-order flow "
                "continues from `resume.velocity`: leave `velocity` out.")
        velocity = resume.velocity
    if velocity is None:
        return None
    velocity = as_ensemble(model_parameters(velocity, "velocity"))
    if velocity.size != ensemble.size or not _same_structure(velocity, ensemble):
        raise ArgumentError(
            f"`velocity` must have the structure and shapes of `model` (one velocity per "
            f"member: {ensemble.size}), got {velocity.size} member(s) of "
            f"{type(velocity.models).__name__}; build it e.g. with "
            "jax.tree.map(jnp.zeros_like, model).")
    return eqx.filter(velocity.models, eqx.is_inexact_array)


def _same_structure(a, b) -> bool:
    """Two ensembles with the same tree structure and parameter shapes."""
    pa, pb = (jtu.tree_leaves(eqx.filter(e.models, eqx.is_inexact_array)) for e in (a, b))
    return (jtu.tree_structure(eqx.filter(a.models, eqx.is_inexact_array))
            == jtu.tree_structure(eqx.filter(b.models, eqx.is_inexact_array))
            and all(x.shape == y.shape for x, y in zip(pa, pb)))


def _check_solver(solver) -> None:
    """`solver`: "auto", a name of `SOLVERS` or an adaptive diffrax solver."""
    if isinstance(solver, dfx.AbstractAdaptiveSolver):
        return
    if isinstance(solver, dfx.AbstractSolver):
        raise ArgumentError(
            f"`solver` {type(solver).__name__} gives no error estimate, and gradient_flow "
            "adapts its steps to `rtol`/`atol`; pass an adaptive diffrax solver (e.g. "
            "diffrax.Heun() instead of diffrax.Euler()) or one of "
            f"{['auto', *sorted(SOLVERS)]}.")
    if not (isinstance(solver, str) and (solver == "auto" or solver in SOLVERS)):
        raise fail("solver", solver, f"must be one of {['auto', *sorted(SOLVERS)]} or an "
                   "adaptive diffrax solver")


def _resolve_solver(solver) -> dfx.AbstractSolver:
    _check_solver(solver)
    return solver if isinstance(solver, dfx.AbstractSolver) else SOLVERS[solver]()


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
    values="final",
    progress: bool | None = None,
    divergence: ScalarLike = 1e8,
    batch_size: int | None = None,
    field: AbstractVectorField | None = None,
    stop_at_loss: ScalarLike | None = None,
    resumable: bool = False,
    resume: Result | None = None,
    velocity: AbstractModel | Ensemble | None = None,
    observables=(),
) -> Result:
    """Integrate the gradient flow of `objective` from `model` (or every member of an ensemble).

    Law drifts are evaluated inside the solve at the `n_save` save times (the full trajectory
    is never stored, nor, by default, the laws' values: see `values`). Tolerances, `t1` and
    `divergence` are traced, so sweeping them reuses one compiled program. Work in float64
    (conservation enables it on import): drifts are compared with tolerances far below float32
    resolution.

    **Arguments:**

    - `objective`: from `conservation.make_objective`.
    - `model`: a model or an `Ensemble`.
    - `t1`: final time, a finite number > 0 (the flow starts at t = 0).
    - `n_save`: number of evenly spaced save times in [0, t1].
    - `solver`: `"auto"` (default: `conservation.choose_solver` probes the flow's stiffness and
      picks `"tsit5"`, `"stabilized"` or `"kvaerno5"`), `"tsit5"`, `"dopri5"`, `"dopri8"`,
      `"heun"` (explicit), `"stabilized"` (`StabilizedRK`: ROCK4 + RKC, stabilised explicit:
      stiff flows at any parameter count), `"kvaerno5"` (implicit, dense Jacobian: small
      models), or any diffrax solver.
    - `rtol`, `atol`: PID step-size controller tolerances (`atol` defaults to `rtol`), in
      (0, 0.01): a tolerance of 1 % or more cannot give a meaningful drift (the controller no
      longer keeps the solution near the flow: a loss that should fall rises).
    - `max_steps`: solver step budget per member; a member that runs out gets status
      `max_steps` and keeps the values saved so far.
    - `laws`: laws to monitor; default `model.laws()` (the architecture laws).
    - `values`: which law values to keep (drift, condition and loss are always kept per save):
      `"final"` (default) Q at the end of the run in `Result.final_values`; `"none"`;
      `"all"` every law at every save in `Result.values`; or a sequence of law names kept at
      every save (plus all final values).
    - `progress`: one progress bar for the whole ensemble (t/t1 and members finished);
      `None` (default) shows it only when stderr is a terminal. Off, the solve has no host
      callbacks.
    - `divergence`: a number > 0, or inf: a member whose parameter norm exceeds this, or
      whose state or loss becomes non-finite, is stopped and reported as `diverged`, at the
      step it happens (a member starting with a non-finite loss or parameters takes 0 steps;
      where the gradient is NaN the step size shrinks to ≤ 1e-12·max(1, |t|) first, see
      `StopOnNonFinite`); the others carry on.
    - `batch_size`: members integrated side by side, as lanes of one loop (each member keeps
      its own step size and takes the steps its own solve would; a lane whose member has
      finished loads the next one, so `batch_size` < ensemble size wastes no lockstep time
      on fixed chunks). 1 runs one diffrax solve per member, one after another. On the CPU
      the default is 4 lanes; 2 for the stabilised solver (whose lanes wait at every step
      for the stage count of the stiffest) or for members of more than 4096 parameters (whose
      gradients have little per-operation overhead to share): lanes share the per-operation
      overhead of small models' gradients and of the solver's inner loops
      (docs/benchmarks/ensembles.md, "Lanes on the CPU"). On GPU/TPU the default is as
      many members as fit in 3/4 of the device's free memory (solver state, one gradient
      evaluation's working set and the saved scalars per member, see
      `conservation._dynamics.batching`), at most the whole ensemble.
    - `field`: the right-hand side: `GradientField(weight_decay=λ)` (default λ = 0) or
      `ModifiedGradientField(lr, momentum, weight_decay)` to follow a discrete optimizer
      (with momentum it starts from the effective initial condition θ₀ + δ, see there);
      `SignField`, `PreconditionedField` (per-leaf learning rates), `MirrorField`; or a
      second-order field, `MomentumField` (heavy-ball ODE) or `NesterovField`, integrated in
      phase space (θ, v): the loss, the laws and `final` are θ's, `AbstractPhaseSpaceLaw`s
      (e.g. `AngularMomentumLaw`) are evaluated on (t, θ, v), the divergence norm is θ's,
      `solver="auto"` picks `"tsit5"` (a small mass μ is stiff: pass `"kvaerno5"`), and
      with `resumable=True` the Result keeps the final velocity (`Result.velocity`), from
      which `resume` continues (Nesterov's time goes on from `resume.t[-1]`).
    - `velocity`: second-order fields only: the start velocities v₀, a model (or ensemble)
      of the structure of `model` whose parameters are v₀ (default None: the field's own,
      v₀ = −c(∇L(θ₀) + λθ₀)).
    - `stop_at_loss`: a loss goal L* > 0 (or None, default: no goal). Each member stops where
      its loss reaches L* (L ≤ L*), with status `reached_loss`: a diffrax event whose
      condition L(θ) − L* is located on the step's dense output by a Newton root find (to
      1e-10 relative in t), so `final` is the state at the crossing and `Result.t_final`
      its time (recorded with `stop_at_loss`);
      a member starting at L ≤ L* takes 0 steps. Saves after the stop are `inf`. Traced: a
      new value does not recompile. Costs one loss evaluation per step.
    - `resumable`: keep in the Result what `resume` needs, the laws' values and scales at
      θ₀ (`Result.reference`: B × law size, as much as `final_values`); default False.
    - `resume`: a previous flow's `Result` (run with `resumable=True`) to continue (with
      `model=resume.final`; the returned Result is resumable again): the flow
      runs from its last time `resume.t[-1]` to `t1` (> it), from `resume.final`, with drifts
      still measured from the original θ₀ (`resume.reference`), and no effective start
      again. Only members that reached the previous end (`success`, `loss_increased`)
      continue; the others keep their status, `final` and step count. The returned Result
      is the whole run: its saves are the previous ones followed by `n_save` − 1 new ones
      evenly spaced in (t[-1], t1], `max_drift` over both, `num_steps` summed, statuses
      (and the loss-increase rule) over the whole run. `solver="auto"` reuses the solver
      that ran. The steps differ from one run to t1 (the solver restarts at t[-1] with a
      first step of 0.01), so the states agree to the solver tolerance, not bit for bit.
    - `observables`: observables of (θ, data) evaluated per member at every save inside the
      solve, e.g. `(conservation.Sharpness(k=3), conservation.GradientNorm())` (see
      `AbstractObservable`), returned in `Result.observables` (name → (B, T, *shape)).
      Default none. With `resume`, the same observables as the resumed run, and none that
      compare with the start (`KernelDistance`).

    **Memory:** the stored monitors are O(B·T·n_laws) scalars (loss, drift, condition at T =
    `n_save` saves for B members) plus B × (parameters + law sizes) for `final` /
    `final_values`; only `values="all"` (or named laws) stores B·T·(law size), e.g. 27 GB for
    256 members × 101 saves × the two 256×256 balance laws of a 128-256-256-32 deep linear
    net (P = 106 k). The solver state is ~12 copies of the parameters per lane
    (`batch_size`), ~17 for the stabilised solver. Refuses a run whose estimate exceeds the
    available memory (`conservation.InsufficientMemory`, an `ArgumentError`).

    **Returns:** a `conservation.Result`. Status per member: `success`; `max_steps`;
    `diverged` (above); `failed` (a solver failure); `loss_increased`: the flow reached t1
    with its final loss above 10× its initial loss (only the end point counts; see `Result`);
    `reached_loss` (`stop_at_loss`, above).

    Bad arguments raise `conservation.ArgumentError`, naming the argument.
    """
    ensemble = as_ensemble(model)
    check_objective(objective)
    t1 = number("t1", t1, ">0", fix="the final time of the flow (it starts at t = 0)")
    if stop_at_loss is not None:
        number("stop_at_loss", stop_at_loss, ">0",
               fix="the loss at which each member stops, or None (no goal)")
    t0 = 0.0 if resume is None else _check_resume(resume, ensemble, t1)
    n_save = integer("n_save", n_save, minimum=2, fix="the number of save times in [0, t1]")
    max_steps = integer("max_steps", max_steps, minimum=1)
    rtol = number("rtol", rtol, "rtol", array=True, fix="e.g. rtol=1e-8 (the default)")
    atol = rtol if atol is None else number("atol", atol, "rtol", array=True,
                                            fix="e.g. atol=1e-8, or None (= rtol)")
    check_divergence(divergence)
    if batch_size is not None:
        batch_size = integer("batch_size", batch_size, minimum=1,
                             fix="the members integrated side by side, or None (default)")
    _check_solver(solver)
    if not isinstance(resumable, bool | np.bool_):
        raise fail("resumable", resumable, "must be True or False")
    if progress is not None and not isinstance(progress, bool | np.bool_):
        raise fail("progress", progress, "must be True, False or None (only on a terminal)")
    field = GradientField() if field is None else _remade(field)
    if not isinstance(field, AbstractVectorField):
        raise fail("field", field, "must be an `AbstractVectorField` (e.g. `GradientField`, "
                   "`ModifiedGradientField`, `MomentumField`)",
                   "e.g. field=conservation.GradientField(weight_decay=1e-3)")
    laws = check_laws(default_laws(ensemble[0]) if laws is None else laws, ensemble)
    velocity = _check_phase_space(field, laws, velocity, ensemble, resume)
    observables = check_observables(observables)
    if resume is not None:
        check_resumed_observables(resume, observables)
    keep, final_values = values_to_keep(values, laws)
    if resume is not None:
        _check_resumed_laws(resume, laws, keep)
        if isinstance(solver, str) and solver == "auto" and resume.solver in SOLVERS:
            solver = resume.solver  # the steps go on with the solver that ran
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    check_flow_memory(objective, params, static, laws, keep, final_values, solver, n_save,
                      batch_size, ensemble.size)  # before anything is allocated
    show = show_progress(progress)
    mesh = _ensemble_mesh(params)
    carried = None
    if resume is not None:
        carried = (resume.reference, _continuing(resume.status))

    def arguments(solver):
        # `_flow`'s arguments with `solver` (resolved), and the lanes they run on.
        lanes = batch_size
        if lanes is None:
            free = free_device_memory()  # None on the CPU: no member's shape needed
            y0, unravel = (None, None) if free is None else flat_member(params)
            lanes = default_batch_size(
                lambda y: jax.grad(lambda z: objective(eqx.combine(unravel(z), static)))(y),
                y0, ensemble.size, solver, n_save, len(laws), free, member_parameters(params))
        batch = min(lanes, ensemble.size)
        args = (params, static, objective, field,
                (_PhaseMonitor if field.phase_space else LawMonitor)(laws), solver,
                *(as_float64(v) for v in (t0, t1, rtol, atol, divergence)),
                None if stop_at_loss is None else jnp.asarray(stop_at_loss, float),
                n_save, max_steps, show, ensemble.size)
        kwargs = dict(batch=batch, keep=keep, final_values=final_values, mesh=mesh,
                      resume=carried, resumable=bool(resumable), velocity=velocity,
                      observers=ObservableMonitor(observables, objective) if observables
                      else None)
        return args, kwargs, batch

    ahead = None  # (the arguments compiled ahead, the thread compiling them)
    if isinstance(solver, str) and solver == "auto":  # (Tsit5, unprobed, for phase space)
        if not field.phase_space and mesh is None and _can_compile_ahead():
            speculated = arguments(_resolve_solver("tsit5"))
            ahead = (speculated, _compile_ahead(*speculated[:2]))
        solver = _choose(*eqx.partition(ensemble[0], eqx.is_inexact_array), objective, field,
                         t1, max_steps).name
    solver_name = solver if isinstance(solver, str) else type(solver).__name__
    if ahead is not None and solver == "tsit5":
        (args, kwargs, batch), thread = ahead
        thread.join()  # the solve below is then the program compiled meanwhile
    else:
        args, kwargs, batch = arguments(_resolve_solver(solver))
    with _FlowBar(ensemble.size, t1, show):
        result = _flow(*args, **kwargs)
        if show:  # the bar closes when the solve has finished, not when it was dispatched
            result = jax.block_until_ready(result)
    _warn_max_steps(result.status, solver_name, max_steps)
    if mesh is not None:  # every device runs its own share of the members in its own lanes
        axes = mesh[1] if isinstance(mesh[1], tuple) else (mesh[1],)
        batch = min(batch, ensemble.size // int(np.prod([mesh[0].shape[a] for a in axes])))
    if resume is not None:
        result = join(resume, result)
    return dataclasses.replace(result, solver=solver_name, batch_size=batch)


def _can_compile_ahead() -> bool:
    """Whether `solver="auto"` compiles the Tsit5 solve while its probe runs: on the CPU
    backend (the lanes do not depend on free memory there) with a second core to do it on."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return jax.default_backend() == "cpu" and cores > 1


def _compile_ahead(args, kwargs) -> threading.Thread:
    """Compile `_flow(*args, **kwargs)` in a background thread (XLA compiles without the
    GIL): the solve most probes choose (Tsit5) compiles on the second core while the probe
    compiles and runs on the first. The executable is the one a call compiles (JAX keeps it
    for the call), so no number changes; a choice of another solver leaves it unused."""
    def compile_():
        # A failure here is the solve's own, raised by the call that follows.
        with contextlib.suppress(Exception):
            _flow.lower(*args, **kwargs).compile()

    thread = threading.Thread(target=compile_, name="conservation-compile-ahead", daemon=True)
    thread.start()
    _AHEAD[:] = [t for t in _AHEAD if t.is_alive()] + [thread]
    return thread


# Compiles still running when the interpreter exits are waited for (an unused one, when the
# probe chose another solver): a thread stopped inside XLA during shutdown could crash it.
_AHEAD: list[threading.Thread] = []


@atexit.register
def _wait_for_compiles_ahead():
    for thread in _AHEAD:
        thread.join()


def _continuing(status):
    """The members of a resumed run that go on: those that reached the previous end."""
    status = jnp.asarray(status)
    return (status == SUCCESS) | (status == LOSS_INCREASED)


def _check_resume(resume, ensemble, t1) -> float:
    """`gradient_flow(resume=)`: a flow's Result whose `final` is `model`; returns its end
    time t[-1] (< `t1`)."""
    if not isinstance(resume, Result) or resume.train_state is not None:
        raise fail("resume", type(resume).__name__, "must be the Result of a previous "
                   "`gradient_flow`", "train's Results continue with train(resume=...)")
    if resume.reference is None:
        raise fail("resume", "Result", "has no `reference` (the laws at θ₀ the drifts are "
                   "measured from)", "run the first part with resumable=True")
    if not same_parameters(ensemble, resume.final):
        raise fail("model", "a model other than resume.final", "must be `resume.final` when "
                   "resuming (the flow continues from its last state)",
                   "call gradient_flow(objective, previous.final, t1, resume=previous)")
    start = float(resume.t[-1])
    if not is_traced(t1) and not float(t1) > start:
        raise fail("t1", t1, f"must be beyond the resumed run's end t = {start:g}",
                   "t1 is the new final time, not a duration")
    return start


def _check_resumed_laws(resume, laws, keep) -> None:
    names = sorted(law.name for law in laws)
    if names != sorted(resume.reference[0]):
        raise ArgumentError(
            f"`laws` {names} differ from the resumed run's {sorted(resume.reference[0])}; "
            "resume with the same laws (their drifts continue from the same θ₀).")
    if sorted(keep) != sorted(resume.values):
        raise ArgumentError(
            f"`values` keeps {sorted(keep)} but the resumed run kept "
            f"{sorted(resume.values)}; resume with the same `values`.")


def join(first: Result, then: Result) -> Result:
    """One Result for a run and its continuation (`resume`): the saves of `then` after its
    first (which repeats `first`'s last) appended to `first`'s, `max_drift` over both,
    `num_steps` summed, the statuses of `then` for the members that continued (the
    loss-increase rule applied to the whole run) and `first`'s for the others."""
    go = _continuing(first.status)

    def glue(a, b):
        return jnp.concatenate([a, b[:, 1:]], axis=1)

    loss = glue(first.loss, then.loss)
    # The continuation's own loss-increase verdict compared its end with its start, not the
    # run's: undone, and the rule applied to the joined losses.
    status = jnp.where(then.status == LOSS_INCREASED, SUCCESS, then.status)
    status = mark_loss_increased(loss, jnp.where(go, status, first.status))
    return dataclasses.replace(
        then,
        t=jnp.concatenate([first.t, then.t[1:]]),
        loss=loss,
        values={k: glue(first.values[k], then.values[k]) for k in then.values},
        drift={k: glue(first.drift[k], then.drift[k]) for k in then.drift},
        max_drift={k: jnp.where(go, jnp.maximum(first.max_drift[k], then.max_drift[k]),
                                first.max_drift[k]) for k in then.max_drift},
        condition={k: glue(first.condition[k], then.condition[k]) for k in then.condition},
        observables={k: glue(first.observables[k], then.observables[k])
                     for k in then.observables},
        status=status,
        num_steps=first.num_steps + then.num_steps,
        reference=first.reference,
        t_final=(then.t_final if first.t_final is None or then.t_final is None
                 else jnp.where(go, then.t_final, first.t_final)),
    )


def _ensemble_mesh(params):
    """(mesh, axis name) when the ensemble axis of `params` is split over several devices
    (`shard_ensemble`), else None."""
    sharding = getattr(jtu.tree_leaves(params)[0], "sharding", None)
    if (isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1
            and len(sharding.spec) and sharding.spec[0] is not None):
        return sharding.mesh, sharding.spec[0]
    return None


def _warn_max_steps(status, name, max_steps):
    """Warn about members that ran out of steps (`max_steps` only: a member whose loss or
    state went non-finite is `diverged`, stopped where it happened, and not a stiff flow)."""
    if isinstance(status, jax.core.Tracer):  # inside jit / eval_shape: nothing to inspect yet
        return
    hit = int(np.sum(np.asarray(status) == MAX_STEPS))  # on the host: no program
    if hit:
        advice = ("raise `max_steps`" if name in ("stabilized", "kvaerno5") else
                  "a stiff flow (large Hessian eigenvalues) needs `solver=\"stabilized\"` (or "
                  "`\"kvaerno5\"` for small models), otherwise raise `max_steps`")
        warnings.warn(
            f"{hit} member(s) hit `max_steps` = {max_steps} before t1 with solver {name!r}; "
            f"{advice}.", stacklevel=3)


class _FlowBar:
    """The host side of a flow's progress display: one tqdm bar for the whole ensemble."""

    active = None  # the bar of the flow in progress (one flow runs at a time per host)

    def __init__(self, size, t1, show):
        self.show, self.size, self.t1 = show, size, float(t1)
        self.fraction = np.zeros(size)
        self.finished = np.zeros(size, bool)

    def __enter__(self):
        if self.show:
            self.bar = tqdm(total=self.size, bar_format="{desc} |{bar}| [{elapsed}<{remaining}]")
            self._describe(0.0)
            _FlowBar.active = self
        return self

    def __exit__(self, *exc):
        if self.show:
            _FlowBar.active = None
            self.bar.n = float(np.sum(self.fraction))
            self._describe(self.t1 if not exc[0] else np.max(self.fraction) * self.t1)
            self.bar.close()

    def _describe(self, t):
        self.bar.set_description_str(
            f"flow: t={t:.3g}/{self.t1:.3g}, members {int(self.finished.sum())}/{self.size}",
            refresh=False)

    def _redraw(self, t):
        # The bar's count is the members' summed progress (a member = 1).
        self._describe(t)
        self.bar.update(float(np.sum(self.fraction)) - self.bar.n)

    @staticmethod
    def report(member, progress):
        self = _FlowBar.active
        if self is None:
            return
        # Under vmap the callback may see one member or a batch of them.
        for m, p in zip(np.atleast_1d(member), np.atleast_1d(progress)):
            self.fraction[int(m)] = max(self.fraction[int(m)], float(p))
        self._redraw(float(np.atleast_1d(progress).min()) * self.t1)

    @staticmethod
    def update(members, fraction, finished):
        """Several members at once: t/t1 reached by each and whether it has finished."""
        self = _FlowBar.active
        if self is None:
            return
        members = np.asarray(members)
        self.fraction[members] = np.where(finished, 1.0,
                                          np.maximum(self.fraction[members], fraction))
        self.finished[members] = np.asarray(finished)
        running = self.fraction[~self.finished]
        self._redraw((running.min() if running.size else 1.0) * self.t1)

    @staticmethod
    def finish(member):
        self = _FlowBar.active
        if self is None:
            return
        for m in np.atleast_1d(member):
            self.fraction[int(m)], self.finished[int(m)] = 1.0, True
        self._redraw(self.t1)


class _MemberProgress(dfx.AbstractProgressMeter):
    """Reports (member, t/t1) of one solve to the flow's single host-side bar."""

    member: Array
    refresh_steps: int = eqx.field(default=20, static=True)

    def init(self):
        return jnp.asarray(0)

    def step(self, state, progress):
        # As diffrax's TqdmProgressMeter: a callback every `refresh_steps` solver steps, with an
        # unbatched predicate so that vmapped members do not call back on every step.
        def report(member, progress):
            jax.debug.callback(_FlowBar.report, member, progress)

        jax.lax.cond(eqxi.nonbatchable(eqxi.unvmap_max(state) % self.refresh_steps == 0),
                     report, lambda *_: None, self.member, progress)
        return state + 1

    def close(self, state):
        del state
        jax.debug.callback(_FlowBar.finish, self.member)


# diffrax's `diffeqsolve` starts every ODE with this step when given none (its initial-step
# heuristic is skipped for the wrapped terms it builds); both loops below start with it, so a
# member takes the same steps whichever runs it.
_FIRST_STEP = 0.01


class _RootInTime(optx.Newton):
    """Newton's method for an event time, terminated when its last step in t is below
    atol + rtol·|t| (Newton converges quadratically: the error is then far below it).
    optimistix's Newton also asks |f| < atol, in the loss's units: the loss's own round-off
    (absolute, ~1e-16 × the size of its terms) would keep a goal near the accuracy floor from
    ever terminating (a `failed` member)."""

    def terminate(self, fn, y, args, options, state, tags):
        del fn, args, options, tags
        small = jnp.abs(state.diff) < self.atol + self.rtol * jnp.abs(y)
        return small | (state.result != optx.RESULTS.successful), state.result


# Where a flow's loss crosses `stop_at_loss`: Newton on the step's dense output from the
# step's end (clipped to the step), to 1e-10 relative in t, far below what the solver
# tolerance does to the time.
_ROOT_FINDER = _RootInTime(rtol=1e-10, atol=1e-10)


@eqx.filter_jit
def _flow(params, static, objective, field, monitor, solver, t0, t1, rtol, atol, divergence,
          stop, n_save, max_steps, progress, size, batch, keep, final_values, mesh,
          resume=None, resumable=False, velocity=None, observers=None):
    # `stop`: None, or the traced loss goal; `resume`: None, or (reference, active) per member
    # for a continued run (the start state is the previous final one, no effective start).
    ts = jnp.linspace(t0, t1, n_save)
    # The solver state is one flat vector per member: diffrax's per-step work is a tree_map
    # over the state, so one leaf instead of one per parameter array is ~20% faster.
    y0 = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)
    _, unravel = jfu.ravel_pytree(jtu.tree_map(lambda x: x[0], params))
    # A phase-space field's state is (θ, v): its first n entries are the parameters. Rows of
    # `y0` are θ₀, or (θ₀, v₀) when the start velocities are given. First-order fields keep
    # the plain path (no slicing: the same compiled program as before phase space existed).
    phase, n = field.phase_space, y0.shape[1]
    if velocity is not None:
        y0 = jnp.concatenate([y0, jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(velocity)], 1)

    def theta(y):
        return y[..., :n] if phase else y

    def as_model(y):
        return eqx.combine(unravel(theta(y)), static)

    def point(t, y):
        # What a phase-space flow's laws are evaluated on: (t, w(t), θ, v).
        return PhaseState(t, field.weight(t), as_model(y),
                          eqx.combine(unravel(y[..., n:]), static))

    # Traced once and then called: the solvers evaluate the gradient at ~25 places in their
    # loop bodies (stages, saves, diffrax's shape checks), each a fresh trace without the jit.
    @jax.jit
    def gradient(y):
        return jax.grad(lambda z: objective(as_model(z)))(y)

    @jax.jit
    def decayed(y, weight_decay):
        # ∇L(θ) + λθ with λθ added to each parameter array before they are joined into one
        # vector (`_WeightDecay.decayed_grad`): added to the joined vector, XLA recomputes
        # every Runge–Kutta stage's input in each of its consumers.
        params = unravel(y)
        g = jax.grad(lambda p: objective(eqx.combine(p, static)))(params)
        return jfu.ravel_pytree(jtu.tree_map(lambda a, b: a + weight_decay * b, g,
                                             params))[0]

    @jax.jit
    def descent(y):
        return jax.grad(lambda z: -objective(as_model(z)))(y)

    def grad(y):
        return gradient(y)

    grad.decayed = decayed
    grad.descent = descent

    def initial(row):
        # A phase-space flow's start state: the row (θ₀, v₀) when the velocities are given,
        # else (θ₀, the field's own v₀).
        return row if velocity is not None else field.start(grad, row)

    autonomous = type(field).rhs is AbstractVectorField.rhs

    def vector_field(*ty):
        # (y) for autonomous fields, (t, y) for time-dependent ones (`solve_lanes`'s
        # `time_dependent`).
        return field(grad, *ty) if autonomous else field.rhs(grad, *ty)

    def diverged(y):
        return ~(jnp.linalg.norm(theta(y)) < divergence)  # also true for nan

    def goal(y):
        # ≤ 0 once the loss reached `stop` (the float condition of the event); a NaN loss is
        # no goal (the divergence rules name it).
        gap = objective(as_model(y)) - stop
        return jnp.where(jnp.isnan(gap), jnp.inf, gap)

    def start(row, *extra):
        # A member whose loss is non-finite at its start has no flow: its state is made
        # non-finite, so that the divergence check stops it before its first step (0 steps,
        # `diverged`; its `final` is restored to `row` below). A resumed member that is not
        # to continue is stopped the same way (its status is the previous one).
        ok = jnp.isfinite(objective(as_model(row)))
        if resume is None and phase:
            y = initial(row)
            reference = monitor.reference(point(t0, y))
        elif resume is None:
            y, reference = field.start(grad, row), monitor.reference(as_model(row))
        else:
            (reference, go), y = extra, row
            ok = ok & go
        if observers is not None:  # with the observables' references at θ₀
            reference = (reference, observers.reference(as_model(row)))
        return jnp.where(ok, y, jnp.nan), reference

    def observe(t, y, reference):
        # Reduce to scalars here: the saved buffers are (n_save,) per law, never
        # (n_save, *law shape) unless asked for (`keep`).
        if observers is not None:
            reference, observed = reference
            model = as_model(y)
            return (*observe_laws(t, y, reference), observers.values(model, observed))
        return observe_laws(t, y, reference)

    def observe_laws(t, y, reference):
        model = as_model(y)
        at = point(t, y) if phase else model  # (first order: the model, built once)
        law_values = monitor.values(at)
        return (objective(model), monitor.drifts(law_values, reference,
                                                 *((at,) if phase else ())),
                monitor.conditions(at), {k: law_values[k] for k in keep})

    controller = step_size_controller(solver, rtol, atol, save_ts=ts)

    def solve_one(args):
        row, member, extra = args
        y, reference = start(row, *extra)
        if stop is None:
            event = dfx.Event(lambda t, y, args, **kwargs: diverged(y))
        else:
            # Two conditions, the first that fires wins: divergence (or a start at the goal,
            # which stops before the first step), then the loss crossing `stop`, located by
            # the root finder on the step's dense output.
            there = goal(y) <= 0
            event = dfx.Event([lambda t, y, args, **kwargs: diverged(y) | there,
                               lambda t, y, args, **kwargs: goal(y)], _ROOT_FINDER)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: vector_field(y) if autonomous
                        else vector_field(t, y)), solver, t0, t1, _FIRST_STEP, y,
            saveat=dfx.SaveAt(subs=[
                dfx.SubSaveAt(ts=ts, fn=lambda t, y, args: observe(t, y, reference)),
                dfx.SubSaveAt(t1=True)]),
            stepsize_controller=controller,
            max_steps=max_steps,
            event=event,
            progress_meter=_MemberProgress(member) if progress else dfx.NoProgressMeter(),
            throw=False,
        )
        saved, final = sol.ys
        if stop is None:
            stopped = jnp.where(sol.event_mask, DIVERGED, FAILED)
        else:
            first, crossed = sol.event_mask
            event = sol.result == dfx.RESULTS.event_occurred
            stopped = jnp.where(first & event, jnp.where(there, REACHED_LOSS, DIVERGED),
                                jnp.where(crossed & event, REACHED_LOSS, FAILED))
        status = jnp.where(
            sol.result == dfx.RESULTS.successful, SUCCESS,
            jnp.where(sol.result == dfx.RESULTS.max_steps_reached, MAX_STEPS, stopped))
        return saved, final[-1], status, sol.stats["num_steps"], sol.ts[1][-1]

    def solve(y0, members, extra):
        if batch == 1:
            # One member at a time, each in its own diffrax solve (a plain map: `lax.map`
            # with `batch_size=1` would vmap a batch of one, and run the solve's loops with
            # batched predicates, selecting over their whole state: ~1.5× slower with 101
            # saves).
            saved, final, status, num_steps, t_final = jax.lax.map(solve_one,
                                                                   (y0, members, extra))
        else:
            # `batch` lanes side by side, refilled from the members as they finish.
            saved, final, status, num_steps, _, t_final = solve_lanes(
                vector_field, solver, controller, start, observe, y0, t1, ts, _FIRST_STEP,
                lanes=min(batch, y0.shape[0]), max_steps=max_steps, diverged=diverged,
                members=members, report=_FlowBar.update if progress else None, t0=t0,
                extra=extra, goal=None if stop is None else goal, root_finder=_ROOT_FINDER,
                return_t_final=True, time_dependent=not autonomous)
        if not final_values:
            last = {}
        elif phase:
            last = jax.lax.map(lambda a: monitor.values(point(a[1], a[0])), (final, t_final))
        else:
            last = jax.lax.map(lambda y: monitor.values(as_model(y)), final)
        return saved, final, status, num_steps, last, t_final

    members = jnp.arange(size)
    extra = () if resume is None else resume
    if mesh is None:
        saved, final, status, num_steps, last, t_final = solve(y0, members, extra)
    else:
        # An ensemble split over devices (`shard_ensemble`): every device integrates its own
        # members, in its own map or lanes. Left to GSPMD, the loop's state (not sharded)
        # was computed whole on every device.
        mesh, axis = mesh
        spec = jax.sharding.PartitionSpec(axis)
        saved, final, status, num_steps, last, t_final = jax.shard_map(
            solve, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
            y0, members, extra)
    if stop is not None:
        # A member at its goal from the start stopped before its first step, and before its
        # first save: its start is saved (the saves after it stay `inf`).
        at_start = (status == REACHED_LOSS) & (num_steps == 0)

        def with_start(saved):
            first = jax.lax.map(lambda a: observe(t0, *start(a[0], *a[1])), (y0, extra))
            return jtu.tree_map(
                lambda s, f: s.at[:, 0].set(jnp.where(
                    at_start.reshape((-1,) + (1,) * (f.ndim - 1)), f, s[:, 0])),
                saved, first)

        saved = jax.lax.cond(jnp.any(at_start), with_start, lambda s: s, saved)
    loss, drift, condition, values, *observed = saved
    # A member stopped before its first step (diverged at its start) ends where it started.
    speed = None
    if phase and (resumable or resume is not None):
        # What `resume` continues from: v at `final` (a member stopped before its first step:
        # its start velocity).
        speed = jnp.where((num_steps == 0)[:, None], jax.vmap(initial)(y0)[:, n:],
                          final[:, n:])
    final = jnp.where((num_steps == 0)[:, None], theta(y0), theta(final))
    t_final = jnp.where(num_steps == 0, t0, t_final)
    # A loss that is non-finite at a save time whose gradient stayed finite (the flow went
    # on): not a success.
    status = jnp.where((status == SUCCESS) & ~jnp.all(jnp.isfinite(loss), axis=1), DIVERGED,
                       status)
    status = mark_loss_increased(loss, status)
    if resume is not None:
        reference = resume[0]
    elif resumable and phase:
        reference = jax.lax.map(lambda y: monitor.reference(point(t0, initial(y))), y0)
    elif resumable:
        reference = jax.lax.map(lambda y: monitor.reference(as_model(y)), y0)
    else:
        reference = None
    return Result(
        t=ts,
        loss=loss,
        values=values,
        drift=drift,
        max_drift={k: finite_max(d) for k, d in drift.items()},
        condition=condition,
        final=Ensemble(eqx.combine(jax.vmap(unravel)(final), static), size),
        status=status,
        num_steps=num_steps,
        final_values=last,
        reference=reference,
        t_final=None if stop is None else t_final,
        observables=observed[0] if observed else {},
        velocity=None if speed is None else Ensemble(
            eqx.combine(jax.vmap(unravel)(speed), static), size),
    )
