"""Polynomial networks f(x) = W_L σ(W_{L−1} ⋯ σ(W_1 x)) with a polynomial activation σ."""

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import BalanceLaw, NeuronRescaleLaw
from .._validation import ArgumentError, fail, integer, number
from .base import AbstractTensorizableModel
from .linear import _check_random, _check_widths, _matrices, _random_weights

ACTIVATIONS: dict[str, tuple[float, ...]] = {
    "linear": (0.0, 1.0),
    "quadratic": (0.0, 0.0, 1.0),
    "cubic": (0.0, 0.0, 0.0, 1.0),
    # σ(z) = 0.012 z⁶ − 0.22 z⁴ + z², the activation of the seed paper's Figure 1.
    "sextic": (0.0, 0.0, 1.0, 0.0, -0.22, 0.0, 0.012),
}


def _resolve_activation(activation) -> tuple[float, ...]:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ArgumentError(
                f"unknown `activation` {activation!r}; choose one of {sorted(ACTIVATIONS)} "
                "or pass the coefficients (s_0, s_1, …) of σ(z) = Σ_k s_k z^k."
            )
        return ACTIVATIONS[activation]
    if not isinstance(activation, tuple | list):
        raise fail("activation", activation, f"must be one of {sorted(ACTIVATIONS)} or a tuple "
                   "of coefficients (s_0, s_1, …) of σ(z) = Σ_k s_k z^k")
    coefficients = tuple(float(number("activation", c, fix="coefficients are finite reals"))
                         for c in activation)
    while coefficients and coefficients[-1] == 0.0:
        coefficients = coefficients[:-1]
    if not coefficients:
        raise ArgumentError("`activation` coefficients are all zero: σ would be identically 0.")
    return coefficients


def _tensor_power(x: Float[Array, " d"], p: int) -> Float[Array, " d**p"]:
    out = jnp.ones((1,), x.dtype)
    for _ in range(p):
        out = jnp.outer(out, x).ravel()
    return out


def _horner(coefficients: tuple[float, ...], z: Array) -> Array:
    """Σ_k s_k z^k by Horner's rule."""
    out = jnp.zeros_like(z)
    for s in reversed(coefficients):
        out = out * z + s
    return out


def _derivatives(f, x, order: int) -> tuple[Array, ...]:
    """(f(x), Df(x), …, D^order f(x)) by forward mode; each level differentiates the last."""

    def g(y):
        return (f(y),)

    for _ in range(order):
        g = (lambda h: lambda y: (h(y)[0],) + jax.jacfwd(h)(y))(g)
    return g(x)


