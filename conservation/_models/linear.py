"""Deep linear networks f(x) = W_L ⋯ W_1 x."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import BalanceLaw
from .base import AbstractTensorizableModel


def _check_widths(widths: Sequence[int], minimum_layers: int = 1) -> tuple[int, ...]:
    widths = tuple(widths)
    if len(widths) < minimum_layers + 1 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(
            f"`widths` must list at least {minimum_layers + 1} positive ints "
            f"(input, hidden..., output), got {widths!r}."
        )
    return widths


def _random_weights(widths, key, init_scale):
    """Gaussian layers with std init_scale / sqrt(fan_in) (LeCun scaling)."""
    keys = jax.random.split(key, len(widths) - 1)
    return tuple(
        init_scale * jax.random.normal(k, (n_out, n_in)) / jnp.sqrt(n_in)
        for k, n_in, n_out in zip(keys, widths[:-1], widths[1:])
    )


class DeepLinear(AbstractTensorizableModel):
    """f(x) = W_L ⋯ W_1 x with W_l ∈ R^{n_l × n_{l−1}}.

    Tensorization: ψ(x) = xᵀ, Φ = (W_L ⋯ W_1)ᵀ (the end-to-end matrix).
    Laws: the balance matrices W_{l+1}ᵀW_{l+1} − W_l W_lᵀ, one per pair of consecutive layers.
    """

    weights: tuple[Float[Array, "out in"], ...]

    def __init__(self, weights: Sequence[Array]):
        """**Arguments:** `weights`: the layer matrices W_1, …, W_L (shapes n_l × n_{l−1})."""
        weights = tuple(jnp.asarray(w) for w in weights)
        if not weights or any(w.ndim != 2 for w in weights):
            raise ValueError("`weights` must be a non-empty sequence of 2-D matrices.")
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"`weights[{i + 1}]` has shape {b.shape} but `weights[{i}]` outputs "
                    f"{a.shape[0]} features: layer shapes must chain."
                )
        self.weights = weights

    @classmethod
    def random(cls, widths: Sequence[int], *, key: Key, init_scale: float = 1.0) -> "DeepLinear":
        """Random Gaussian layers for `widths` = (n_0, …, n_L), std `init_scale`/√fan_in."""
        return cls(_random_weights(_check_widths(widths), key, init_scale))

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
