"""Data sets and synthetic data generators."""

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array, Float, Key


class Dataset(eqx.Module):
    """Samples (x_i, y_i): `x` has shape (N, *input_shape), `y` has shape (N, *output_shape)."""

    x: Array
    y: Array

    def __init__(self, x: Array, y: Array):
        x, y = jnp.asarray(x), jnp.asarray(y)
        if x.ndim < 2 or y.ndim < 2:
            raise ValueError(
                f"`x` and `y` need a leading sample axis plus feature axes, got shapes {x.shape} "
                f"and {y.shape}; use y[:, None] for scalar targets."
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"`x` has {x.shape[0]} samples but `y` has {y.shape[0]}.")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Array) -> "Dataset":
        """The samples at `index` (an integer array), e.g. a minibatch."""
        return Dataset(self.x[index], self.y[index])


def gaussian_inputs(key: Key, n: int, shape: tuple[int, ...], scale: float = 1.0) -> Array:
    """n inputs with i.i.d. N(0, scale²) entries, shape (n, *shape)."""
    return scale * jax.random.normal(key, (n, *shape))


def whiten(x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """Transform x linearly so that xᵀx / n = I exactly (no centring; needs n ≥ d)."""
    n, d = x.shape
    if n < d:
        raise ValueError(f"whitening needs at least as many samples as features (n={n} < d={d}).")
    cov = x.T @ x / n
    evals, evecs = jnp.linalg.eigh(cov)
    return x @ evecs @ jnp.diag(evals**-0.5) @ evecs.T


def teacher_dataset(teacher, x: Array, *, noise: float = 0.0, key: Key | None = None) -> Dataset:
    """Targets y = teacher(x) (+ N(0, noise²) noise): a realisable regression task."""
    y = jax.vmap(teacher)(x)
    if noise:
        if key is None:
            raise ValueError("`noise` > 0 needs a `key`.")
        y = y + noise * jax.random.normal(key, y.shape)
    return Dataset(x, y)
