"""Data sets and synthetic data generators."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float, Key
from .._models.base import standard_normals
from .._validation import ArgumentError, fail, integer, is_traced, number, prng_key, shape


def _as_float(a, name: str) -> Array:
    """`a` as a JAX array of the default float dtype (float64 under conservation): integer,
    boolean and float32 data are converted, so every objective sees one dtype."""
    if isinstance(a, str | bytes):
        raise fail(name, a, "must be a numeric array")
    try:
        a = jnp.asarray(a)
    except TypeError as e:
        raise ArgumentError(f"`{name}` must be a numeric array, got {type(a).__name__} ({e}).") \
            from None
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise ArgumentError(f"`{name}` must be real, got dtype {a.dtype}; split complex data "
                            "into real and imaginary parts.")
    return a.astype(jax.dtypes.canonicalize_dtype(jnp.float64))


@jax.jit
def _nonfinite_on_device(a):
    return jnp.sum(~jnp.isfinite(a))


def _count_nonfinite(a: Array) -> int:
    """How many entries of the concrete array `a` are nan or ±inf."""
    if all(device.platform == "cpu" for device in a.devices()):
        # numpy reads the host buffer in place: no compile per data shape (three eager ops,
        # ~0.2 s, for every new shape before).
        return int(np.count_nonzero(~np.isfinite(np.asarray(a))))
    return int(_nonfinite_on_device(a))  # on an accelerator: reduce there, one int back


class Dataset(eqx.Module):
    """Samples (x_i, y_i): `x` has shape (N, *input_shape), `y` has shape (N, *output_shape).

    Both are stored in the default float dtype (float64 under conservation): integer, boolean
    and float32 inputs are converted here. N ≥ 1 and every value finite are checked (for
    concrete arrays; inside `jit` the arrays are traced and taken as they are)."""

    x: Array
    y: Array

    def __init__(self, x: Array, y: Array):
        x, y = _as_float(x, "x"), _as_float(y, "y")
        if y.ndim == 1:  # one scalar target (or class label) per sample
            y = y[:, None]
        if x.ndim < 2 or y.ndim < 2:
            raise ArgumentError(
                f"`x` and `y` need a leading sample axis plus feature axes, got shapes {x.shape} "
                f"and {y.shape}; use y[:, None] for scalar targets."
            )
        if x.shape[0] != y.shape[0]:
            raise ArgumentError(f"`x` has {x.shape[0]} samples but `y` has {y.shape[0]}.")
        if x.shape[0] == 0:
            raise ArgumentError(f"`x` and `y` have 0 samples (shapes {x.shape} and {y.shape}); a "
                             "Dataset needs at least one.")
        for name, a in (("x", x), ("y", y)):
            if not isinstance(a, jax.core.Tracer):
                bad = _count_nonfinite(a)
                if bad:
                    raise ArgumentError(f"`{name}` (shape {a.shape}) holds {bad} non-finite values "
                                     "(nan/inf); remove or replace them first.")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Array) -> "Dataset":
        """The samples at `index` (an integer array), e.g. a minibatch."""
        return Dataset(self.x[index], self.y[index])


def targets_fit(output_shape, target_shape, loss=None) -> bool:
    """Whether a model's output of `output_shape` (one sample) fits targets of
    `target_shape`: equal shapes (the loss would broadcast others into another number), or
    what `loss.fits` accepts (class labels for `CrossEntropy`)."""
    if loss is not None:
        return loss.fits(tuple(output_shape), tuple(target_shape))
    return tuple(output_shape) == tuple(target_shape)


def check_model_data(model, data: "Dataset", loss=None) -> None:
    """Raise an `ArgumentError` naming `data.x` / `data.y` and the shapes when `model` cannot
    take the inputs of `data` or its outputs do not match the targets' shape (for `loss`,
    whose `check_targets` also checks the values, e.g. class labels)."""
    try:  # one abstract sample: indexing data.x would compile a slice for every data shape
        out = jax.eval_shape(model, jax.ShapeDtypeStruct(data.x.shape[1:], data.x.dtype))
    except Exception as e:  # noqa: BLE001 — any failure means the shapes do not fit
        raise ArgumentError(
            f"`data.x` has samples of shape {tuple(data.x.shape[1:])}, which the model "
            f"{type(model).__name__} cannot take ({type(e).__name__}: {str(e)[:200]}); give "
            "inputs of the model's input shape.") from None
    if not targets_fit(out.shape, data.y.shape[1:], loss):
        raise ArgumentError(
            f"`data.y` has targets of shape {tuple(data.y.shape[1:])} but the model "
            f"{type(model).__name__} outputs shape {tuple(out.shape)}.")
    if loss is not None:
        loss.check_targets(data.y, tuple(out.shape))


def gaussian_inputs(key: Key, n: int, shape: tuple[int, ...], scale: float = 1.0) -> Array:
    """n inputs with i.i.d. N(0, scale²) entries, shape (n, *shape) (n ≥ 1, `shape` a tuple of
    positive ints, `scale` ≥ 0)."""
    prng_key("key", key)
    n = integer("n", n, minimum=1)
    dims = _shape("shape", shape)
    number("scale", scale, ">=0")
    return _gaussian((n, *dims), key, scale)


@functools.partial(jax.jit, static_argnums=0)
def _gaussian(shape, key, scale):
    """`scale` · N(0, 1) entries: one compiled program per shape, `scale` traced (eagerly: a
    draw and a product for every shape), the draw flat (see `standard_normals`). The barrier
    keeps the product's rounding that of the product computed on its own: fused, XLA may
    re-associate it with the draw's last multiplication."""
    return scale * jax.lax.optimization_barrier(standard_normals(key[None], [shape])[0])


