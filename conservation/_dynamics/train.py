"""Discrete training with optax (GD, minibatch SGD, heavy ball, weight decay, Adam)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from tqdm.auto import tqdm

from .._custom_types import Array, Key, ScalarLike
from .._data.objective import Objective
from .._laws.base import check_unique_names
from .._models.base import AbstractModel, Ensemble, as_ensemble, default_laws
from .._validation import ArgumentError, choice, fail, integer, is_traced, number, prng_key
from .batching import check_train_memory
from .monitor import (
    DIVERGED,
    SUCCESS,
    LawMonitor,
    Result,
    mark_loss_increased,
    show_progress,
    values_to_keep,
)

KINDS = ("gd", "sgd", "momentum", "adam")
# The bound each injected hyperparameter must satisfy (`optimizer` and `train(hyperparams=)`).
_BOUNDS = {"learning_rate": ">0", "momentum": "[0,1)", "weight_decay": ">=0"}


def optimizer(
    kind: str = "gd",
    *,
    lr: ScalarLike,
    momentum: ScalarLike = 0.0,
    weight_decay: ScalarLike = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformationExtraArgs:
    """An optax optimizer whose hyperparameters live in its state (`optax.inject_hyperparams`),
    so changing them never recompiles.

    - `"gd"` / `"sgd"`: θ ← (1 − ηλ)θ − η g (weight decay λ added to the gradient, as in
      Kunin et al.); minibatching is chosen by `train(batch_size=...)`.
    - `"momentum"`: heavy ball v ← βv + g + λθ, θ ← θ − ηv (PyTorch convention).
    - `"adam"`: Adam, or AdamW (decoupled decay) when `weight_decay` > 0.

    **Arguments:** `kind` (above); `lr` η > 0; `momentum` β in [0, 1) (only with
    `kind="momentum"`); `weight_decay` λ ≥ 0; `b1`, `b2` in [0, 1) (Adam's decay rates,
    compile-time constants). `lr`, `momentum` and `weight_decay` may be arrays or traced values
    (they are checked when concrete); bad values raise `conservation.ArgumentError`.

    **Returns:** an `optax.GradientTransformationExtraArgs` (`init`, `update`), the same
    transformation as `optax.inject_hyperparams` builds. Its `init` and `update` are equinox
    modules that compare equal for equal `kind`, `b1` and `b2`, and carry `lr`, `momentum`,
    `weight_decay` as arrays: an optimizer made again, with the same or other values, reuses
    `train`'s compiled program.
    """
    choice("kind", kind, KINDS)
    lr = number("lr", lr, ">0", array=True, fix="the learning rate η must be positive")
    momentum = number("momentum", momentum, "[0,1)", array=True,
                      fix="β ≥ 1 never forgets a gradient (the heavy ball diverges)")
    weight_decay = number("weight_decay", weight_decay, ">=0", array=True)
    b1 = float(number("b1", b1, "[0,1)"))
    b2 = float(number("b2", b2, "[0,1)"))
    if kind != "momentum" and (is_traced(momentum) or np.any(np.asarray(momentum) != 0.0)):
        raise fail("momentum", momentum, f"is only used by kind='momentum', not {kind!r}",
                   "use optimizer('momentum', lr=..., momentum=...)")
    hyperparams = {"learning_rate": lr, "weight_decay": weight_decay}
    if kind != "adam":
        hyperparams["momentum"] = momentum
    betas = (b1, b2) if kind == "adam" else ()
    hyperparams = {k: jnp.asarray(v, float) for k, v in hyperparams.items()}
    return optax.GradientTransformationExtraArgs(
        _Init(kind, betas, hyperparams), _Update(kind, betas))


def _heavy_ball(learning_rate, momentum, weight_decay):
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def _injected(kind: str, betas: tuple[float, ...]):
    """`optax.inject_hyperparams` of the factory of `kind` (built per call: the closures it
    returns compare by identity, the modules below by value)."""
    if kind == "adam":
        b1, b2 = betas

        def make(learning_rate, weight_decay):
            return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)

        return optax.inject_hyperparams(make)
    return optax.inject_hyperparams(_heavy_ball)


class _Init(eqx.Module):
    """`init` of `optimizer(...)`: the hyperparameters are array leaves (traced under `jit`),
    the kind and Adam's betas static fields, so equal optimizers hash equal."""

    kind: str = eqx.field(static=True)
    betas: tuple[float, ...] = eqx.field(static=True)
    hyperparams: dict[str, Array]

    def __call__(self, params):
        return _injected(self.kind, self.betas)(**self.hyperparams).init(params)