class PolynomialNet(AbstractTensorizableModel):
    """f(x) = W_L σ(W_{L−1} ⋯ σ(W_1 x)), σ(z) = Σ_k s_k z^k applied elementwise.

    With two layers this is f = Σ_j a_j σ(w_j·x) (rows w_j of W_1, columns a_j of W_2).
    Tensorization: ψ(x) = (x^{⊗p})_p over the degrees p that f contains, Φ = the Taylor
    coefficients of f at x = 0. Laws: per-neuron |W_l[i,:]|² − k|W_{l+1}[:,i]|² when σ = s z^k
    is homogeneous (balance matrices when k = 1); none for inhomogeneous σ (e.g. the sextic).
    """

    weights: tuple[Float[Array, "out in"], ...]
    coefficients: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, weights: Sequence[Array], activation="quadratic"):
        """**Arguments:**

        - `weights`: layer matrices W_1, …, W_L (at least two layers).
        - `activation`: a preset name (`"quadratic"`, `"cubic"`, `"sextic"`, `"linear"`) or the
          coefficients (s_0, s_1, …, s_K) of σ(z) = Σ_k s_k z^k.
        """
        weights = _matrices(weights, 2)  # two: one hidden layer
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if b.shape[1] != a.shape[0]:
                raise ArgumentError(f"`weights[{i + 1}]` has shape {b.shape}: layer shapes must "
                                 "chain.")
        self.weights = weights
        self.coefficients = _resolve_activation(activation)

    @classmethod
    def random(
        cls, widths: Sequence[int], *, key: Key, activation="quadratic", init_scale: float = 1.0
    ) -> "PolynomialNet":
        """Random Gaussian layers for `widths` = (d, h_1, …, m), std `init_scale`/√fan_in."""
        widths = _check_widths(widths, minimum_layers=2)
        _check_random(key, init_scale)
        return cls(_random_weights(widths, key, init_scale), activation)

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.weights[0].shape[-1],) + tuple(w.shape[-2] for w in self.weights)

    def activation(self, z: Array) -> Array:
        """σ(z), elementwise."""
        return _horner(self.coefficients, z)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " m"]:
        for w in self.weights[:-1]:
            x = self.activation(w @ x)
        return self.weights[-1] @ x

    @property
    def degrees(self) -> tuple[int, ...]:
        """The degrees p ≥ 0 whose monomials x^{⊗p} can appear in f."""
        used = [k for k, s in enumerate(self.coefficients) if s != 0.0]
        reach = {1}
        for _ in self.weights[:-1]:
            new = set()
            for k in used:
                # σ's z^k term maps degrees e_1..e_k of its argument to their sums.
                sums = {0}
                for _ in range(k):
                    sums = {a + b for a in sums for b in reach}
                new |= sums
            reach = new
        return tuple(sorted(reach))

    def features(self, x: Float[Array, " d"]) -> Float[Array, "1 p"]:
        return jnp.concatenate([_tensor_power(x, p) for p in self.degrees])[None, :]

    def tensorize(self) -> Float[Array, "p m"]:
        if len(self.weights) == 2:
            # One hidden layer: the degree-p coefficient is s_p Σ_j a_j w_j^{⊗p} in closed form.
            w, a = self.weights
            blocks = [self.coefficients[p] * a @ jax.vmap(_tensor_power, in_axes=(0, None))(w, p)
                      for p in self.degrees]
        else:
            # Deeper nets: Taylor coefficients (1/p!) D^p f(0), all degrees from one jacfwd chain.
            d = self.widths[0]
            derivatives = _derivatives(self, jnp.zeros(d, self.weights[0].dtype), max(self.degrees))
            blocks = [derivatives[p].reshape(-1, d**p) / math.factorial(p) for p in self.degrees]
        return jnp.concatenate([b.T for b in blocks])

    @property
    def feature_degrees(self) -> tuple[int, ...]:
        return self.degrees

    def laws(self):
        nonzero = [k for k, s in enumerate(self.coefficients) if s != 0.0]
        if len(nonzero) != 1 or nonzero[0] == 0:
            return ()  # σ is not homogeneous: no rescaling symmetry
        (k,) = nonzero
        if k == 1:
            return tuple(BalanceLaw(layer) for layer in range(len(self.weights) - 1))
        return tuple(NeuronRescaleLaw(layer, k) for layer in range(len(self.weights) - 1))


@functools.partial(jax.jit, static_argnums=0)
def _random_neuron(d: int, key: Key, init_scale) -> Float[Array, " d"]:
    """N(0, init_scale²/d) entries: one compiled program per `d` (barriers: see
    `linear._random_weights`)."""
    draw, root = jax.lax.optimization_barrier(
        (jax.random.normal(key, (d,)), jnp.asarray(math.sqrt(d))))
    return jax.lax.optimization_barrier(init_scale * draw) / root


class Neuron(AbstractTensorizableModel):
    """One polynomial neuron f(x) = σ(w·x) with no output weight (the seed paper's Fig. 1
    model σ(p·x)). Tensorization: ψ(x) = (s_k x^{⊗k})_k, Φ = (w^{⊗k})_k. No architecture laws
    unless σ is homogeneous — and even then the only symmetry would change f."""

    weight: Float[Array, " d"]
    coefficients: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, weight: Array, activation="sextic"):
        """**Arguments:** `weight` w ∈ R^d; `activation` as for `PolynomialNet`."""
        try:
            weight = jnp.asarray(weight)
        except TypeError:
            raise fail("weight", weight, "must be a vector of floats") from None
        if weight.ndim != 1:
            raise ArgumentError(f"`weight` must be a vector, got shape {weight.shape}.")
        if not jnp.issubdtype(weight.dtype, jnp.inexact):  # else it would not be a parameter
            weight = weight.astype(float)
        self.weight = weight
        self.coefficients = _resolve_activation(activation)

    @classmethod
    def random(cls, d: int, *, key: Key, activation="sextic", init_scale: float = 1.0
               ) -> "Neuron":
        """w ~ N(0, init_scale²/d)."""
        d = integer("d", d, minimum=1)
        _check_random(key, init_scale)
        return cls(_random_neuron(d, key, init_scale), activation)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " 1"]:
        return _horner(self.coefficients, self.weight @ x)[None]

    @property
    def feature_degrees(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.coefficients) if s != 0.0)

    def features(self, x: Float[Array, " d"]) -> Float[Array, "1 p"]:
        return jnp.concatenate([self.coefficients[k] * _tensor_power(x, k)
                                for k in self.feature_degrees])[None, :]

    def tensorize(self) -> Float[Array, "p 1"]:
        return jnp.concatenate([_tensor_power(self.weight, k)
                                for k in self.feature_degrees])[:, None]

    def laws(self):
        return ()