_shape = shape  # the validation rule (the name `shape` is gaussian_inputs' argument)


def whiten(x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """Transform x linearly so that xᵀx / n = I exactly (no centring; needs n ≥ d and xᵀx of
    full rank)."""
    x = _as_float(x, "x")
    if x.ndim != 2:
        raise ArgumentError(f"`x` must be a matrix (samples × features), got shape {x.shape}.")
    n, d = x.shape
    if n < d:
        raise ArgumentError(f"`x` has n={n} samples < d={d} features: whitening needs at least "
                            "as many samples as features.")
    cov = x.T @ x / n
    evals, evecs = jnp.linalg.eigh(cov)
    if not is_traced(evals):
        # A (numerically) singular xᵀx has no inverse square root: the result would be inf/nan
        # or round-off blown up, not a whitened matrix.
        top = float(jnp.max(evals))
        if not np.isfinite(top) or float(jnp.min(evals)) <= d * np.finfo(np.float64).eps * top:
            raise ArgumentError(f"`x` (shape {x.shape}) has rank-deficient (or non-finite) "
                                "xᵀx, which has no inverse square root: remove the linearly "
                                "dependent features first.")
    return x @ evecs @ jnp.diag(evals**-0.5) @ evecs.T


def teacher_dataset(teacher, x: Array, *, noise: float = 0.0, key: Key | None = None) -> Dataset:
    """Targets y = teacher(x) (+ N(0, noise²) noise): a realisable regression task."""
    if not callable(teacher):
        raise fail("teacher", teacher, "must be a model or function of one input",
                   "build one with e.g. conservation.DeepLinear.random(widths, key=key)")
    x = _as_float(x, "x")
    if x.ndim < 2:
        raise ArgumentError(f"`x` needs a leading sample axis, got shape {x.shape}; use "
                            "x[:, None] for scalar inputs.")
    number("noise", noise, ">=0")
    prng_key("key", key, optional=True)
    try:
        y = jax.vmap(teacher)(x)
    except ArgumentError:
        raise
    except Exception as e:  # noqa: BLE001 — any failure means the teacher cannot take x
        raise ArgumentError(
            f"`teacher` cannot take inputs of shape {tuple(x.shape[1:])} from `x` "
            f"({type(e).__name__}: {str(e)[:200]}); give inputs of the teacher's input "
            "shape.") from None
    if noise:
        if key is None:
            raise ArgumentError("`noise` > 0 needs a `key`: pass key=jax.random.PRNGKey(0).")
        y = y + noise * jax.random.normal(key, y.shape)
    return Dataset(x, y)
