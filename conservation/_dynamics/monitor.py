"""Monitors: law values and drifts evaluated inside a run, and the `Result` of a run."""

import sys
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float, Int
from .._laws.base import AbstractLaw
from .._models.base import Ensemble
from .._validation import ArgumentError, fail

STATUS_NAMES = ("success", "max_steps", "diverged", "failed", "loss_increased", "reached_loss")
ILL_CONDITIONED = 1e-6  # a law's `condition` below this: its drift is round-off noise
SUCCESS, MAX_STEPS, DIVERGED, FAILED, LOSS_INCREASED, REACHED_LOSS = range(6)
# A run that reached its end with its final loss above this multiple of its initial loss gets
# status `loss_increased` (see `mark_loss_increased`).
LOSS_INCREASE_FACTOR = 10.0
# A final loss below this multiple of the initial loss is below the accuracy every objective
# guarantees (see `below_accuracy`).
ACCURACY_FLOOR = 1e-14


def mark_loss_increased(loss, status):
    """The statuses of a run with the loss-increase rule applied (flows and discrete runs).

    A member whose run ended with status `success`, whose initial loss `loss[:, 0]` is finite
    and ≥ 0, and whose final loss `loss[:, -1]` is finite and more than `LOSS_INCREASE_FACTOR`
    (10) times the initial one gets status `LOSS_INCREASED` ("loss_increased"); every other
    status is returned unchanged. Only the end point is compared with the start, so a transient
    spike that comes back (a catapult at the edge of stability) is not flagged. The status
    records what was measured — the (un-regularised) loss ended above 10× its start — not a
    fault: weight decay, or a modified flow, can legitimately raise the loss.

    **Arguments:** `loss`, shape (B, T) (T ≥ 1 saves, the first at the start and the last at
    the end of the run); `status`, shape (B,), integer codes of `STATUS_NAMES`.

    **Returns:** the statuses, shape (B,), as a JAX array of `status`'s dtype (works under
    `jit`).
    """
    loss = jnp.asarray(loss)
    status = jnp.asarray(status)
    first, last = loss[..., 0], loss[..., -1]
    increased = (jnp.isfinite(first) & jnp.isfinite(last) & (first >= 0)
                 & (last > LOSS_INCREASE_FACTOR * first))
    return jnp.where((status == SUCCESS) & increased,
                     jnp.asarray(LOSS_INCREASED, status.dtype), status)


def below_accuracy(loss) -> np.ndarray:
    """Whether each member's final loss is below the accuracy every objective guarantees:
    |L_final| < `ACCURACY_FLOOR` · |L_0| = 1e-14 · |L_0| (both finite, L_0 ≠ 0).

    Why 1e-14 · L_0: a loss computed in float64 as a sum of terms that cancel carries an
    absolute rounding error of at least ε·S (unit round-off ε = 1.1e-16, each operation
    rounding to ε relative; S the size of the terms), however small the result. In the
    objective forms whose terms do not shrink near a fit — the expanded moments
    c + tr(ΦᵀMΦ) − 2tr(BᵀΦ) (terms ~ ‖M‖‖Φ‖² + c, about the initial loss L_0 of an
    initialisation near the data's scale; README: "off by ~1e-16·c absolute"), log-cosh or
    cross-entropy near a perfect fit (log of 1 + a number below ε) — S ~ |L_0|, and a sum of a
    few hundred rounded terms accumulates ~10²ε. So below 1e-14·|L_0| such a loss has a
    relative error of order 1 (≥ 1 % even with no accumulation): its digits are noise. The
    default MSE form (squares of residuals, ‖R[Φ; −I]‖²) resolves further (relative error
    ~1e-16·√(c/L)), so a flagged value may still be right there; the flag says the value is
    beyond what holds for every objective, not that it is wrong.

    **Arguments:** `loss`: shape (..., T), the first save at the start, the last at the end.

    **Returns:** a numpy bool array, shape (...).
    """
    loss = np.asarray(loss)
    first, last = loss[..., 0], loss[..., -1]
    with np.errstate(invalid="ignore"):
        return (np.isfinite(first) & np.isfinite(last) & (first != 0)
                & (np.abs(last) < ACCURACY_FLOOR * np.abs(first)))


class LawMonitor(eqx.Module):
    """Evaluates a fixed tuple of laws on one model, and their drifts from a reference."""

    laws: tuple[AbstractLaw, ...]

    def values(self, model) -> dict[str, Array]:
        return {law.name: law(model) for law in self.laws}

    def conditions(self, model) -> dict[str, Array]:
        return {law.name: law.condition(model) for law in self.laws}

    def reference(self, model) -> tuple[dict[str, Array], dict[str, Array]]:
        """(Q(θ₀), scale(θ₀)) for every law: what later drifts are measured against."""
        return self.values(model), {law.name: law.scale(model) for law in self.laws}

    def drifts(self, values, reference) -> dict[str, Array]:
        """Relative drift max_i |Q_i − Q_i(θ₀)| / scale_i of each law (works on stacked values)."""
        ref_values, scales = reference
        out = {}
        for law in self.laws:
            name = law.name
            n_lead = values[name].ndim - ref_values[name].ndim
            drift = law.drift
            for _ in range(n_lead):  # saved values carry leading time axes
                drift = jax.vmap(drift, in_axes=(0, None, None))
            out[name] = drift(values[name], ref_values[name], scales[name])
        return out


