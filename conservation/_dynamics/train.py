"""Discrete training with optax (GD, minibatch SGD, heavy ball, weight decay, Adam)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from tqdm.auto import tqdm

from .._custom_types import Array, Key, ScalarLike
from .._data.objective import Objective
from .._laws.base import check_unique_names
from .._models.base import AbstractModel, Ensemble, as_ensemble, default_laws
from .monitor import DIVERGED, SUCCESS, LawMonitor, Result, show_progress, values_to_keep


def optimizer(
    kind: str = "gd",
    *,
    lr: ScalarLike,
    momentum: ScalarLike = 0.0,
    weight_decay: ScalarLike = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """An optax optimizer whose hyperparameters live in its state (`optax.inject_hyperparams`),
    so changing them never recompiles.

    - `"gd"` / `"sgd"`: θ ← (1 − ηλ)θ − η g (weight decay λ added to the gradient, as in
      Kunin et al.); minibatching is chosen by `train(batch_size=...)`.
    - `"momentum"`: heavy ball v ← βv + g + λθ, θ ← θ − ηv (PyTorch convention).
    - `"adam"`: Adam, or AdamW (decoupled decay) when `weight_decay` > 0.
    """
    if kind in ("gd", "sgd", "momentum"):
        def make(learning_rate, momentum, weight_decay):
            return optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.trace(decay=momentum),
                optax.scale_by_learning_rate(learning_rate),
            )
        if kind != "momentum" and momentum != 0.0:
            raise ValueError(f"`momentum` is only used by kind='momentum', not {kind!r}.")
        return optax.inject_hyperparams(make)(lr, momentum, weight_decay)
    if kind == "adam":
        def make(learning_rate, weight_decay):
            return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
        return optax.inject_hyperparams(make)(lr, weight_decay)
    raise ValueError(f"unknown optimizer `kind` {kind!r}; choose 'gd', 'sgd', 'momentum' or "
                     "'adam'.")


def _minibatch(objective: Objective, key: Key, step, batch_size: int | None) -> Objective:
    """The objective of optimizer step `step` for one member with PRNG `key`: a fresh batch of
    `batch_size` examples without replacement, drawn with `jax.random.fold_in(key, step)`
    (`train` and `track_mechanics` share it, so the same key gives the same SGD path)."""
    if batch_size is None:
        return objective
    index = jax.random.choice(jax.random.fold_in(key, step), len(objective.data),
                              (batch_size,), replace=False)
    return objective.on(index)


def train(
    objective: Objective,
    model: AbstractModel | Ensemble,
    optim: optax.GradientTransformation,
    steps: int,
    *,
    batch_size: int | None = None,
    key: Key | None = None,
    laws=None,
    values="final",
    n_save: int = 101,
    step_time: float = 1.0,
    progress: bool | None = None,
    divergence: ScalarLike = 1e8,
    hyperparams: dict[str, Array] | None = None,
) -> Result:
    """Run `steps` optimizer steps on every member of `model`, monitoring the laws every step.

    **Arguments:**

    - `objective`: from `conservation.make_objective`.
    - `model`: a model or an `Ensemble`.
    - `optim`: any optax `GradientTransformation`, e.g. `conservation.optimizer("gd", lr=0.01)`.
      Reuse the same object between calls to reuse the compiled program.
    - `steps`: number of optimizer steps.
    - `batch_size`: minibatch size for SGD (fresh random batch per step and member, without
      replacement); `None` uses the full objective (moment fast path if available).
    - `key`: PRNG key for the minibatches (required with `batch_size`): member i uses
      `jax.random.split(key, B)[i]`, and step k draws its batch with
      `jax.random.fold_in(member_key, k)` (see `_minibatch`).
    - `laws`: laws to monitor (default: the model's architecture laws). Their drift is checked
      after every step; `max_drift` is the worst over all steps.
    - `values`: law values to keep, as in `gradient_flow`: `"final"` (default,
      `Result.final_values`), `"none"`, `"all"` or law names (`Result.values` at every save).
    - `n_save`: about this many save points (the first at step 0, the last at `steps`).
    - `step_time`: the time one step represents on `Result.t` (e.g. the learning rate η, to
      overlay with gradient flow at t = ηk).
    - `progress`: show one progress bar; `None` (default): only when stderr is a terminal.
    - `divergence`: a member whose parameter norm exceeds this or whose loss is non-finite is
      frozen at its last good step and reported as `diverged`.
    - `hyperparams`: per-member values of `optim`'s injected hyperparameters, e.g.
      `{"learning_rate": lrs}` with `lrs` of shape (B,): a whole learning-rate sweep runs as
      one compiled program (`conservation.optimizer` injects `learning_rate`, `momentum`,
      `weight_decay`).

    **Memory:** B·T scalars per law (loss, drift, condition at T ≈ `n_save` saves) plus the
    final parameters and `final_values` (B × law size); B·T·law size only for laws kept with
    `values`.

    **Returns:** a `conservation.Result` with `t` = steps × `step_time` at the save points.
    """
    ensemble = as_ensemble(model)
    if not isinstance(objective, Objective):
        raise TypeError("`objective` must come from `conservation.make_objective(...)`.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    if not isinstance(n_save, int) or n_save < 2:
        raise ValueError(f"`n_save` must be an int ≥ 2, got {n_save!r}.")
    if batch_size is not None:
        if not isinstance(batch_size, int) or not 1 <= batch_size <= len(objective.data):
            raise ValueError(
                f"`batch_size` must be an int in [1, {len(objective.data)}], got {batch_size!r}.")
        if key is None:
            raise ValueError("`batch_size` needs a `key` to draw minibatches.")
    key = jax.random.PRNGKey(0) if key is None else key
    laws = check_unique_names(default_laws(ensemble[0]) if laws is None else laws)
    keep, final_values = values_to_keep(values, laws)
    monitor = LawMonitor(laws)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)

    chunk = -(-steps // (n_save - 1))
    n_chunks = -(-steps // chunk)
    overrides = {k: jnp.broadcast_to(jnp.asarray(v, float), (ensemble.size,))
                 for k, v in (hyperparams or {}).items()}
    carry, (*observed, last) = _start(params, static, objective, monitor, optim,
                                      jax.random.split(key, ensemble.size), overrides, keep)
    history = [observed]
    bar = tqdm(total=steps, desc="train", disable=not show_progress(progress), unit="step")
    for _ in range(n_chunks):
        # Every chunk returns all law values, but only the last chunk's (the final model's) are
        # kept: law-sized memory is B × law size, not B × saves × law size.
        carry, (*observed, last) = _run_chunk(
            carry, static, objective, monitor, optim, chunk, batch_size, jnp.asarray(steps),
            jnp.asarray(divergence, float), keep)
        history.append(observed)
        bar.update(min(chunk, steps - bar.n))
    bar.close()

    params, _, _, status, count, max_drift, _ = carry
    loss = jnp.stack([h[0] for h in history], axis=1)
    values = {k: jnp.stack([h[1][k] for h in history], axis=1) for k in history[0][1]}
    drift = {k: jnp.stack([h[2][k] for h in history], axis=1) for k in history[0][2]}
    condition = {k: jnp.stack([h[3][k] for h in history], axis=1) for k in history[0][3]}
    t = jnp.minimum(jnp.arange(n_chunks + 1) * chunk, steps) * step_time
    last = last if final_values else {}
    return Result(
        t=t.astype(float), loss=loss, values=values, drift=drift, max_drift=max_drift,
        condition=condition, final=Ensemble(eqx.combine(params, static), ensemble.size),
        status=status, num_steps=count, final_values=last,
    )



TRACES = 0  # number of times the training step program was traced (see `_run_chunk`)


@eqx.filter_jit
def _start(params, static, objective, monitor, optim, keys, overrides, keep):
    def one(p, key, override):
        model = eqx.combine(p, static)
        reference = monitor.reference(model)
        zeros = {name: jnp.zeros(()) for name in reference[0]}
        state = optim.init(p)
        if override:
            if not hasattr(state, "hyperparams") or set(override) - set(state.hyperparams):
                raise ValueError(f"`hyperparams` {sorted(override)} are not injected "
                                 "hyperparameters of `optim` (use optax.inject_hyperparams).")
            state = state._replace(hyperparams={
                k: override.get(k, v).astype(jnp.asarray(v).dtype)
                for k, v in state.hyperparams.items()})
        carry = (p, state, key, jnp.asarray(SUCCESS), jnp.asarray(0), zeros, reference)
        kept = {k: reference[0][k] for k in keep}
        return carry, (objective(model), kept, zeros, monitor.conditions(model), reference[0])

    return jax.vmap(one)(params, keys, overrides)


@eqx.filter_jit
def _run_chunk(carry, static, objective, monitor, optim, chunk, batch_size, steps, divergence,
               keep):
    global TRACES
    TRACES += 1  # runs once per trace: counts compilations of the training program
    def one(carry):
        def step(carry, _):
            p, state, key, status, count, max_drift, reference = carry
            # `count` is the step index of every member still running (a stopped member's
            # batches no longer matter): the same (key, step) → batch map as track_mechanics.
            objective_k = _minibatch(objective, key, count, batch_size)
            loss, grad = jax.value_and_grad(lambda q: objective_k(eqx.combine(q, static)))(p)
            updates, new_state = optim.update(grad, state, p)
            new_p = optax.apply_updates(p, updates)
            norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(new_p)))
            ok = jnp.isfinite(loss) & (norm < divergence)
            active = (status == SUCCESS) & (count < steps)
            take = active & ok
            p, state = jtu.tree_map(lambda new, old: jnp.where(take, new, old),
                                    (new_p, new_state), (p, state))
            status = jnp.where(active & ~ok, DIVERGED, status)
            drift = monitor.drifts(monitor.values(eqx.combine(p, static)), reference)
            max_drift = {k: jnp.where(take, jnp.maximum(max_drift[k], drift[k]), max_drift[k])
                         for k in max_drift}
            return (p, state, key, status, count + take, max_drift, reference), None

        carry, _ = jax.lax.scan(step, carry, None, length=chunk)
        model = eqx.combine(carry[0], static)
        values = monitor.values(model)
        return carry, (objective(model), {k: values[k] for k in keep},
                       monitor.drifts(values, carry[-1]), monitor.conditions(model), values)

    return jax.vmap(one)(carry)
