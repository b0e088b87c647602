"""Per-sample losses ℓ(f(θ, x), y), summed over every output entry (tokens × channels)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Scalar
from .._validation import ArgumentError, is_traced


class AbstractLoss(eqx.Module):
    """ℓ(prediction, target) for one sample; the risk is its mean over samples."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Label used in configs and reports."""

    @abc.abstractmethod
    def __call__(self, prediction: Array, target: Array) -> Scalar:
        """The loss of one sample."""

    def fits(self, output_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
        """Whether targets of `target_shape` (one sample) go with predictions of
        `output_shape`: equal shapes (other shapes would broadcast into another number)."""
        return tuple(output_shape) == tuple(target_shape)

    def check_targets(self, y: Array, output_shape: tuple[int, ...]) -> None:
        """Raise an `ArgumentError` if the targets `y` (all samples, leading axis) hold values
        this loss cannot take for outputs of `output_shape` (shapes: see `fits`)."""


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
    """Softmax cross-entropy over the last axis of the prediction (k classes), with targets
    either

    - class probabilities of the prediction's shape (one-hot or soft), −Σ y log softmax(f); or
    - integer class labels in [0, k): the prediction's shape without its last axis, or with a
      last axis of size 1 (per sample: y of shape (n,) or (n, 1) for outputs (k,), which
      `Dataset` stores as (n, 1)), −log softmax(f)[y], as
      `optax.softmax_cross_entropy_with_integer_labels`. Labels are stored as floats (`Dataset`
      converts every array to float64); they must hold integers, checked by `check_targets`
      when the objective is made.

    With a single output channel (k = 1) it is the logistic loss softplus(f) − y f, y ∈ [0, 1]
    (a label 0/1 is the same number as its probability).
    """

    @property
    def name(self):
        return "cross_entropy"

    def fits(self, output_shape, target_shape):
        output_shape, target_shape = tuple(output_shape), tuple(target_shape)
        return output_shape == target_shape or _labels(output_shape, target_shape)

    def check_targets(self, y, output_shape):
        target_shape = tuple(y.shape[1:])
        if not _labels(tuple(output_shape), target_shape) or is_traced(y):
            return
        values = np.asarray(y)
        classes = output_shape[-1]
        bad = (values != np.round(values)) | (values < 0) | (values >= classes)
        if np.any(bad):
            first = values[bad].flat[0]
            raise ArgumentError(
                f"`y` (shape {tuple(y.shape)}) holds class labels for a model with {classes} "
                f"outputs, but {int(np.sum(bad))} of them are not integers in [0, {classes}), "
                f"e.g. {first:g}; give labels 0 … {classes - 1}, or class probabilities of "
                f"shape (n, {', '.join(map(str, output_shape))}).")

    def __call__(self, prediction, target):
        if prediction.shape[-1] == 1:
            return jnp.sum(jax.nn.softplus(prediction) - target * prediction)
        log_p = jax.nn.log_softmax(prediction, axis=-1)
        if _labels(prediction.shape, target.shape):
            labels = target if target.shape == prediction.shape[:-1] else target[..., 0]
            index = labels.astype(jnp.int32)[..., None]
            return -jnp.sum(jnp.take_along_axis(log_p, index, axis=-1))
        return -jnp.sum(target * log_p)


def _labels(output_shape, target_shape) -> bool:
    """Whether targets of `target_shape` are class labels for predictions of `output_shape`
    (k > 1 classes on its last axis): that shape without the class axis, or with it of size 1."""
    if not output_shape or output_shape[-1] < 2:
        return False
    return tuple(target_shape) in (tuple(output_shape[:-1]), tuple(output_shape[:-1]) + (1,))


LOSSES: dict[str, type[AbstractLoss]] = {
    "mse": MSE,
    "log_cosh": LogCosh,
    "quartic": Quartic,
    "cross_entropy": CrossEntropy,
}
