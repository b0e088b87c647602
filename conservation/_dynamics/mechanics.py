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
import jax.tree_util as jtu
import numpy as np
import optax

from .._custom_types import Array
from .._data.objective import Objective
from .._laws.base import check_unique_names
from .._models.base import Ensemble, as_ensemble
from .._models.mlp import AbstractMechanicsLaw
from .._validation import ArgumentError, number
from .monitor import DIVERGED, STATUS_NAMES, SUCCESS
from .train import _minibatch, check_run_arguments, final_status, optimizer


class MechanicsResult(eqx.Module):
    """Simulated laws and their predictions at every step (leading axes: member B, step K+1).

    - `t`: times η·k, shape (K+1,).
    - `simulated`, `discrete`, `continuous`: law name → values, shape (B, K+1, c):
      what the optimizer did, the exact discrete identity, the continuous-time theory.
    - `scale`: law name → natural size of each component (max over the run), shape (B, c).
    - `final`: the ensemble after the last step (the same as `train`'s for the same key).
    - `loss`: the objective at the start and after the last step taken, shape (B, 2).
    - `status`: per member, as `train`'s: `success`, `diverged` (non-finite loss or parameter
      norm above `divergence`: the member is frozen at its last good step, and its entries
      after it repeat that step) or `loss_increased` (final loss above 10× the initial one);
      codes of `conservation.Result`'s `status`. `num_steps`: optimizer steps taken.

    `final`, `loss`, `status` and `num_steps` are None when rebuilt from stored arrays.
    """

    t: Array
    simulated: dict[str, Array]
    discrete: dict[str, Array]
    continuous: dict[str, Array]
    scale: dict[str, Array]
    final: Ensemble | None = None  # None when rebuilt from stored arrays
    loss: Array | None = None
    status: Array | None = None
    num_steps: Array | None = None

    def status_names(self) -> list[str]:
        """The status of each member as a word."""
        return [STATUS_NAMES[int(s)] for s in np.asarray(self.status)]

    def discrete_error(self) -> dict[str, float]:
        """max |simulated − discrete identity| / scale per law (round-off: ~1e-15), over the
        members that did not diverge (nan if none)."""
        return self._error(self.discrete)

    def continuous_error(self) -> dict[str, float]:
        """max |simulated − continuous-time theory| / scale per law (O(η)), over the members
        that did not diverge (nan if none)."""
        return self._error(self.continuous)

    def _error(self, predicted):
        # A diverged member's theory is evaluated on a run cut short (or on non-finite
        # parameters): its numbers would hide the others'.
        keep = slice(None) if self.status is None else np.asarray(self.status) != DIVERGED
        out = {}
        for name in self.simulated:
            error = np.asarray(jnp.abs(self.simulated[name] - predicted[name])
                               / self.scale[name][:, None, :])[keep]
            out[name] = float(np.max(error)) if error.size else float("nan")
        return out


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
    divergence: float = 1e8,
) -> MechanicsResult:
    """Run SGD / heavy ball (the same optax optimizer `train` uses) and compare each law with
    its exact discrete identity and its continuous-time prediction.

    **Arguments:** `objective`, `model` (or `Ensemble`), `laws` (`AbstractMechanicsLaw`s:
    translation, scale, rescale), `lr`, `steps`, `weight_decay` λ, `momentum` β, optional
    minibatch `batch_size` with PRNG `key` (the same sample path as `train` with the same
    key and batch size: bit-identical parameters), and `divergence` (as `train`'s: a member
    whose loss is non-finite or whose parameter norm exceeds it is frozen and `diverged`).
    The arguments are checked as `train` and `conservation.optimizer` check theirs (bad ones
    raise `conservation.ArgumentError`); `lr`, `weight_decay`, `momentum` are Python scalars
    here (the recursions run in numpy too).

    **Returns:** a `MechanicsResult`, with `train`'s statuses.
    """
    ensemble = as_ensemble(model)
    check_run_arguments(objective, steps=steps, batch_size=batch_size, key=key,
                        divergence=divergence)
    lr = float(number("lr", lr, ">0", fix="the learning rate η must be positive"))
    weight_decay = float(number("weight_decay", weight_decay, ">=0"))
    momentum = float(number("momentum", momentum, "[0,1)",
                            fix="β ≥ 1 never forgets a gradient (the heavy ball diverges)"))
    laws = check_unique_names(laws)
    for law in laws:
        if not isinstance(law, AbstractMechanicsLaw):
            raise ArgumentError(
                f"law {getattr(law, 'name', law)!r} in `laws` is not a translation/scale/rescale "
                "law (`AbstractMechanicsLaw`); its breaking has no closed form here: use "
                "`conservation.mechanics_laws(model, loss)`.")
    kind = "momentum" if momentum else "gd"
    optim = optimizer(kind, lr=lr, momentum=momentum, weight_decay=weight_decay)
    keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, ensemble.size)
    sim, disc, drive, scale, final, loss, status, count = _run(
        ensemble.models, objective, laws, optim, lr, weight_decay, momentum, steps, batch_size,
        keys, jnp.asarray(divergence, float))
    status = final_status(loss, status)
    t = lr * np.arange(steps + 1)
    continuous = {law.name: jnp.asarray(_continuous(law.quadratic, np.asarray(sim[law.name]),
                                                     np.asarray(drive[law.name]), t, lr,
                                                     weight_decay, momentum))
                  for law in laws}
    return MechanicsResult(jnp.asarray(t), sim, disc, continuous, scale,
                           Ensemble(final, ensemble.size), loss, status, count)