class TrainState(eqx.Module):
    """What a discrete run needs to continue (`train(..., resume=result)`): `opt_state`, the
    optimizer state of every member (leading axis B), `key`, the members' PRNG keys (B, …),
    and `step`, the run's step count (a 0-d integer array)."""

    opt_state: object
    key: Array
    step: Array


class Result(eqx.Module):
    """What a run of an ensemble returns (leading axis B = ensemble member, T = save point).

    - `t`: the save times, shape (T,) (physical time; for discrete optimizers step × `step_time`).
    - `loss`: L(θ(t)), shape (B, T).
    - `values`: law name → Q(θ(t)), shape (B, T, *law shape), only for the laws asked for with
      `values="all"` or by name (empty by default: that is B·T·law size of memory).
    - `drift`: law name → relative drift at the save times, shape (B, T).
    - `max_drift`: law name → largest drift seen, shape (B,). Discrete runs take it over every
      step, not just the save points.
    - `condition`: law name → the law's `condition` at the save times, shape (B, T); where it
      falls below `ILL_CONDITIONED` (1e-6) the law's drift is round-off noise, and `summary`
      counts the member as ill-conditioned for that law.
    - `final`: the ensemble at the end of the run.
    - `final_values`: law name → Q(`final`), shape (B, *law shape) (empty with
      `values="none"`).
    - `status`: per member, 0 success, 1 max_steps, 2 diverged, 3 failed, 4 loss_increased,
      5 reached_loss (see `status_names`). `diverged`: the parameter norm exceeded
      `divergence`, or the parameters or the loss became non-finite (in a flow: the
      gradient, so that no step could be taken) — at the step it happened; a member that
      starts there is `diverged` after 0 steps. (A flow whose gradient stayed finite while
      its loss at a save time did not is `diverged` too, with the steps it took.)
      `loss_increased`: the run reached its end (it would have been `success`) with a finite
      final loss more than 10× its finite, non-negative initial loss (`loss[:, -1] >
      10 · loss[:, 0]`); only the end is compared with the start, so a transient spike that
      comes back (a catapult at the edge of stability) is not flagged. It records what was
      measured, not a fault: weight decay or a modified flow can raise the un-regularised
      loss legitimately.
      `reached_loss`: the run was given `stop_at_loss` = L* and the member's loss reached
      L* (loss ≤ L*): a flow stops at the time the loss crosses L*, located on the step's
      dense output (a diffrax event with a root find; `t_final` says when, `final` is the
      state there); a discrete run stops before the first step k whose loss L(θ_k) ≤ L*
      (`final` = θ_k, `num_steps` = k). A member whose loss starts ≤ L* takes 0 steps. The
      loss-increase rule never applies to it.
    - `num_steps`: solver steps (flow) or optimizer steps taken (discrete), per member.
    - `solver`: the solver a flow ran with (`"auto"` resolved to what `choose_solver` picked;
      a diffrax solver object by its class name); None for discrete runs.
    - `batch_size`: members a flow integrated side by side (its `batch_size`, the default
      resolved, per device when the ensemble is sharded); None for discrete runs.
    - `reference`: (Q(θ₀), scale(θ₀)), law name → shape (B, *law shape) and (B, …): what the
      drifts are measured from (the original start, also after `resume`); only with
      `resumable=True` (else None: B × law size of memory, as much as `final_values`).
    - `t_final`: the time of `final` per member, shape (B,), with `stop_at_loss` (else
      None): the end of the run for members that reached it, the stop time for the others
      (a flow's `reached_loss` member: the crossing time).
    - `train_state`: a discrete run's optimizer state and PRNG keys (`TrainState`), what
      `train(..., resume=result)` continues from; only with `resumable=True`.
    - `observables`: observable name → its value at the save times, shape (B, T, *shape)
      (e.g. (B, T, k) for `Sharpness(k)`), for the `observables=` of the run (empty
      without); `inf` after a member stopped, like the drifts.
    - `velocity`: a second-order flow's velocity v = θ̇ at `final` (an `Ensemble` of the
      model's structure), only with `resumable=True` (what `resume` continues from); else
      None.

    A run made with `resumable=True` can be continued with `gradient_flow(...,
    resume=result)` or `train(..., resume=result)`: the returned Result holds the whole run
    (the saves of both parts joined, drifts measured from the original θ₀, `num_steps`
    summed). Only members that
    reached the previous end (`success`, `loss_increased`) continue; the others keep their
    status, `final` and step count.

    Entries after a member stopped (diverged / max_steps) are `inf` or frozen, never silently
    mixed into the other members' numbers.
    """

    t: Float[Array, " T"]
    loss: Float[Array, "B T"]
    values: dict[str, Array]
    drift: dict[str, Float[Array, "B T"]]
    max_drift: dict[str, Float[Array, " B"]]
    condition: dict[str, Float[Array, "B T"]]
    final: Ensemble
    status: Int[Array, " B"]
    num_steps: Int[Array, " B"]
    final_values: dict[str, Array] = eqx.field(default_factory=dict)
    solver: str | None = eqx.field(static=True, default=None)
    batch_size: int | None = eqx.field(static=True, default=None)
    reference: tuple[dict[str, Array], dict[str, Array]] | None = None
    t_final: Float[Array, " B"] | None = None
    train_state: "TrainState | None" = None
    observables: dict[str, Array] = eqx.field(default_factory=dict)
    velocity: Ensemble | None = None

    def status_names(self) -> list[str]:
        """The status of each member as a word."""
        return [STATUS_NAMES[int(s)] for s in np.asarray(self.status)]

    def summary(self) -> dict:
        """JSON-ready digest: per-law worst drift over successful members (`success`, and
        `reached_loss`: stopped on their goal), statuses, steps, `final_loss_median` over the
        `success` members only (a member stopped on its goal has no loss at the last save:
        its goal is its final loss), and `final_loss_below_accuracy`: how many members' final
        loss is below 1e-14 × their initial loss, beyond the accuracy every objective
        guarantees (see `below_accuracy`)."""
        status = np.asarray(self.status)
        ok = status == SUCCESS
        ran = ok | (status == REACHED_LOSS)
        loss = np.asarray(self.loss)
        return {
            "members": int(status.size),
            "status": {name: int(np.sum(status == i)) for i, name in enumerate(STATUS_NAMES)},
            "final_loss_median": _finite_median(loss[ok, -1]) if ok.any() else None,
            "final_loss_below_accuracy": int(np.sum(below_accuracy(loss))),
            "max_drift": {
                name: float(np.max(np.asarray(d)[ran])) if ran.any() else None
                for name, d in self.max_drift.items()
            },
            "ill_conditioned": {
                name: int(np.sum(np.min(np.asarray(c), axis=1) < ILL_CONDITIONED))
                for name, c in self.condition.items()
            },
            "num_steps_max": int(np.max(np.asarray(self.num_steps))),
            **({"observables_final_median": _observables_median(self.observables, ran)}
               if self.observables else {}),
            **({"solver": self.solver} if self.solver is not None else {}),
            **({"batch_size": self.batch_size} if self.batch_size is not None else {}),
        }