class _Update(eqx.Module):
    """`update` of `optimizer(...)`: `optax.inject_hyperparams`'s update reads the numeric
    hyperparameters from the state, so none are stored here."""

    kind: str = eqx.field(static=True)
    betas: tuple[float, ...] = eqx.field(static=True)

    def __call__(self, updates, state, params=None, **extra_args):
        transform = _injected(self.kind, self.betas)(**state.hyperparams)
        return transform.update(updates, state, params, **extra_args)


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
      `conservation.optimizer`s of one kind share the compiled program whatever their
      learning rate, momentum and weight decay; another optax transformation reuses it only
      when the same object is passed again.
    - `steps`: number of optimizer steps (exactly this many are taken by every member that
      does not diverge).
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
    - `divergence`: a number > 0 (or inf): a member whose parameter norm exceeds this or
      whose loss is non-finite is frozen at its last good step and reported as `diverged`,
      at the step it happens (a member that starts with non-finite parameters or loss takes
      0 steps).
    - `hyperparams`: per-member values of `optim`'s injected hyperparameters, e.g.
      `{"learning_rate": lrs}` with `lrs` of shape (B,): a whole learning-rate sweep runs as
      one compiled program (`conservation.optimizer` injects `learning_rate`, `momentum`,
      `weight_decay`).

    **Memory:** B·T scalars per law (loss, drift, condition at T ≈ `n_save` saves) plus the
    final parameters and `final_values` (B × law size); B·T·law size only for laws kept with
    `values`. Refuses a run whose estimate exceeds the available memory
    (`conservation.InsufficientMemory`, an `ArgumentError`).

    **Returns:** a `conservation.Result` with `t` = steps × `step_time` at the save points.
    Status per member: `diverged` (above), `loss_increased` when the run ended with its loss
    above 10× its initial loss (as in `gradient_flow`; only the end point counts,
    so a transient catapult that comes back stays `success`), else `success`.

    Bad arguments raise `conservation.ArgumentError`, naming the argument.
    """
    ensemble = as_ensemble(model)
    check_run_arguments(objective, steps=steps, batch_size=batch_size, key=key,
                        divergence=divergence)
    optim = check_optimizer(optim)
    n_save = integer("n_save", n_save, minimum=2)
    step_time = number("step_time", step_time, ">0",
                       fix="the time one step represents (e.g. the learning rate)")
    hyperparams = _check_hyperparams(hyperparams, ensemble.size)
    key = jax.random.PRNGKey(0) if key is None else key
    laws = check_unique_names(default_laws(ensemble[0]) if laws is None else laws)
    keep, final_values = values_to_keep(values, laws)
    monitor = LawMonitor(laws)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    check_train_memory(objective, params, static, laws, keep, final_values, optim, steps,
                       n_save, batch_size, ensemble.size)  # before anything is allocated

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
    status = final_status(loss, status)
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



def check_run_arguments(objective, *, steps, batch_size, key, divergence) -> None:
    """The arguments `train` and `track_mechanics` share, checked at the boundary (each bad
    one raises `conservation.ArgumentError` naming it)."""
    if not isinstance(objective, Objective):
        raise fail("objective", objective, "must come from `conservation.make_objective(...)`",
                   "e.g. make_objective(conservation.MSE(), data, model)")
    integer("steps", steps, minimum=1, fix="the number of optimizer steps")
    if batch_size is not None:
        integer("batch_size", batch_size, minimum=1, maximum=len(objective.data),
                fix=f"a minibatch of at most the {len(objective.data)} examples, or None "
                    "for full-batch steps")
        if key is None:
            raise ArgumentError("`batch_size` needs a `key` to draw minibatches: pass "
                                "key=jax.random.PRNGKey(seed).")
    prng_key("key", key, optional=True)
    if not _is_inf(divergence):
        number("divergence", divergence, ">0",
               fix="the parameter norm beyond which a member counts as diverged (inf: never)")


def _is_inf(value) -> bool:
    if isinstance(value, str | bytes | bool) or is_traced(value) or np.ndim(value) != 0:
        return False
    try:
        return bool(np.isposinf(float(value)))
    except (TypeError, ValueError):
        return False


def check_optimizer(optim):
    """An optax `GradientTransformation` (anything with callable `init` and `update`)."""
    if not (callable(getattr(optim, "init", None)) and callable(getattr(optim, "update", None))):
        raise fail("optim", optim, "must be an optax GradientTransformation",
                   "e.g. conservation.optimizer('gd', lr=0.01)")
    return optim


def _check_hyperparams(hyperparams, size: int) -> dict[str, Array] | None:
    """`train(hyperparams=)`: a dict name → scalar or (B,) values, finite and within the bound
    of the name's hyperparameter (learning rate > 0, momentum in [0, 1), weight decay ≥ 0)."""
    if hyperparams is None:
        return None
    if not isinstance(hyperparams, dict) or not all(isinstance(k, str) for k in hyperparams):
        raise fail("hyperparams", hyperparams, "must be a dict of hyperparameter name → values",
                   "e.g. {'learning_rate': lrs} with lrs of shape (B,)")
    out = {}
    for k, v in hyperparams.items():
        name = f"hyperparams[{k!r}]"
        # Arrays spread over several hosts cannot be read here; the config checked them.
        if getattr(v, "is_fully_addressable", True):
            number(name, v, _BOUNDS.get(k, ""), array=True)
        if np.ndim(v) not in (0, 1) or np.ndim(v) == 1 and np.shape(v)[0] != size:
            raise fail(name, v, f"must be a scalar or have shape ({size},) (one value per "
                       "member)")
        out[k] = v
    return out


def final_status(loss, status):
    """The statuses of a finished discrete run (shared with `track_mechanics`): a member
    still `success` whose final loss is non-finite is `diverged` (the last step led there:
    the step loop only checks the loss it differentiates); one whose final loss is above 10×
    its initial loss is `loss_increased` (`monitor.mark_loss_increased`)."""
    status = jnp.where((status == SUCCESS) & ~jnp.isfinite(loss[:, -1]),
                       jnp.asarray(DIVERGED, status.dtype), status)
    return mark_loss_increased(loss, status)


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
                raise ArgumentError(
                    f"`hyperparams` {sorted(override)} are not all injected hyperparameters of "
                    f"`optim` ({sorted(getattr(state, 'hyperparams', {}))}); use "
                    "conservation.optimizer or optax.inject_hyperparams.")
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
