"""Broken conservation laws under finite learning rate, weight decay and momentum.

For a law of a translation, scale or rescale symmetry the constraint ⟨g, ξ(θ)⟩ = 0 holds for
every minibatch gradient g, so SGD with weight decay λ, learning rate η and heavy-ball momentum
β changes the law by an exactly computable amount each step (Kunin et al. 2021; reference
architecture_laws_and_optimizers.md §A.7):

- translation s = ⟨m, θ⟩: s_{k+1} = (1 − ηλ) s_k; with momentum m_{k+1} = β m_k + λ s_k,
  s_{k+1} = s_k − η m_{k+1};
- scale / rescale q = Σ m θ²: q_{k+1} = (1 − ηλ)² q_k + η² |g_k|²_m; with momentum
  r_{k+1} = β (r_k − η |v_k|²_m) + λ q_k, q_{k+1} = q_k − 2η r_{k+1} + η² |v_{k+1}|²_m.

`track_mechanics` runs the optimizer and propagates these recursions from the observed
gradients / velocities alongside, so simulation and theory can be compared to round-off. It
also evaluates the continuous-time predictions (§A.5–A.6: e^{−λt} decay, gradient-norm
integrals, the damped-oscillator Green's function with momentum), which hold to O(η).
"""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import optax

from .._custom_types import Array
from .._data.objective import Objective
from .._laws.base import check_unique_names
from .._models.base import Ensemble, as_ensemble
from .._models.mlp import AbstractMechanicsLaw
from .train import _minibatch, optimizer


class MechanicsResult(eqx.Module):
    """Simulated laws and their predictions at every step (leading axes: member B, step K+1).

    - `t`: times η·k, shape (K+1,).
    - `simulated`, `discrete`, `continuous`: law name → values, shape (B, K+1, c):
      what the optimizer did, the exact discrete identity, the continuous-time theory.
    - `scale`: law name → natural size of each component (max over the run), shape (B, c).
    - `final`: the ensemble after the last step (the same as `train`'s for the same key).
    """

    t: Array
    simulated: dict[str, Array]
    discrete: dict[str, Array]
    continuous: dict[str, Array]
    scale: dict[str, Array]
    final: Ensemble | None = None  # None when rebuilt from stored arrays

    def discrete_error(self) -> dict[str, float]:
        """max |simulated − discrete identity| / scale per law (round-off: ~1e-15)."""
        return self._error(self.discrete)

    def continuous_error(self) -> dict[str, float]:
        """max |simulated − continuous-time theory| / scale per law (O(η))."""
        return self._error(self.continuous)

    def _error(self, predicted):
        return {name: float(jnp.max(jnp.abs(self.simulated[name] - predicted[name])
                                    / self.scale[name][:, None, :]))
                for name in self.simulated}


def track_mechanics(
    objective: Objective,
    model,
    laws,
    *,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    batch_size: int | None = None,
    key=None,
) -> MechanicsResult:
    """Run SGD / heavy ball (the same optax optimizer `train` uses) and compare each law with
    its exact discrete identity and its continuous-time prediction.

    **Arguments:** `objective`, `model` (or `Ensemble`), `laws` (`AbstractMechanicsLaw`s:
    translation, scale, rescale), `lr`, `steps`, `weight_decay` λ, `momentum` β, optional
    minibatch `batch_size` with PRNG `key` (the same sample path as `train` with the same
    key and batch size: bit-identical parameters).

    **Returns:** a `MechanicsResult`.
    """
    laws = check_unique_names(laws)
    for law in laws:
        if not isinstance(law, AbstractMechanicsLaw):
            raise TypeError(f"law {law.name!r} is not a translation/scale/rescale law "
                            "(`AbstractMechanicsLaw`); its breaking has no closed form here.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    if batch_size is not None and key is None:
        raise ValueError("`batch_size` needs a `key` to draw minibatches.")
    ensemble = as_ensemble(model)
    kind = "momentum" if momentum else "gd"
    optim = optimizer(kind, lr=lr, momentum=momentum, weight_decay=weight_decay)
    keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, ensemble.size)
    sim, disc, drive, scale, final = _run(ensemble.models, objective, laws, optim, lr, weight_decay,
                                   momentum, steps, batch_size, keys)
    t = lr * np.arange(steps + 1)
    continuous = {law.name: jnp.asarray(_continuous(law.quadratic, np.asarray(sim[law.name]),
                                                     np.asarray(drive[law.name]), t, lr,
                                                     weight_decay, momentum))
                  for law in laws}
    return MechanicsResult(jnp.asarray(t), sim, disc, continuous, scale,
                           Ensemble(final, ensemble.size))


