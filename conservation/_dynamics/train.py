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
from .._validation import (
    ArgumentError,
    as_float64,
    choice,
    fail,
    integer,
    is_traced,
    number,
    prng_key,
)
from .arguments import check_divergence, check_objective, same_parameters
from .batching import check_train_memory
from .monitor import (
    DIVERGED,
    LOSS_INCREASED,
    REACHED_LOSS,
    SUCCESS,
    LawMonitor,
    Result,
    TrainState,
    mark_loss_increased,
    show_progress,
    values_to_keep,
)
from .observables import ObservableMonitor, check_observables, check_resumed_observables

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
    lr_scales=None,
) -> optax.GradientTransformationExtraArgs:
    """An optax optimizer whose hyperparameters live in its state (`optax.inject_hyperparams`),
    so changing them never recompiles.

    - `"gd"` / `"sgd"`: θ ← (1 − ηλ)θ − η g (weight decay λ added to the gradient, as in
      Kunin et al.); minibatching is chosen by `train(batch_size=...)`.
    - `"momentum"`: heavy ball v ← βv + g + λθ, θ ← θ − ηv (PyTorch convention).
    - `"adam"`: Adam, or AdamW (decoupled decay) when `weight_decay` > 0.

    **Arguments:** `kind` (above); `lr` η > 0; `momentum` β in [0, 1) (only with
    `kind="momentum"`); `weight_decay` λ ≥ 0; `b1`, `b2` in [0, 1) (Adam's decay rates,
    compile-time constants); `lr_scales`: None, or one factor s_i > 0 per parameter array
    (in `jax.tree_util.tree_leaves` order of the model's floating-point arrays: W_1, W_2, …
    for a `DeepLinear`): leaf i steps with learning rate η·s_i (per-layer learning rates;
    the update of leaf i is multiplied by s_i, so with momentum v ← βv + g, θ_i ← θ_i −
    ηs_i v_i). Gradient descent with them follows `PreconditionedField.per_leaf(model,
    [η s_i])`, whose `LrBalanceLaw` it conserves up to O(η). `lr`, `momentum` and
    `weight_decay` may be arrays or traced values (they are checked when concrete); bad
    values raise `conservation.ArgumentError`.

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
    hyperparams = {k: as_float64(v) for k, v in hyperparams.items()}
    if lr_scales is not None:
        if isinstance(lr_scales, str | bytes) or not hasattr(lr_scales, "__len__"):
            raise fail("lr_scales", lr_scales, "must be None or a sequence with one factor "
                       "per parameter array", "e.g. lr_scales=[1.0, 0.25] for a 2-layer net")
        for s in lr_scales:
            number("lr_scales", s, ">0", fix="every learning-rate factor must be positive")
        lr_scales = tuple(as_float64(s) for s in lr_scales)
    return optax.GradientTransformationExtraArgs(
        _Init(kind, betas, hyperparams), _Update(kind, betas, lr_scales))


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
    # Per-leaf learning-rate factors (arrays: new values reuse the compiled program).
    scales: tuple[Array, ...] | None = None

    def __call__(self, updates, state, params=None, **extra_args):
        transform = _injected(self.kind, self.betas)(**state.hyperparams)
        updates, state = transform.update(updates, state, params, **extra_args)
        if self.scales is None:
            return updates, state
        leaves, treedef = jtu.tree_flatten(updates)
        if len(leaves) != len(self.scales):
            raise ArgumentError(
                f"`lr_scales` has {len(self.scales)} factors but the model has {len(leaves)} "
                "parameter arrays; give one factor per array (tree_leaves order).")
        return jtu.tree_unflatten(treedef, [u * s for u, s in zip(leaves, self.scales)]), state


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
    stop_at_loss: ScalarLike | None = None,
    resumable: bool = False,
    resume: Result | None = None,
    observables=(),
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
    - `stop_at_loss`: a loss goal L* > 0 (or None, default). A member stops before the first
      step k whose loss L(θ_k) ≤ L* (the full objective, also with minibatches: then one
      more loss evaluation per step), with status `reached_loss`, `final` = θ_k and
      `num_steps` = k (`Result.t_final` = k·`step_time`); a member whose final loss is ≤ L*
      is `reached_loss` too. Traced: a
      new value does not recompile.
    - `resumable`: keep in the Result what `resume` needs: the optimizer state and PRNG keys
      (`Result.train_state`) and the laws at θ₀ (`Result.reference`); default False.
    - `resume`: a previous `train` Result (run with `resumable=True`) to continue (with
      `model=resume.final`; the returned Result is resumable again): `steps`
      is the new total step count (> the previous one), and every member that reached the
      previous end (`success`, `loss_increased`) goes on from its parameters, optimizer
      state (moments, velocity, step count; the injected hyperparameters are those of
      `optim` / `hyperparams`, as at a start) and PRNG key (`key` is not used), with drifts
      measured from the original θ₀. The others keep their status and parameters. The
      returned Result is the whole run: the same steps as one run of `steps`, so the same
      numbers bit for bit, its saves the previous ones followed by about `n_save` − 1 new
      ones.
    - `observables`: observables of (θ, data) evaluated per member at every save (on the
      full objective, also with minibatches), e.g. `(conservation.Sharpness(k=3),
      conservation.GradientNorm())`, returned in `Result.observables` (name → (B, T,
      *shape)), as in `gradient_flow`. Default none.

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
    if stop_at_loss is not None:
        number("stop_at_loss", stop_at_loss, ">0",
               fix="the loss at which each member stops, or None (no goal)")
    if not isinstance(resumable, bool | np.bool_):
        raise fail("resumable", resumable, "must be True or False")
    done = 0 if resume is None else _check_resume(resume, ensemble, steps, step_time)
    resumable = bool(resumable) or resume is not None
    optim = check_optimizer(optim)
    n_save = integer("n_save", n_save, minimum=2)
    step_time = number("step_time", step_time, ">0",
                       fix="the time one step represents (e.g. the learning rate)")
    hyperparams = _check_hyperparams(hyperparams, ensemble.size)
    key = jax.random.PRNGKey(0) if key is None else key
    laws = check_unique_names(default_laws(ensemble[0]) if laws is None else laws)
    keep, final_values = values_to_keep(values, laws)
    if resume is not None:
        from .flow import _check_resumed_laws  # the same rule as flows (no import cycle)
        _check_resumed_laws(resume, laws, keep)
    observables = check_observables(observables)
    if resume is not None:
        check_resumed_observables(resume, observables)
    observers = ObservableMonitor(observables, objective) if observables else None
    monitor = LawMonitor(laws)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    check_train_memory(objective, params, static, laws, keep, final_values, optim, steps,
                       n_save, batch_size, ensemble.size)  # before anything is allocated

    chunk = -(-(steps - done) // (n_save - 1))
    n_chunks = -(-(steps - done) // chunk)
    overrides = {k: jnp.broadcast_to(jnp.asarray(v, float), (ensemble.size,))
                 for k, v in (hyperparams or {}).items()}
    carry, (*observed, last), observed_reference = _start(
        params, static, objective, monitor, optim, jax.random.split(key, ensemble.size),
        overrides, keep, observers)
    # Saves as (B, T_i, …) blocks along axis 1: the start (or the resumed run's saves), then
    # one block per call of `_run_chunk`.
    history = [observed]
    if resume is not None:
        carry = _resumed_carry(resume, carry)
        history = [[resume.loss, resume.values, resume.drift, resume.condition]
                   + ([resume.observables] if observers is not None else [])]
    stop = None if stop_at_loss is None else as_float64(stop_at_loss)
    bar = tqdm(total=steps - done, desc="train", disable=not show_progress(progress),
               unit="step")
    saves = _saves_per_call(n_chunks)
    for _ in range(n_chunks // saves):
        # Every call returns the law values of its last save only (the final model's, after
        # the last call): law-sized memory is B × law size, not B × saves × law size.
        carry, (*observed, last) = _run_chunk(
            carry, static, objective, monitor, optim, chunk, saves, batch_size,
            jnp.asarray(steps), as_float64(divergence), keep, stop, observers,
            observed_reference)
        history.append(observed)
        bar.update(min(saves * chunk, steps - done - bar.n))
    bar.close()

    params, opt_state, keys, status, count, max_drift, reference = carry
    loss, values, drift, condition, *observed = _stack(history)
    status = final_status(loss, status)
    if stop is not None:  # the goal reached by the last step
        status = jnp.where((status == SUCCESS) & (loss[:, -1] <= stop),
                           jnp.asarray(REACHED_LOSS, status.dtype), status)
    observed = observed[0] if observed else {}
    # On the host (as JAX would: int64 → float64, then one IEEE product): six fewer
    # one-operation programs on the first call.
    t = done + np.minimum(np.arange(n_chunks + 1) * chunk, steps - done)
    t = (as_float64(t * float(step_time)) if isinstance(step_time, int | float)
         else jnp.asarray(t) * step_time)
    if resume is not None:
        t = jnp.concatenate([resume.t, t[1:]])
    last = last if final_values else {}
    return Result(
        t=t.astype(float), loss=loss, values=values, drift=drift, max_drift=max_drift,
        condition=condition, final=Ensemble(eqx.combine(params, static), ensemble.size),
        status=status, num_steps=count, final_values=last,
        reference=reference if resumable else None,
        t_final=None if stop is None else count * step_time,
        train_state=TrainState(opt_state, keys, jnp.asarray(steps)) if resumable else None,
        observables=observed,
    )


# The fewest calls of `_run_chunk` a run makes when its saves allow (see `_saves_per_call`): one
# call per save cost ~1 ms of dispatch each, as much as 400 steps of a small model.
_CALLS = 10


def _saves_per_call(n_chunks: int) -> int:
    """The saves each `_run_chunk` call makes: the largest divisor of `n_chunks` that leaves
    ≥ `_CALLS` calls (a progress bar's steps), so that every call is the same program."""
    return max([d for d in range(1, n_chunks // _CALLS + 1) if n_chunks % d == 0], default=1)


def _one_save(observed):
    """The monitors observed at one save, (B, …) each, as a block of one save (B, 1, …)
    (inside the programs that observe them: not one indexing operation per leaf and save)."""
    return jtu.tree_map(lambda v: v[:, None], list(observed))


@jax.jit  # one program for every monitor, not a concatenation per leaf and shape
def _stack(history):
    """The blocks of saves (B, T_i, …) of every monitor joined along the save axis: a list
    of blocks [loss, values, drift, condition(, observables)] → one such list."""
    return jtu.tree_map(lambda *blocks: jnp.concatenate(blocks, axis=1), *history)


def _check_resume(resume, ensemble, steps, step_time) -> int:
    """`train(resume=)`: a train Result whose `final` is `model`; returns its step count."""
    if not isinstance(resume, Result) or resume.train_state is None:
        raise fail("resume", type(resume).__name__, "must be the Result of a previous "
                   "`train(..., resumable=True)`",
                   "a flow's Result continues with gradient_flow(resume=...)")
    if not same_parameters(ensemble, resume.final):
        raise fail("model", "a model other than resume.final", "must be `resume.final` when "
                   "resuming (training continues from its last state)",
                   "call train(objective, previous.final, optim, steps, resume=previous)")
    done = int(resume.train_state.step)
    if steps <= done:
        raise fail("steps", steps, f"must exceed the resumed run's {done} steps",
                   "`steps` is the new total, not the number of steps to add")
    if not np.isclose(float(resume.t[-1]), done * float(step_time), rtol=1e-12, atol=0):
        raise fail("step_time", step_time, f"must be the resumed run's "
                   f"({float(resume.t[-1]) / done:g})", "its times go on")
    return done


def _resumed_carry(resume, fresh):
    """The carry of `_run_chunk` continuing `resume`: its parameters, optimizer state and
    keys, running statuses, step counts, worst drifts and reference; the injected
    hyperparameters of `fresh` (the carry `_start` built from `optim` / `hyperparams`)."""
    _, state, _, _, _, _, _ = fresh
    stored = resume.train_state.opt_state
    if jtu.tree_structure(stored) != jtu.tree_structure(state):
        raise ArgumentError("`optim` is not the optimizer of the resumed run (its state has "
                            "another structure); resume with the same kind of optimizer.")
    if hasattr(stored, "hyperparams"):
        stored = stored._replace(hyperparams=state.hyperparams)
    params = eqx.filter(resume.final.models, eqx.is_inexact_array)
    status = jnp.where(resume.status == LOSS_INCREASED, SUCCESS, resume.status)
    return (params, stored, resume.train_state.key, status.astype(fresh[3].dtype),
            resume.num_steps.astype(fresh[4].dtype), dict(resume.max_drift), resume.reference)



def check_run_arguments(objective, *, steps, batch_size, key, divergence) -> None:
    """The arguments `train` and `track_mechanics` share, checked at the boundary (each bad
    one raises `conservation.ArgumentError` naming it)."""
    check_objective(objective)
    integer("steps", steps, minimum=1, fix="the number of optimizer steps")
    if batch_size is not None:
        integer("batch_size", batch_size, minimum=1, maximum=len(objective.data),
                fix=f"a minibatch of at most the {len(objective.data)} examples, or None "
                    "for full-batch steps")
        if key is None:
            raise ArgumentError("`batch_size` needs a `key` to draw minibatches: pass "
                                "key=jax.random.PRNGKey(seed).")
    prng_key("key", key, optional=True)
    check_divergence(divergence)


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


@jax.jit  # one program, not one per elementwise operation (first-call latency)
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
def _start(params, static, objective, monitor, optim, keys, overrides, keep, observers=None):
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
        if observers is None:
            return carry, (objective(model), kept, zeros, monitor.conditions(model),
                           reference[0]), None
        observed = observers.reference(model)  # the observables' references at θ₀
        return carry, (objective(model), kept, zeros, monitor.conditions(model),
                       observers.values(model, observed), reference[0]), observed

    carry, (*observed, last), observed_reference = jax.vmap(one)(params, keys, overrides)
    return carry, (*_one_save(observed), last), observed_reference


@eqx.filter_jit
def _run_chunk(carry, static, objective, monitor, optim, chunk, saves, batch_size, steps,
               divergence, keep, stop=None, observers=None, observed_reference=None):
    global TRACES
    TRACES += 1  # runs once per trace: counts compilations of the training program
    def one(carry, observed_reference):
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
            if stop is not None:
                # The goal is checked on the full loss at θ_k, before step k is taken.
                full = loss if batch_size is None else objective(eqx.combine(p, static))
                there = active & (full <= stop)
                status = jnp.where(there, REACHED_LOSS, status)
                active = active & ~there
            take = active & ok
            p, state = jtu.tree_map(lambda new, old: jnp.where(take, new, old),
                                    (new_p, new_state), (p, state))
            status = jnp.where(active & ~ok, DIVERGED, status)
            drift = monitor.drifts(monitor.values(eqx.combine(p, static)), reference)
            max_drift = {k: jnp.where(take, jnp.maximum(max_drift[k], drift[k]), max_drift[k])
                         for k in max_drift}
            return (p, state, key, status, count + take, max_drift, reference), None

        def save(carry, _):
            carry, _ = jax.lax.scan(step, carry, None, length=chunk)
            model = eqx.combine(carry[0], static)
            values = monitor.values(model)
            observed = (() if observers is None
                        else (observers.values(model, observed_reference),))
            return carry, (objective(model), {k: values[k] for k in keep},
                           monitor.drifts(values, carry[-1]), monitor.conditions(model),
                           *observed)

        carry, observed = jax.lax.scan(save, carry, None, length=saves)
        return carry, (*observed, monitor.values(eqx.combine(carry[0], static)))

    # (B, saves, …) blocks: the scan's save axis after the members'.
    return jax.vmap(one)(carry, observed_reference)
