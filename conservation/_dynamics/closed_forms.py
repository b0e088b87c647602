"""Closed-form trajectories used as ground truth (Saxe, McClelland & Ganguli 2014)."""

import jax.numpy as jnp

from .._custom_types import Array, ArrayLike


def saxe_balanced_mode(s: ArrayLike, u0: ArrayLike, t: ArrayLike, tau: float = 0.5) -> Array:
    """Strength u(t) = a(t) b(t) of one balanced mode of a 2-layer linear net, whitened inputs.

    Solves τ u̇ = 2u(s − u):  u(t) = s e^{2st/τ} / (e^{2st/τ} − 1 + s/u₀).

    **Arguments:**

    - `s`: the singular value of the input-output correlation Σ_yx for this mode.
    - `u0`: the initial mode strength a(0) b(0) > 0 (balanced: a(0) = b(0)).
    - `t`: time(s).
    - `tau`: the time constant. With this package's MSE ‖f − y‖² (no ½) the gradient is twice
      Saxe's, so τ = 1/2 (the default).

    **Returns:** u(t), broadcast over the arguments.
    """
    s, u0, t = jnp.asarray(s), jnp.asarray(u0), jnp.asarray(t)
    # Written with e^{−2st/τ} so that large t does not overflow.
    decay = jnp.exp(-2.0 * s * t / tau)
    return s / (1.0 - decay + decay * s / u0)
