"""Arguments that flows and discrete runs share, checked at their boundary (each bad one raises
`conservation.ArgumentError` naming it)."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._data.objective import Objective
from .._validation import fail, is_posinf, number


def check_objective(objective) -> Objective:
    if not isinstance(objective, Objective):
        raise fail("objective", objective, "must come from `conservation.make_objective(...)`",
                   "e.g. make_objective(conservation.MSE(), data, model)")
    return objective


def check_divergence(divergence) -> None:
    """A norm > 0, or +inf: only a non-finite state counts as diverged."""
    if not is_posinf(divergence):
        number("divergence", divergence, ">0",
               fix="the parameter norm beyond which a member counts as diverged, or inf to "
                   "stop only on a non-finite state")


def same_parameters(ensemble, final) -> bool:
    """Whether `ensemble` holds exactly the parameters of `final` (NaN equal to NaN): what a
    resumed run must start from."""
    a, b = (jtu.tree_leaves(eqx.filter(m.models, eqx.is_inexact_array))
            for m in (ensemble, final))
    if ensemble.size != final.size or len(a) != len(b):
        return False
    return all(x.shape == y.shape and bool(jnp.all((x == y) | (jnp.isnan(x) & jnp.isnan(y))))
               for x, y in zip(a, b))
