"""Monitors: law values and drifts evaluated inside a run, and the `Result` of a run."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float, Int
from .._laws.base import AbstractLaw
from .._models.base import Ensemble

STATUS_NAMES = ("success", "max_steps", "diverged", "failed")
ILL_CONDITIONED = 1e-6  # a law's `condition` below this: its drift is round-off noise
SUCCESS, MAX_STEPS, DIVERGED, FAILED = range(4)


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
    - `status`: per member, 0 success, 1 max_steps, 2 diverged, 3 failed (see `status_names`).
    - `num_steps`: solver steps (flow) or optimizer steps taken (discrete), per member.
    - `solver`: the solver a flow ran with (`"auto"` resolved to what `choose_solver` picked;
      a diffrax solver object by its class name); None for discrete runs.
    - `batch_size`: members a flow integrated side by side (its `batch_size`, the default
      resolved, per device when the ensemble is sharded); None for discrete runs.

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

    def status_names(self) -> list[str]:
        """The status of each member as a word."""
        return [STATUS_NAMES[int(s)] for s in np.asarray(self.status)]

    def summary(self) -> dict:
        """JSON-ready digest: per-law worst drift over successful members, statuses, steps."""
        status = np.asarray(self.status)
        ok = status == SUCCESS
        loss = np.asarray(self.loss)
        return {
            "members": int(status.size),
            "status": {name: int(np.sum(status == i)) for i, name in enumerate(STATUS_NAMES)},
            "final_loss_median": _finite_median(loss[ok, -1]) if ok.any() else None,
            "max_drift": {
                name: float(np.max(np.asarray(d)[ok])) if ok.any() else None
                for name, d in self.max_drift.items()
            },
            "ill_conditioned": {
                name: int(np.sum(np.min(np.asarray(c), axis=1) < ILL_CONDITIONED))
                for name, c in self.condition.items()
            },
            "num_steps_max": int(np.max(np.asarray(self.num_steps))),
            **({"solver": self.solver} if self.solver is not None else {}),
            **({"batch_size": self.batch_size} if self.batch_size is not None else {}),
        }


def values_to_keep(values, laws) -> tuple[tuple[str, ...], bool]:
    """Parse a run's `values` argument: (law names kept at every save, keep final values)."""
    names = tuple(law.name for law in laws)
    if isinstance(values, str):
        modes = {"none": ((), False), "final": ((), True), "all": (names, True)}
        if values not in modes:
            raise ValueError(f"`values` must be 'none', 'final', 'all' or a sequence of law "
                             f"names, got {values!r}.")
        return modes[values]
    values = tuple(values)
    unknown = [v for v in values if v not in names]
    if unknown:
        raise ValueError(f"`values` names {unknown} that are not monitored laws; choose from "
                         f"{list(names)}.")
    return tuple(n for n in names if n in values), True


def show_progress(progress: bool | None) -> bool:
    """`progress=None` means: only when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def _finite_median(a) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


def finite_max(x: Array, axis: int = -1) -> Array:
    """max over `axis` ignoring non-finite entries (−inf if none is finite)."""
    return jnp.max(jnp.where(jnp.isfinite(x), x, -jnp.inf), axis=axis)