@eqx.filter_jit
def _run(models, objective, laws, optim, lr, lam, beta, steps, batch_size, keys):
    def one(model, key):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        masks = {law.name: law.mask(model) for law in laws}

        def flat(p):
            return jfu.ravel_pytree(p)[0]

        def values(p):
            return {law.name: law(eqx.combine(p, static)) for law in laws}

        def step(carry, k):
            p, state, predicted, r, v_prev = carry
            objective_k = _minibatch(objective, key, k, batch_size)  # the batches `train` draws
            grad = jax.grad(lambda q: objective_k(eqx.combine(q, static)))(p)
            updates, state = optim.update(grad, state, p)
            new_p = optax.apply_updates(p, updates)
            theta, g = flat(p), flat(grad)
            v = (theta - flat(new_p)) / lr  # the heavy-ball velocity (g + λθ without momentum)
            new_predicted, new_r, drive = {}, {}, {}
            for law in laws:
                n, m = law.name, masks[law.name]
                if not law.quadratic:
                    if beta:
                        new_r[n] = beta * r[n] + lam * predicted[n]
                        new_predicted[n] = predicted[n] - lr * new_r[n]
                    else:
                        new_r[n] = r[n]
                        new_predicted[n] = (1.0 - lr * lam) * predicted[n]
                    drive[n] = jnp.zeros_like(predicted[n])
                elif beta:
                    new_r[n] = beta * (r[n] - lr * (m @ v_prev**2)) + lam * predicted[n]
                    new_predicted[n] = predicted[n] - 2 * lr * new_r[n] + lr**2 * (m @ v**2)
                    drive[n] = m @ v**2  # |θ̇|² in time t = ηk (θ̇ ≈ −v)
                else:
                    new_r[n] = r[n]
                    new_predicted[n] = (1.0 - lr * lam) ** 2 * predicted[n] + lr**2 * (m @ g**2)
                    drive[n] = m @ g**2
            out = (values(new_p), new_predicted, drive,
                   {law.name: law.scale(eqx.combine(new_p, static)) for law in laws})
            return (new_p, state, new_predicted, new_r, v), out

        start = values(params)
        zeros = {n: jnp.zeros_like(x) for n, x in start.items()}
        carry = (params, optim.init(params), start, zeros, jnp.zeros_like(flat(params)))
        last, (sim, disc, drive, scale) = jax.lax.scan(step, carry, jnp.arange(steps))

        def prepend(first, rest):
            return {n: jnp.concatenate([first[n][None], rest[n]]) for n in rest}

        scale0 = {law.name: law.scale(model) for law in laws}
        scale = {n: jnp.maximum(jnp.max(scale[n], axis=0), scale0[n]) for n in scale}
        return (prepend(start, sim), prepend(start, disc), drive, scale,
                eqx.combine(last[0], static))

    return eqx.filter_vmap(one)(models, keys)  # foreign modules carry non-array leaves


def _continuous(quadratic, sim, drive, t, lr, lam, beta):
    """Continuous-time theory (numpy): sim (B, K+1, c) gives Q(0); drive (B, K, c) is the
    per-step forcing |g|²_m (no momentum) or |θ̇|²_m (momentum)."""
    q0 = sim[:, :1, :]
    if not beta:
        if not quadratic:
            return np.exp(-lam * t)[None, :, None] * q0
        # e^{−2λt} q0 + η ∫ e^{−2λ(t−τ)} |g|² dτ, the integral as a sum with dτ = η.
        weights = np.exp(-2 * lam * (t[:, None] - t[None, :-1])) * (t[None, :-1] < t[:, None])
        return np.exp(-2 * lam * t)[None, :, None] * q0 + lr * lr * np.einsum(
            "kj,bjc->bkc", weights, drive)
    denom = lr * (1 + beta)
    gamma = (1 - beta) / denom
    omega2 = (4 if quadratic else 2) * lam / denom
    chi, green = _oscillator(gamma, omega2)
    out = chi(t)[None, :, None] * q0
    if quadratic:
        lag = t[:, None] - t[None, 1:]  # forcing of step j acts from t_{j+1}
        weights = np.where(lag >= 0, green(np.maximum(lag, 0.0)), 0.0)
        out = out + 2 * lr * np.einsum("kj,bjc->bkc", weights, drive)
    return out


def _oscillator(gamma, omega2):
    """χ (zero initial velocity) and the Green's function G of x'' + 2γx' + ω²x = f."""
    disc = gamma**2 - omega2
    if abs(disc) <= 1e-12 * gamma**2:
        return (lambda t: np.exp(-gamma * t) * (1 + gamma * t),
                lambda u: u * np.exp(-gamma * u))
    if disc < 0:
        big = np.sqrt(-disc)
        return (lambda t: np.exp(-gamma * t) * (np.cos(big * t) + gamma / big * np.sin(big * t)),
                lambda u: np.exp(-gamma * u) * np.sin(big * u) / big)
    root = np.sqrt(disc)
    plus, minus = -gamma + root, -gamma - root
    return (lambda t: (plus * np.exp(minus * t) - minus * np.exp(plus * t)) / (plus - minus),
            lambda u: (np.exp(plus * u) - np.exp(minus * u)) / (plus - minus))