def values_to_keep(values, laws) -> tuple[tuple[str, ...], bool]:
    """Parse a run's `values` argument: (law names kept at every save, keep final values)."""
    names = tuple(law.name for law in laws)
    must = "must be 'none', 'final', 'all' or a sequence of law names"
    if isinstance(values, str):
        modes = {"none": ((), False), "final": ((), True), "all": (names, True)}
        if values not in modes:
            raise fail("values", values, must, f"the monitored laws are {list(names)}")
        return modes[values]
    if not isinstance(values, Iterable) or isinstance(values, bytes):
        raise fail("values", values, must)
    values = tuple(values)
    unknown = [v for v in values if not isinstance(v, str) or v not in names]
    if unknown:
        raise ArgumentError(f"`values` names {unknown} that are not monitored laws; choose "
                            f"from {list(names)}.")
    return tuple(n for n in names if n in values), True


def show_progress(progress: bool | None) -> bool:
    """`progress=None` means: only when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def _observables_median(observables, ran) -> dict:
    """Per observable, the median over members that ran (`success`, `reached_loss`) of its
    value at the last save, non-finite values left out (a list for vector observables such
    as the top-k sharpness)."""
    out = {}
    for name, v in observables.items():
        last = np.asarray(v)[ran, -1]
        # Explicit width: no member may have run (reshape cannot infer −1 from 0 rows).
        last = last.reshape(last.shape[0], int(np.prod(last.shape[1:], dtype=int)))
        medians = [_finite_median(last[:, i]) for i in range(last.shape[1])]
        out[name] = medians[0] if np.ndim(v) == 2 else medians
    return out


def _finite_median(a) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


def finite_max(x: Array, axis: int = -1) -> Array:
    """max over `axis` ignoring non-finite entries (−inf if none is finite)."""
    return jnp.max(jnp.where(jnp.isfinite(x), x, -jnp.inf), axis=axis)