@eqx.filter_jit
def _run(models, objective, laws, optim, lr, lam, beta, steps, batch_size, keys, divergence):
    def one(model, key):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        masks = {law.name: law.mask(model) for law in laws}

        def flat(p):
            return jfu.ravel_pytree(p)[0]

        def values(p):
            return {law.name: law(eqx.combine(p, static)) for law in laws}

        def step(carry, k):
            p, state, predicted, r, v_prev, status, count = carry
            objective_k = _minibatch(objective, key, k, batch_size)  # the batches `train` draws
            loss, grad = jax.value_and_grad(lambda q: objective_k(eqx.combine(q, static)))(p)
            updates, new_state = optim.update(grad, state, p)
            new_p = optax.apply_updates(p, updates)
            # `train`'s divergence rule, step for step.
            norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(new_p)))
            ok = jnp.isfinite(loss) & (norm < divergence)
            take = (status == SUCCESS) & ok
            status = jnp.where((status == SUCCESS) & ~ok, DIVERGED, status)
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
            # A stopped member keeps its last good step (its drive is 0 from then on).
            p, state, new_predicted, new_r, v = jtu.tree_map(
                lambda new, old: jnp.where(take, new, old),
                (new_p, new_state, new_predicted, new_r, v), (p, state, predicted, r, v_prev))
            drive = {n: jnp.where(take, x, 0.0) for n, x in drive.items()}
            out = (values(p), new_predicted, drive,
                   {law.name: law.scale(eqx.combine(p, static)) for law in laws})
            return (p, state, new_predicted, new_r, v, status, count + take), out

        start = values(params)
        zeros = {n: jnp.zeros_like(x) for n, x in start.items()}
        carry = (params, optim.init(params), start, zeros, jnp.zeros_like(flat(params)),
                 jnp.asarray(SUCCESS), jnp.asarray(0))
        last, (sim, disc, drive, scale) = jax.lax.scan(step, carry, jnp.arange(steps))

        def prepend(first, rest):
            return {n: jnp.concatenate([first[n][None], rest[n]]) for n in rest}

        scale0 = {law.name: law.scale(model) for law in laws}
        scale = {n: jnp.maximum(jnp.max(scale[n], axis=0), scale0[n]) for n in scale}
        final = eqx.combine(last[0], static)
        loss = jnp.stack([objective(model), objective(final)])
        return (prepend(start, sim), prepend(start, disc), drive, scale, final, loss, last[5],
                last[6])

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


