"""Per-sample losses ℓ(f(θ, x), y), summed over every output entry (tokens × channels)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Scalar


class AbstractLoss(eqx.Module):
    """ℓ(prediction, target) for one sample; the risk is its mean over samples."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Label used in configs and reports."""

    @abc.abstractmethod
    def __call__(self, prediction: Array, target: Array) -> Scalar:
        """The loss of one sample."""


class MSE(AbstractLoss):
    """‖f − y‖² (no ½, no mean over outputs): a quadratic in Φ(θ) for tensorizable models,
    which enables the moment fast path."""

    @property
    def name(self):
        return "mse"

    def __call__(self, prediction, target):
        return jnp.sum((prediction - target) ** 2)


class LogCosh(AbstractLoss):
    """Σ log cosh(f − y): analytic and not polynomial (the seed paper's negative control)."""

    @property
    def name(self):
        return "log_cosh"

    def __call__(self, prediction, target):
        u = jnp.abs(prediction - target)
        # log cosh u = u + log(1 + e^{-2u}) − log 2, stable for large |u|.
        return jnp.sum(u + jax.nn.softplus(-2.0 * u) - jnp.log(2.0))


class Quartic(AbstractLoss):
    """Σ (f − y)⁴: polynomial of higher degree than MSE."""

    @property
    def name(self):
        return "quartic"

    def __call__(self, prediction, target):
        return jnp.sum((prediction - target) ** 4)


class CrossEntropy(AbstractLoss):
    """Softmax cross-entropy over the last axis with target probabilities y.

    With a single output channel it is the logistic loss softplus(f) − y f, y ∈ [0, 1].
    """

    @property
    def name(self):
        return "cross_entropy"

    def __call__(self, prediction, target):
        if prediction.shape[-1] == 1:
            return jnp.sum(jax.nn.softplus(prediction) - target * prediction)
        return -jnp.sum(target * jax.nn.log_softmax(prediction, axis=-1))


LOSSES: dict[str, type[AbstractLoss]] = {
    "mse": MSE,
    "log_cosh": LogCosh,
    "quartic": Quartic,
    "cross_entropy": CrossEntropy,
}
