"""Deep linear networks f(x) = W_L ⋯ W_1 x."""

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import BalanceLaw
from .._validation import ArgumentError, fail, number, prng_key
from .base import AbstractTensorizableModel, standard_normals


def _check_widths(widths: Sequence[int], minimum_layers: int = 1) -> tuple[int, ...]:
    must = f"must list at least {minimum_layers + 1} positive ints (input, hidden..., output)"
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise fail("widths", widths, must, "e.g. widths=[3, 4, 2]")
    if len(widths) < minimum_layers + 1 or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0
            for w in widths):
        raise fail("widths", widths, must, "e.g. widths=[3, 4, 2]")
    return tuple(int(w) for w in widths)


def _check_random(key, init_scale) -> None:
    prng_key("key", key)
    number("init_scale", init_scale, ">0")


def _matrices(weights, minimum: int) -> tuple[Array, ...]:
    """`weights` as a tuple of ≥ `minimum` 2-D arrays (float: integers are converted; another
    float dtype is converted to float64 where a model enters a run)."""
    must = (f"must be a sequence of at least {minimum} 2-D matrices (W_1, …, W_L"
            + ("; at least one hidden layer)" if minimum > 1 else ")"))
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise fail("weights", weights, must)
    try:
        weights = tuple(jnp.asarray(w) for w in weights)
    except TypeError:
        raise fail("weights", weights, must) from None
    if len(weights) < minimum or any(w.ndim != 2 for w in weights):
        raise ArgumentError(f"`weights` {must}, got shapes {[w.shape for w in weights]}.")
    # Integer entries would not be parameters (only inexact leaves train): make them float.
    return tuple(w if jnp.issubdtype(w.dtype, jnp.inexact) else w.astype(float) for w in weights)


@functools.partial(jax.jit, static_argnums=0)
def _random_weights(widths, key, init_scale):
    """Gaussian layers with std init_scale / sqrt(fan_in) (LeCun scaling): one compiled
    program per `widths` (a tuple), `init_scale` traced."""
    keys = jax.random.split(key, len(widths) - 1)
    # Each step rounds as it did computed on its own (eagerly, as in earlier releases): the
    # barriers stop XLA from re-associating the scaling with the draw's last multiplication,
    # and from turning the division by the constant √fan_in into a multiplication by its
    # rounded reciprocal. Either changes the last bit of some weights.
    draws = jax.lax.optimization_barrier(
        standard_normals(keys, list(zip(widths[1:], widths[:-1]))))
    roots = jax.lax.optimization_barrier([jnp.sqrt(n_in) for n_in in widths[:-1]])
    scaled = jax.lax.optimization_barrier([init_scale * w for w in draws])
    return tuple(w / root for w, root in zip(scaled, roots))


class DeepLinear(AbstractTensorizableModel):
    """f(x) = W_L ⋯ W_1 x with W_l ∈ R^{n_l × n_{l−1}}.

    Tensorization: ψ(x) = xᵀ, Φ = (W_L ⋯ W_1)ᵀ (the end-to-end matrix).
    Laws: the balance matrices W_{l+1}ᵀW_{l+1} − W_l W_lᵀ, one per pair of consecutive layers.
    """

    weights: tuple[Float[Array, "out in"], ...]

    def __init__(self, weights: Sequence[Array]):
        """**Arguments:** `weights`: the layer matrices W_1, …, W_L (shapes n_l × n_{l−1})."""
        weights = _matrices(weights, 1)
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if b.shape[1] != a.shape[0]:
                raise ArgumentError(
                    f"`weights[{i + 1}]` has shape {b.shape} but `weights[{i}]` outputs "
                    f"{a.shape[0]} features: layer shapes must chain."
                )
        self.weights = weights

    @classmethod
    def random(cls, widths: Sequence[int], *, key: Key, init_scale: float = 1.0) -> "DeepLinear":
        """Random Gaussian layers for `widths` = (n_0, …, n_L), std `init_scale`/√fan_in."""
        widths = _check_widths(widths)
        _check_random(key, init_scale)
        return cls(_random_weights(widths, key, init_scale))

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.weights[0].shape[-1],) + tuple(w.shape[-2] for w in self.weights)

    def end_to_end(self) -> Float[Array, "out in"]:
        """The product W_L ⋯ W_1."""
        product = self.weights[0]
        for w in self.weights[1:]:
            product = w @ product
        return product

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " m"]:
        for w in self.weights:
            x = w @ x
        return x

    def features(self, x: Float[Array, " d"]) -> Float[Array, "1 d"]:
        return x[None, :]

    def tensorize(self) -> Float[Array, "d m"]:
        return self.end_to_end().T

    @property
    def feature_degrees(self) -> tuple[int, ...]:
        return (1,)

    def laws(self):
        return tuple(BalanceLaw(layer) for layer in range(len(self.weights) - 1))
