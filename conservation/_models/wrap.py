"""Bring your own network: pure functions f(params, x) as models.

Every `equinox.Module` already is a model: its inexact-array leaves are the parameters θ
(`equinox.nn.MLP`, a stack of `equinox.nn.Conv2d`, a user's own attention block). A network
written as a pure function of a parameter pytree is wrapped by `FunctionModel`, which makes
the function static and the pytree the parameters, so every dynamics, monitor and law finder
sees exactly the same θ (in `jax.flatten_util.ravel_pytree` order of `params`).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._custom_types import Array
from .._validation import ArgumentError


class FunctionModel(eqx.Module):
    """x ↦ `fn(params, x)` with `params` (any pytree of arrays) the trainable parameters.

    `fn` is static: it is part of the compiled program's key, so keep the same function object
    between runs (a new lambda recompiles). The flattened parameters are those of `params`,
    in `ravel_pytree` order.
    """

    fn: Callable[[Any, Array], Array] = eqx.field(static=True)
    params: Any

    def __check_init__(self):
        if not callable(self.fn):
            raise ArgumentError(f"`fn` must be a function fn(params, x), got {self.fn!r}.")
        leaves = jtu.tree_leaves(eqx.filter(self.params, eqx.is_inexact_array))
        if not leaves:
            raise ArgumentError("`params` has no floating-point arrays: pass the parameter "
                             "pytree (e.g. a dict of jnp arrays) as `params`.")

    def __call__(self, x: Array) -> Array:
        """The output `fn(params, x)` for one (unbatched) input `x`."""
        return self.fn(self.params, x)
