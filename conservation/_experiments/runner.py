"""Run a validated config: build models and data, run every [[dynamics]] entry, write results.

Each run's arrays are written (atomically) as soon as it finishes, and `summary.json` and
`plot.png` are refreshed after every run, so a crash or interrupt loses at most the run in
progress.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import re
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np

from .._data.augmentation import Augmentation
from .._data.dataset import Dataset, gaussian_inputs, teacher_dataset, whiten
from .._data.groups import GROUPS, AbstractGroup, OrthogonalGroup, PlanarRotations
from .._data.losses import LOSSES
from .._data.objective import Objective, make_objective
from .._dynamics.central import CentralFlowField
from .._dynamics.fields import MomentumField, NesterovField, SignField
from .._dynamics.flow import GradientField, ModifiedGradientField, gradient_flow
from .._dynamics.mechanics import MechanicsResult, track_mechanics
from .._dynamics.monitor import Result, TrainState
from .._dynamics.observables import GradientNorm, KernelDistance, Sharpness
from .._dynamics.train import optimizer, train
from .._laws.counting import count_laws
from .._laws.discovery import find_symmetries
from .._laws.phase_space import phase_space_laws
from .._laws.symmetry import (
    AttentionRangeLaw,
    CyclicRatioLaw,
    FourierPhaseLaw,
    RowSpaceLaw,
    augmentation_laws,
)
from .._models.attention import LightningAttention
from .._models.base import Ensemble, default_laws, flat_parameters
from .._models.linear import DeepLinear
from .._models.mlp import MLP, AbstractMechanicsLaw, mechanics_laws
from .._models.polynomial import Neuron, PolynomialNet
from .._models.transformer import BlockStack, FeedForward, SoftmaxAttention, TransformerBlock
from .._text import text_table
from .config import (
    FLOW_KINDS,
    PHASE_FLOW_KINDS,
    Config,
    ConfigError,
    default_n_save,
    input_dim,
    resolve_factory,
)
from .memory import check_memory
from .plot import plot_landscapes, plot_mechanics, plot_results
from .store import (
    CorruptFile,
    UserError,
    atomic_write,
    check_interrupted,
    fingerprint,
    folder_lock,
    identity_array,
    load_npz,
    prepare_output,
    read_json,
    remove_orphans,
    save_npz,
    strict_json,
    write_json,
)
from .store import (
    identity as stored_identity,
)


def model_factory(spec, base: str | os.PathLike | None = None) -> Callable:
    """`(key, init_scale) -> model` for a validated `[model]` table (`base`: the config file's
    folder, where a `kind = "python"` factory module may lie)."""
    kind = spec.kind
    if kind == "deep_linear":
        return lambda key, scale: DeepLinear.random(spec.widths, key=key, init_scale=scale)
    if kind == "polynomial":
        return lambda key, scale: PolynomialNet.random(
            spec.widths, key=key, activation=spec.activation, init_scale=scale)
    if kind == "mlp":
        extra = {}
        if not spec.bias:  # passed only when asked: older MLP.random has no `bias`
            if "bias" not in inspect.signature(MLP.random).parameters:
                raise ConfigError("`model.bias` = false needs bias-free MLPs, which this "
                                  "version of conservation lacks; remove the field.")
            extra["bias"] = False
        return lambda key, scale: MLP.random(
            spec.widths, key=key, activation=spec.activation, normalize=spec.normalize,
            init_scale=scale, **extra)
    if kind == "neuron":
        return lambda key, scale: Neuron.random(
            spec.dim, key=key, activation=spec.activation, init_scale=scale)
    if kind == "python":
        factory = resolve_factory(spec.factory, "model.factory", base)

        def make(key, scale):
            del scale  # init_scale does not apply to user models
            try:
                model = factory(key, **spec.kwargs)
            except Exception as e:  # the user's code: name the field, keep the reason
                raise ConfigError(f"field `model.factory`: {spec.factory}(key, **kwargs) "
                                  f"raised {type(e).__name__}: {e}") from None
            if not isinstance(model, eqx.Module):
                raise ConfigError(f"field `model.factory` must return an equinox Module, got "
                                  f"{type(model).__name__}.")
            if not jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)):
                raise ConfigError("field `model.factory` returned a model without floating-"
                                  "point arrays (nothing to train).")
            return model
        return make
    if kind == "softmax_attention":
        return lambda key, scale: SoftmaxAttention.random(
            spec.dim, key=key, key_dim=spec.key_dim, value_dim=spec.value_dim,
            heads=spec.heads, out_dim=spec.out_dim or None, init_scale=scale,
            causal=spec.causal, rotary=spec.rotary, rotary_base=spec.rotary_base)
    if kind == "feed_forward":
        return lambda key, scale: FeedForward.random(
            spec.widths, key=key, activation=spec.activation, gated=spec.gated,
            init_scale=scale)
    if kind == "transformer_block":
        block = dict(heads=spec.heads, key_dim=spec.key_dim, value_dim=spec.value_dim,
                     hidden=spec.hidden, activation=spec.activation, gated=spec.gated,
                     norm=spec.norm, causal=spec.causal, rotary=spec.rotary,
                     rotary_base=spec.rotary_base)
        if spec.blocks == 1:
            return lambda key, scale: TransformerBlock.random(
                spec.dim, key=key, init_scale=scale, **block)
        return lambda key, scale: BlockStack.random(
            spec.blocks, spec.dim, key=key, init_scale=scale, **block)
    return lambda key, scale: LightningAttention.random(
        spec.dim, key=key, key_dim=spec.key_dim, value_dim=spec.value_dim, heads=spec.heads,
        out_dim=spec.out_dim or None, init_scale=scale, decay=spec.decay, causal=spec.causal,
        form=spec.form, block_size=spec.block_size)


_CANDIDATE_LAWS = {  # `[laws] extra` names → laws (config.LAW_NAMES)
    "rowspace": RowSpaceLaw(None),
    "range_qkv": AttentionRangeLaw(),
    "ratio_c3": CyclicRatioLaw(),
    "phase1": FourierPhaseLaw(1),
    "phase2": FourierPhaseLaw(2),
    "phase3": FourierPhaseLaw(3),
}


def group_from_spec(spec, dim: int) -> AbstractGroup:
    """The group of a validated `[augmentation]` table acting on R^`dim`."""
    name = spec.group
    try:
        if name == "rotations":
            return PlanarRotations(spec.order)
        if name in ("octahedral", "icosahedral"):
            return GROUPS[name]()
        if name == "orthogonal":
            return OrthogonalGroup(dim, samples=spec.samples or None)
        return GROUPS[name](dim)
    except ValueError as e:
        raise ConfigError(f"field `augmentation.group` = {name!r} on R^{dim}: {e}") from None


def augmentation_from_config(config: Config) -> Augmentation:
    spec = config.augmentation
    return Augmentation(group_from_spec(spec, _group_dim(config)), spec.equivariant)


def _group_dim(config: Config) -> int:
    return input_dim(config.model)


def _initial_ensemble(config: Config, make, key) -> Ensemble:
    ensemble = Ensemble.init(lambda k: make(k, config.model.init_scale), key,
                             config.ensemble.size)
    if config.ensemble.init is None:
        return ensemble
    params, static = eqx.partition(ensemble[0], eqx.is_inexact_array)
    flat, unravel = jfu.ravel_pytree(params)
    rows = config.ensemble.init
    if len(rows[0]) != flat.size:
        raise ConfigError(f"`ensemble.init` rows have {len(rows[0])} entries but the model has "
                          f"{flat.size} parameters.")
    return Ensemble.stack([eqx.combine(unravel(jnp.asarray(r, flat.dtype)), static)
                           for r in rows])


def _input_shape(config: Config) -> tuple[int, ...] | None:
    """One input's shape the model expects (None: unknown, a python model without
    `input_shape`, or attention without `data.tokens`)."""
    model = config.model
    if model.kind in ("lightning_attention", "softmax_attention", "transformer_block"):
        return (config.data.tokens, model.dim) if config.data.tokens else None
    if model.kind == "python":
        return tuple(model.input_shape) or None
    return (input_dim(model),)


def load_inputs(config: Config, key) -> tuple[jax.Array, jax.Array | None, str]:
    """The inputs x (and targets y when the source has them) of `config.data`, and the name
    of the field they came from (for errors)."""
    data = config.data
    y = None
    if data.inputs == "explicit":
        x, field = np.asarray(data.x, float), "data.x"
    elif data.inputs == "file":
        field = "data.path"
        path = pathlib.Path(config.base) / data.path
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"field `data.path`: cannot read {str(path)!r}: {e}") from None
        if isinstance(loaded, np.ndarray):
            x = loaded
        else:
            with loaded:
                if "x" not in loaded.files:
                    raise ConfigError(f"field `data.path`: {data.path!r} has no array 'x' "
                                      f"(arrays: {', '.join(loaded.files) or 'none'}).")
                x = loaded["x"]
                if data.targets == "file":
                    if "y" not in loaded.files:
                        raise ConfigError(f"field `data.path`: {data.path!r} has no array 'y' "
                                          "for `data.targets` = 'file'.")
                    y = loaded["y"]
    elif data.inputs == "python":
        field = "data.factory"
        factory = resolve_factory(data.factory, field, config.base)
        try:
            out = factory()
        except Exception as e:  # the user's code
            raise ConfigError(f"field `data.factory`: {data.factory}() raised "
                              f"{type(e).__name__}: {e}") from None
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ConfigError("field `data.factory` must return a pair (x, y) of arrays, got "
                              f"{type(out).__name__}.")
        x, y = out
        if data.targets != "python":
            y = None
    else:
        shape = _input_shape(config)
        x = gaussian_inputs(key, data.n, shape)
        if data.inputs == "whitened":
            x = whiten(x)
        return data.input_scale * x, None, "data.n"
    x = _as_float_array(x, field, "x")
    expected = _input_shape(config)
    if expected is not None and x.shape[1:] != expected:
        raise ConfigError(f"`{field}` inputs have shape {x.shape[1:]} per sample but the model "
                          f"takes {expected}.")
    if data.n is not None and x.shape[0] != data.n:
        raise ConfigError(f"`{field}` has {x.shape[0]} samples but `data.n` = {data.n}.")
    if y is not None:
        y = _as_float_array(y, field, "y")
        y = y[:, None] if y.ndim == 1 else y
        if y.shape[0] != x.shape[0]:
            raise ConfigError(f"`{field}` has {x.shape[0]} inputs but {y.shape[0]} targets.")
    return data.input_scale * jnp.asarray(x), None if y is None else jnp.asarray(y), field


def _as_float_array(a, field, what):
    try:
        a = np.asarray(a, dtype=float)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`{field}`: {what} is not a numeric array ({e}).") from None
    if a.ndim < 2 and what == "x":
        raise ConfigError(f"`{field}`: x needs a sample axis plus feature axes, got shape "
                          f"{a.shape}.")
    if not a.shape[0]:
        raise ConfigError(f"`{field}`: {what} has 0 samples.")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"`{field}`: {what} holds {int(np.sum(~np.isfinite(a)))} non-finite "
                          "values (nan/inf); clean the data first.")
    return a


def build(config: Config, *, members: int | None = None) -> tuple[Ensemble, dict[str, Objective],
                                                                   tuple]:
    """The initial ensemble, the objectives (`{"": plain}` or `{"plain": …, "augmented": …}`)
    and the laws to monitor (architecture + augmentation-induced) described by `config`.

    Memory is checked first (`check_memory`, for `members` members, default
    `ensemble.size`): a run that cannot fit is refused before anything is allocated.
    Problems found while building (shapes of explicit data, laws that do not apply, groups too
    large) are `ConfigError`s naming the field."""
    k_model, k_teacher, k_x, k_y = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    make = model_factory(config.model, config.base)
    parameters = None
    if config.model.kind == "python":  # the size is only known once the factory has run
        parameters = flat_parameters(make(k_model, 1.0)).size
    check_memory(config, members=members, parameters=parameters)
    ensemble = _initial_ensemble(config, make, k_model)
    data_spec = config.data
    x, y, source = load_inputs(config, k_x)
    teacher = make(k_teacher, data_spec.teacher_scale)
    try:
        out_shape = jax.eval_shape(teacher, x[0]).shape
    except Exception as e:  # wrong shapes for this model: the data's fault, name its field
        raise ConfigError(f"`{source}`: the model cannot take inputs of shape {x.shape[1:]} "
                          f"({type(e).__name__}: {e})") from None
    classify = config.loss.kind == "cross_entropy"
    loss = LOSSES[config.loss.kind]()
    target_field = source
    if y is not None:
        pass
    elif data_spec.targets == "explicit":
        target_field = "data.y"
        y = jnp.asarray(data_spec.y, float)
        y = y[:, None] if y.ndim == 1 else y
        if not loss.fits(out_shape, y.shape[1:]):
            raise ConfigError(f"`data.y` rows have shape {y.shape[1:]} but the model's output "
                              f"has shape {out_shape}.")
    elif data_spec.targets == "teacher":
        y = teacher_dataset(teacher, x, noise=data_spec.noise, key=k_y).y
        if classify:  # class probabilities of the teacher's logits
            y = jax.nn.sigmoid(y) if y.shape[-1] == 1 else jax.nn.softmax(y, axis=-1)
    else:
        y = jax.random.normal(k_y, (x.shape[0], *out_shape))
        if classify:
            y = ((y > 0).astype(float) if out_shape[-1] == 1 else
                 jax.nn.one_hot(jnp.argmax(y, -1), out_shape[-1]))
    if not loss.fits(out_shape, y.shape[1:]):  # cross-entropy also takes class labels
        raise ConfigError(f"`{source}` targets have shape {y.shape[1:]} per sample but the "
                          f"model's output has shape {out_shape}.")
    try:
        loss.check_targets(y, out_shape)
        data = Dataset(x, y)
    except ValueError as e:
        raise ConfigError(f"`{target_field}`: {e}") from None
    try:
        plain = make_objective(loss, data, ensemble, moments=config.loss.moments)
    except ValueError as e:
        raise ConfigError(f"field `loss.moments` = {config.loss.moments!r}: {e}") from None
    member = ensemble[0]
    own = (mechanics_laws(member, loss) if isinstance(member, MLP) else default_laws(member))
    discover = config.laws.discover
    if discover or (discover is None and config.model.kind == "python"):
        # Foreign networks declare no laws: probe their translation/scale/rescale symmetries.
        own = tuple(own) + tuple(law for law in find_symmetries(
            member, loss, data, key=jax.random.fold_in(k_model, 1)).laws
            if law.name not in {o.name for o in own})
    extra = tuple(_CANDIDATE_LAWS[name] for name in config.laws.extra)
    for name, law in zip(config.laws.extra, extra):
        try:
            jax.eval_shape(law, member)
        except Exception:  # noqa: BLE001 — any failure means the law does not fit this model
            raise ConfigError(f"`laws.extra` = {name!r} does not apply to "
                              f"{type(member).__name__} models; remove it.") from None
    laws = (tuple(own) if config.laws.architecture else ()) + extra
    spec = config.augmentation
    if spec is None:
        return ensemble, {"": plain}, laws
    augmentation = augmentation_from_config(config)
    try:
        if spec.mode == "orbit":
            augmented = make_objective(loss, augmentation.apply(data), ensemble,
                                       moments=config.loss.moments)
        else:
            augmented = make_objective(loss, data, ensemble, moments=config.loss.moments,
                                       augment=augmentation)
    except ValueError as e:
        raise ConfigError(f"`augmentation` ({spec.group!r}, mode {spec.mode!r}): {e}") from None
    if config.laws.augmentation:
        names = {law.name for law in laws}
        laws += tuple(law for law in augmentation_laws(member, augmentation)
                      if law.name not in names)
    objectives = {"augmented": augmented}
    if spec.compare:
        objectives = {"plain": plain} | objectives
    return ensemble, objectives, laws


def _solver(run) -> str:
    """The solver name of a flow entry (`"auto"` is resolved by `gradient_flow`)."""
    return run.solver


def _flow_field(run):
    if run.kind == "flow":
        return GradientField(run.weight_decay)
    if run.kind == "momentum_flow":
        return MomentumField(run.mass, run.weight_decay, run.start_velocity)
    if run.kind == "nesterov_flow":
        return NesterovField(run.start_time, run.weight_decay, run.start_velocity)
    if run.kind == "sign_flow":
        return SignField(run.weight_decay, run.smoothing)
    if run.kind == "central_flow":
        return CentralFlowField(run.lr, k=run.k, relaxation=run.relaxation,
                                weight_decay=run.weight_decay)
    return ModifiedGradientField(run.lr, run.momentum, run.weight_decay)


def _entry_optimizer(run):
    kind = "gd" if run.kind == "sgd" else run.kind
    return optimizer(kind, lr=run.lr, momentum=run.get("momentum", 0.0),
                     weight_decay=run.weight_decay)


def observables_from_config(config, objective: Objective) -> tuple:
    """The observables of `[observables]` (none without the table): `sharpness` = k top
    Hessian eigenvalues, the gradient norm, the kernel distance on the first `kernel_probe`
    training inputs."""
    spec = getattr(config, "observables", None)
    if spec is None:
        return ()
    out = []
    if spec.sharpness:
        out.append(Sharpness(k=spec.sharpness))
    if spec.gradient_norm:
        out.append(GradientNorm())
    if spec.kernel_distance:
        out.append(KernelDistance(objective.data.x[:spec.kernel_probe]))
    return tuple(out)


def execute(run, objective: Objective, ensemble: Ensemble, *, key, progress: bool,
            laws=None, segment: tuple[int, int] = (1, 1), resume: Result | None = None,
            observables=()) -> Result:
    """One validated `[[dynamics]]` entry; with `segment` = (k, n), its k-th of n equal
    segments (resumable), continuing `resume` (segment k − 1's Result, whose `final` is the
    start)."""
    k, n = segment
    n_save = (default_n_save(run) - 1) // n + 1  # the config checked that n divides it
    model = ensemble if resume is None else resume.final
    more = {} if n == 1 else {"resumable": True, "resume": resume}
    if run.kind in FLOW_KINDS:
        # A resumed flow keeps the solver its first segment ran with ("auto" picks once).
        solver = _solver(run) if resume is None else resume.solver
        return gradient_flow(
            objective, model, run.t1 * k / n, n_save=n_save, solver=solver,
            rtol=run.rtol, atol=run.atol or run.rtol, max_steps=run.max_steps,
            laws=laws, progress=progress, divergence=run.divergence, field=_flow_field(run),
            stop_at_loss=_get(run, "stop_at_loss"), observables=observables, **more)
    return train(
        objective, model, _entry_optimizer(run), run.steps * k // n,
        batch_size=run.get("batch_size") or None, key=key, laws=laws, n_save=n_save,
        step_time=run.lr, progress=progress, divergence=run.divergence,
        stop_at_loss=_get(run, "stop_at_loss"), observables=observables, **more)


def _partial_arrays(result: Result, laws, segment: int, identity) -> dict[str, np.ndarray]:
    """What a segmented entry saves after segment `segment`: the run so far (as its final
    file), the laws at θ₀ the drifts are measured from, the stop times, and a discrete
    run's optimizer state and keys."""
    arrays = result_arrays(result, laws)
    values, scales = result.reference
    arrays |= {f"reference/values/{k}": np.asarray(v) for k, v in values.items()}
    arrays |= {f"reference/scales/{k}": np.asarray(v) for k, v in scales.items()}
    if result.t_final is not None:
        arrays["partial/t_final"] = np.asarray(result.t_final)
    if result.train_state is not None:
        for i, leaf in enumerate(jax.tree_util.tree_leaves(result.train_state)):
            arrays[f"train_state/{i}"] = np.asarray(leaf)
    if result.velocity is not None:  # a second-order flow continues from (θ, v)
        params = eqx.filter(result.velocity.models, eqx.is_inexact_array)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            arrays[f"velocity{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    arrays["partial/segment"] = np.asarray(segment)
    arrays["identity"] = identity_array(identity)
    return arrays


def _load_partial(path: pathlib.Path, run, ensemble: Ensemble, identity, log):
    """(the Result of the segments a stopped run finished, how many), or (None, 0) when
    there is none to continue: no file, another run's, or damaged (then it is removed)."""
    if not path.exists():
        return None, 0
    try:
        arrays = load_npz(path)
        if stored_identity(arrays) != identity:
            raise CorruptFile(path, "it records another entry or config")
        result = result_from_arrays(arrays, ensemble)
        group = lambda prefix: {k[len(prefix):]: jnp.asarray(v)  # noqa: E731
                                for k, v in arrays.items() if k.startswith(prefix)}
        train_state = None
        if run.kind not in FLOW_KINDS:
            params = eqx.filter(ensemble.models, eqx.is_inexact_array)
            template = TrainState(
                jax.eval_shape(jax.vmap(_entry_optimizer(run).init), params), 0, 0)
            leaves = [jnp.asarray(arrays[f"train_state/{i}"])
                      for i in range(sum(k.startswith("train_state/") for k in arrays))]
            treedef = jax.tree_util.tree_structure(template)
            if treedef.num_leaves != len(leaves):
                raise CorruptFile(path, "its optimizer state has another structure")
            train_state = jax.tree_util.tree_unflatten(treedef, leaves)
        velocity = None
        if run.kind in PHASE_FLOW_KINDS:  # v at `final`, stored as the parameters are
            velocity = final_ensemble({"final" + k[len("velocity"):]: v for k, v in
                                       arrays.items() if k.startswith("velocity")}, ensemble)
        t_final = arrays.get("partial/t_final")
        result = dataclasses.replace(
            result, reference=(group("reference/values/"), group("reference/scales/")),
            t_final=None if t_final is None else jnp.asarray(t_final),
            train_state=train_state, velocity=velocity)
        return result, int(arrays["partial/segment"])
    except (CorruptFile, KeyError, ValueError, OSError) as e:
        log(f"{path} is not continued ({e}); the entry starts again")
        path.unlink(missing_ok=True)
        return None, 0


def execute_segments(run, objective: Objective, ensemble: Ensemble, *, key, progress: bool,
                     laws, partial: pathlib.Path, identity, log, resume: bool,
                     observables=()) -> Result:
    """`execute` in the entry's `checkpoints` segments, saving the run so far to `partial`
    after each and, with `resume` (the folder holds this config's run), continuing from it
    when it is there: a run stopped part-way (killed, out of time) loses at most one
    segment."""
    n = _get(run, "checkpoints", 1)
    if n == 1:
        return execute(run, objective, ensemble, key=key, progress=progress, laws=laws,
                       observables=observables)
    result, done = (_load_partial(partial, run, ensemble, identity, log) if resume
                    else (None, 0))
    if done:
        log(f"  continuing from checkpoint {done}/{n} (t = {float(result.t[-1]):g})")
    for k in range(done + 1, n + 1):
        check_interrupted()
        result = jax.block_until_ready(execute(
            run, objective, ensemble, key=key, progress=progress, laws=laws, segment=(k, n),
            resume=result, observables=observables))
        if k < n:
            save_npz(partial, _partial_arrays(result, laws, k, identity))
    return result


@functools.lru_cache(maxsize=8)
def _sweep_optimizer(kind: str):
    # One object per kind: every sweep chunk then reuses the same compiled program, with the
    # actual values supplied per member through `hyperparams`.
    return optimizer(kind, lr=1.0, momentum=0.0, weight_decay=0.0)


def execute_with(run, objective: Objective, ensemble: Ensemble, *, laws, hyperparams,
                 key, observables=()) -> Result:
    """A `[[dynamics]]` entry with per-member hyperparameters (sweeps). Flows take their
    traced scalars (t1, rtol, atol, weight decay, lr, momentum) from `run`: every value reuses
    one compiled solve."""
    if run.kind in FLOW_KINDS:
        return execute(run, objective, ensemble, key=key, progress=False, laws=laws,
                       observables=observables)
    kind = "gd" if run.kind == "sgd" else run.kind
    size = len(ensemble)
    defaults = {"learning_rate": run.lr, "weight_decay": run.weight_decay}
    if kind != "adam":  # Adam injects no momentum (its β₁ is fixed)
        defaults["momentum"] = run.get("momentum", 0.0)
    full = {k: hyperparams.get(k, jnp.full((size,), v)) for k, v in defaults.items()}
    return train(objective, ensemble, _sweep_optimizer(kind), run.steps,
                 batch_size=run.get("batch_size") or None, key=key, laws=laws,
                 n_save=default_n_save(run), divergence=run.divergence, hyperparams=full,
                 stop_at_loss=_get(run, "stop_at_loss"), observables=observables)


_atomic_write = atomic_write  # the name `_sweep` and older code import


def _get(obj, name, default=None):
    """A field of a config entry, whether a dict or a typed object."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def config_dict(config) -> dict:
    """The resolved config as strict-JSON-ready Python (what `run.json`/`sweep.json` hold)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else config.model_dump(mode="json")
    return json.loads(strict_json(raw))


def result_arrays(result: Result, laws=None, *, final: bool = True) -> dict[str, np.ndarray]:
    """Flat name → numpy array view of a result, as stored in the npz files: `t`, `loss`,
    `status`, `num_steps`; per law `condition/`, `drift/`, `max_drift/`, `values/` and
    `relative/` (whether the drift is relative to the law's scale); a flow's `solver` and
    `batch_size`; with `final`, the final parameters as `final/<path>` (leading axis: member;
    see `final_ensemble`). The keys in `SHARED` hold no member axis."""
    arrays = {"t": result.t, "loss": result.loss, "status": result.status,
              "num_steps": result.num_steps}
    if result.solver is not None:
        arrays["solver"] = np.asarray(result.solver)
    if result.batch_size is not None:
        arrays["batch_size"] = np.asarray(result.batch_size)
    relative = {law.name: getattr(law, "relative", True) for law in laws or ()}
    for name in result.drift:
        arrays[f"condition/{name}"] = result.condition[name]
        arrays[f"drift/{name}"] = result.drift[name]
        arrays[f"max_drift/{name}"] = result.max_drift[name]
        if name in result.values:  # kept at every save only on request (`values="all"`)
            arrays[f"values/{name}"] = result.values[name]
        if name in result.final_values:
            arrays[f"final_values/{name}"] = result.final_values[name]
        if name in relative:
            arrays[f"relative/{name}"] = np.asarray(relative[name])
    for name, value in result.observables.items():
        arrays[f"observables/{name}"] = value
    if final and result.final is not None:
        params = eqx.filter(result.final.models, eqx.is_inexact_array)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            arrays[f"final{jax.tree_util.keystr(path)}"] = leaf
    return {k: np.asarray(v) for k, v in arrays.items()}


# result_arrays' keys without a member axis (besides relative/<law>)
SHARED = ("t", "solver", "batch_size")


def final_ensemble(arrays: dict[str, np.ndarray], template: Ensemble) -> Ensemble:
    """The ensemble at the end of a stored run: `template` (same architecture and size, e.g.
    from `build(config)`) with the stored `final/<path>` parameters in place, so a run can be
    continued or analysed without rerunning."""
    params, static = eqx.partition(template.models, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    stored = []
    for path, leaf in leaves:
        key = f"final{jax.tree_util.keystr(path)}"
        if key not in arrays or arrays[key].shape != leaf.shape:
            raise ValueError(f"`arrays` has no final parameter {key!r} of shape {leaf.shape}; "
                             "the file comes from another model.")
        stored.append(jnp.asarray(arrays[key]))
    return Ensemble(eqx.combine(jax.tree_util.tree_unflatten(treedef, stored), static),
                    template.size)


def result_from_arrays(arrays: dict[str, np.ndarray], template: Ensemble | None = None) -> Result:
    """The `Result` stored by `result_arrays` (its `final` needs `template`, else None)."""
    def group(prefix):
        return {k[len(prefix):]: arrays[k] for k in arrays if k.startswith(prefix)}

    final = None
    if template is not None and any(k.startswith("final") for k in arrays):
        final = final_ensemble(arrays, template)
    return Result(t=arrays["t"], loss=arrays["loss"], values=group("values/"),
                  drift=group("drift/"), max_drift=group("max_drift/"),
                  condition=group("condition/"), final=final, status=arrays["status"],
                  num_steps=arrays["num_steps"], final_values=group("final_values/"),
                  observables=group("observables/"),
                  solver=str(arrays["solver"]) if "solver" in arrays else None,
                  batch_size=int(arrays["batch_size"]) if "batch_size" in arrays else None)


def _mechanics_arrays(mechanics: MechanicsResult) -> dict[str, np.ndarray]:
    arrays = {"mechanics/t": np.asarray(mechanics.t)}
    for part in ("simulated", "discrete", "continuous", "scale"):
        for name, value in getattr(mechanics, part).items():
            arrays[f"mechanics/{part}/{name}"] = np.asarray(value)
    return arrays


def _mechanics_from_arrays(arrays) -> MechanicsResult | None:
    if "mechanics/t" not in arrays:
        return None
    parts = {part: {k.split("/", 2)[2]: arrays[k] for k in arrays
                    if k.startswith(f"mechanics/{part}/")}
             for part in ("simulated", "discrete", "continuous", "scale")}
    return MechanicsResult(t=arrays["mechanics/t"], **parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


MANIFEST = "run.json"
_OUR_FILES = (MANIFEST, "summary.json", "plot.png", "landscape.png", "mechanics.png")
_ENTRY_FILE = re.compile(r"^\d+-[a-z0-9.-]*\.npz$")


_REPLACE = "pass `--force` to replace the results in that folder, or choose another `--out`"


def _previous(out: pathlib.Path) -> tuple[dict | None, set[str]]:
    """The config recorded in `out` (None: no manifest) and the entry files it lists.
    **Raises:** `CorruptFile` if the manifest is damaged (a rerun would not repair it)."""
    path = out / MANIFEST
    if not path.exists():
        path = out / "summary.json"  # a folder written before run.json existed
        if not path.exists():
            return None, set()
    manifest = read_json(path, fix=_REPLACE)
    listed = manifest.get("jobs" if path.name == MANIFEST else "runs")
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(listed, list) or not all(
            isinstance(job, dict) for job in listed):
        raise CorruptFile(path, "not a manifest of conservation", fix=_REPLACE)
    # Only plain names of ours: a damaged manifest must not make us delete anything else.
    files = {job.get("file") for job in listed}
    return config, {f for f in files if isinstance(f, str) and _ENTRY_FILE.match(f)}


def _claim_folder(out: pathlib.Path, config_json: dict, files: set[str], *, force: bool,
                  log: Callable[[str], None]) -> tuple[bool, set[str]]:
    """Check, before any compute, that `out` may hold the run of `config_json`, whose entry
    files are `files`. Returns (resume, the entry files the folder's manifest lists).

    A folder with the same config resumes. A different one (or a damaged manifest) is refused
    unless `force`, which deletes the files the old manifest lists (never others). A file with
    one of our names in a folder without our manifest is someone else's: refused unless
    `force`, and then replaced with a log line naming it (never deleted silently)."""
    if (out / "sweep.json").exists():
        raise UserError(f"{out} holds a sweep (sweep.json); choose another `--out` folder.")
    try:
        previous, listed = _previous(out)
    except CorruptFile as e:
        if not force:
            raise
        log(f"--force: {e.path} is corrupted ({e.reason}); replacing the results in {out}")
        previous, listed = None, set()
    if previous is not None and previous == config_json:
        foreign = sorted(f for f in files if f not in listed and (out / f).exists())
        _refuse_foreign(out, foreign, force=force, log=log)
        return True, listed
    if previous is not None:
        if not force:
            raise UserError(f"{out} holds results of a different config; choose another `--out` "
                            "folder, or pass `--force` to replace them.")
        log(f"--force: replacing the results in {out}")
        for name in sorted(listed | set(_OUR_FILES)):
            (out / name).unlink(missing_ok=True)
    foreign = sorted(f for f in files | set(_OUR_FILES) if (out / f).exists())
    _refuse_foreign(out, foreign, force=force, log=log)
    return False, set()


def _refuse_foreign(out, names, *, force, log) -> None:
    """Files named like ours that our manifest does not list: never overwritten unasked."""
    if not names:
        return
    why = (f"{out}/{MANIFEST} does not list it" if (out / MANIFEST).exists() else
           f"{out} holds no run.json of conservation")
    if not force:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise UserError(f"{out / names[0]}{more} was not written by this run of conservation "
                        f"({why}); choose another `--out`, or pass `--force` to replace it.")
    for name in names:
        log(f"--force: replacing {out / name}, not listed by a run.json of conservation")


def _entry_identity(config_json: dict, index: int, label: str) -> dict:
    """What identifies entry `index` of a run: its config's fingerprint, index and label."""
    return {"config": fingerprint(config_json), "entry": index, "label": label}


def _load_finished(path: pathlib.Path, template: Ensemble, expected: dict, log) -> dict | None:
    """The arrays of a finished entry, or None if absent, corrupted or recording another
    entry (a file copied over it): then it is recomputed, with a log line."""
    if not path.exists():
        return None
    try:
        arrays = load_npz(path)
        result_from_arrays(arrays, template)
    except (CorruptFile, KeyError, ValueError) as e:
        log(f"{path} cannot be read back ({e}); recomputing it")
        path.unlink(missing_ok=True)
        return None
    recorded = stored_identity(arrays)
    if recorded != expected:
        what = ("records no entry (written by an older version)" if recorded is None else
                f"holds entry {recorded.get('entry')} ({recorded.get('label')!r}) of "
                f"{'this' if recorded.get('config') == expected['config'] else 'another'} "
                "config")
        log(f"warning: {path} {what}, not entry {expected['entry']} ({expected['label']!r}); "
            "recomputing it")
        path.unlink(missing_ok=True)
        return None
    return arrays


def run_config(config: Config, *, out_dir: str | os.PathLike | None = None,
               progress: bool = True, log: Callable[[str], None] = print,
               force: bool = False) -> dict:
    """Run (or resume) every `[[dynamics]]` entry of `config`, writing results to `out_dir`.

    Writes `run.json` (the resolved config: a later run with the same config resumes, a
    different one is refused unless `force`), `<i>-<label>.npz` per entry (`result_arrays`,
    final parameters included), `summary.json` (strict JSON: per-entry statuses, per-law worst
    drifts, timings) and `plot.png`. Entries whose file exists and reads back are not
    recomputed; their summary and plots come from the stored arrays. The folder is locked for
    the whole call: a second process on it waits.

    **Returns:** the summary dictionary.
    """
    for note in config.ignored("run"):
        log(f"note: {note}")
    out = prepare_output(out_dir or config.output)
    with folder_lock(out, log=log):
        return _run_locked(config, out, progress=progress, log=log, force=force)


_REDRAW_SECONDS = 60.0  # between runs, figures are redrawn at most this often


def _run_locked(config, out, *, progress, log, force) -> dict:
    for orphan in remove_orphans(out):
        log(f"removed {orphan.name}, left by an interrupted write")
    start = time.perf_counter()
    config_json = config_dict(config)
    # The entry files follow from the config alone: claim the folder before building.
    labels = []
    for run in config.dynamics:
        variants = [""] if config.augmentation is None else (
            ["plain", "augmented"] if config.augmentation.compare else ["augmented"])
        labels += [f"{_get(run, 'label')} · {v}" if v else _get(run, "label") for v in variants]
    names = {f"{i}-{_slug(label)}.npz" for i, label in enumerate(labels)}
    ours, listed = _claim_folder(out, config_json, names, force=force, log=log)
    previous_runs = {}
    if ours and (out / "summary.json").exists():
        with contextlib.suppress(UserError, AttributeError, TypeError, KeyError):
            previous_runs = {r["label"]: r for r in read_json(out / "summary.json")["runs"]}
    ensemble, objectives, laws = build(config)
    # Second-order flows also monitor the phase-space laws the model declares (what they keep,
    # beside the gradient-flow laws they break).
    phase_laws = phase_space_laws(ensemble[0]) if config.laws.architecture else ()
    phased = any(_get(run, "kind") in PHASE_FLOW_KINDS for run in config.dynamics)
    monitored = laws + (phase_laws if phased else ())
    jobs = []
    for run in config.dynamics:
        for variant, objective in objectives.items():
            label = f"{_get(run, 'label')} · {variant}" if variant else _get(run, "label")
            jobs.append((run, variant, objective, label, f"{len(jobs)}-{_slug(label)}.npz"))
    manifest = {"config": config_json,
                "jobs": [{"label": job[3], "file": job[4]} for job in jobs]}
    files = {job[4] for job in jobs}
    assert files == names, (files, names)  # _claim_folder checked these very names
    for name in listed - files:  # ours (listed by our manifest), but stale
        (out / name).unlink(missing_ok=True)
        (out / (name[:-len(".npz")] + ".partial.npz")).unlink(missing_ok=True)
    if not ours or not (out / MANIFEST).exists():
        write_json(out / MANIFEST, manifest)
    summary = {
        "name": config.name,
        "config": config_json,
        "backend": jax.default_backend(),
        "moment_fast_path": all(o.moments is not None for o in objectives.values()),
        "laws": [law.name for law in monitored],
        "relative_drift": {law.name: getattr(law, "relative", True) for law in monitored},
        "build_seconds": time.perf_counter() - start,
        "runs": [],
    }
    if config.augmentation is not None:
        augmentation = augmentation_from_config(config)
        summary["symmetry_defect"] = {
            name or "plain": float(augmentation.defect(o.moments, ensemble[0]))
            for name, o in objectives.items() if o.moments is not None}
    finished, theory, step_times = [], [], {}
    batch_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    relative = summary["relative_drift"]
    drawn = time.perf_counter()  # when the figures were last drawn

    def write_figures():
        nonlocal drawn
        # Drawn when the runs end or one fails, and between runs only when the last drawing
        # is _REDRAW_SECONDS old: redrawing after every quick run cost as much as the
        # quickstart's runs themselves. Each run's data are saved as it ends, so a killed
        # process loses at most the figures, which a rerun draws without recomputing.
        drawn = time.perf_counter()
        if theory:
            atomic_write(out / "mechanics.png",
                         lambda f: plot_mechanics(theory, f, title=config.name))
        if finished:
            atomic_write(out / "plot.png", lambda f: plot_results(
                finished, f, title=config.name, relative=relative, step_times=step_times))

    try:
        for i, (run, variant, objective, label, filename) in enumerate(jobs):
            kind = _get(run, "kind")
            entry_laws = laws + (phase_laws if kind in PHASE_FLOW_KINDS else ())
            discrete = kind in ("gd", "sgd", "momentum", "adam")
            if discrete:
                step_times[label] = _get(run, "lr")
            check_interrupted()
            expected = _entry_identity(config_json, i, label)
            stored = _load_finished(out / filename, ensemble, expected, log) if ours else None
            if stored is not None:
                log(f"[{i + 1}/{len(jobs)}] {label}: finished earlier, skipped")
                result = result_from_arrays(stored, ensemble)
                mechanics = _mechanics_from_arrays(stored)
                seconds = previous_runs.get(label, {}).get("seconds")
            else:
                log(f"[{i + 1}/{len(jobs)}] {label}")
                t0 = time.perf_counter()
                partial = out / (filename[:-len(".npz")] + ".partial.npz")
                result = jax.block_until_ready(execute_segments(
                    run, objective, ensemble, key=batch_key, progress=progress, laws=entry_laws,
                    partial=partial, identity=expected, log=log, resume=ours,
                    observables=observables_from_config(config, objective)))
                mechanics = None
                if discrete and kind != "adam" and laws and all(
                        isinstance(law, AbstractMechanicsLaw) for law in laws):
                    mechanics = track_mechanics(
                        objective, ensemble, laws, lr=_get(run, "lr"), steps=_get(run, "steps"),
                        weight_decay=_get(run, "weight_decay"), momentum=_get(run, "momentum", 0.0),
                        batch_size=_get(run, "batch_size") or None, key=batch_key)
                seconds = time.perf_counter() - t0
                arrays = result_arrays(result, entry_laws)
                if mechanics is not None:
                    arrays |= _mechanics_arrays(mechanics)
                arrays["identity"] = identity_array(expected)  # a copied-over file is detected
                save_npz(out / filename, arrays)
                partial.unlink(missing_ok=True)  # the entry is whole: no segment to continue
                check_interrupted()  # a Ctrl-C swallowed during the run: stop now it is saved
            finished.append((label, result))
            entry = {"label": label, "kind": kind, "data": variant or "plain",
                     "file": filename, "seconds": seconds, **result.summary()}
            if mechanics is not None:
                theory.append((label, mechanics))
                entry["mechanics"] = {"discrete_identity_error": mechanics.discrete_error(),
                                      "continuous_theory_error": mechanics.continuous_error()}
            summary["runs"].append(entry)
            write_json(out / "summary.json", summary)
            if i + 1 < len(jobs) and time.perf_counter() - drawn > _REDRAW_SECONDS:
                write_figures()  # a long config: show what is done so far
    except BaseException:
        with contextlib.suppress(Exception):  # never hide the run's own error
            write_figures()
        raise
    write_figures()
    if _has_two_parameters(ensemble) and config.augmentation is not None:
        atomic_write(out / "landscape.png", lambda f: plot_landscapes(
            objectives, ensemble, finished, f, title=config.name))
    return summary


def count_table(config: Config, *, max_depth: int = 4, early_stop: bool = True) -> str:
    """`conservation count`: independent laws of the config's model (at its first
    initialisation) for all data, and for the config's augmented data class if any, with
    each count's verdict (proved / converged / not converged) and a warning when not
    converged. Raises ValueError for a negative `max_depth`."""
    ensemble, objectives, laws = build(config)
    model = ensemble[0]
    loss = next(iter(objectives.values())).loss
    shape = tuple(next(iter(objectives.values())).data.x.shape[1:])
    rows = [("data class", "loss", "parameters", "laws", "extra", "rank by depth", "gap",
             "verdict")]
    options = dict(input_shape=shape, max_depth=max_depth, early_stop=early_stop)
    plain = count_laws(model, loss, **options)
    classes = [("all data", plain)]
    if config.augmentation is not None:
        augmentation = augmentation_from_config(config)
        classes.append((f"augmented by {augmentation.name}",
                        count_laws(model, loss, augment=augmentation, **options)))
    for name, c in classes:
        rows.append((name, loss.name, str(c.parameters), str(c.laws),
                     str(c.laws - plain.laws), ",".join(map(str, c.rank_by_depth)),
                     f"{c.gap:.1e}", c.verdict))
    table = text_table(rows)
    shipped = ", ".join(law.name for law in laws) or "none"
    lines = [table, f"monitored laws of this config: {shipped}"]
    for name, c in classes:
        for (l, j, k), weight in zip(c.never_coactive, c.weight_names()):
            lines.append(f"{name}: {weight} conserved (hidden neurons {j} of layer {l} and {k} "
                         f"of layer {l + 1} never co-active)")
        if not c.converged:
            lines.append(f"warning: {name}: the rank was still rising when the depth/round budget "
                         f"({max_depth}) ran out; {c.laws} is an upper bound on the laws. "
                         "Raise --depth.")
    return "\n".join(lines)


def _has_two_parameters(ensemble) -> bool:
    return flat_parameters(ensemble[0]).size == 2


def format_summary(summary: dict, *, max_columns: int = 4) -> str:
    """A plain-text table of a run summary: per run its statuses, median final loss, steps,
    time, a flow's solver and the worst drift of EACH law over its successful members (one
    column per law; with more than `max_columns` laws, one row per run and law). Drifts marked
    "abs" are absolute (subspace, phase and ratio laws), the others relative to the law's
    scale."""
    relative = summary.get("relative_drift", {})
    laws = list(dict.fromkeys(n for run in summary["runs"] for n in run["max_drift"]))

    def header(name):
        return f"{name} {'rel' if relative.get(name, True) else 'abs'}"

    def drift(run, name):
        value = run["max_drift"].get(name)
        return "-" if value is None else f"{value:.2e}"

    flows = any("solver" in run for run in summary["runs"])
    noisy = [run["label"] for run in summary["runs"] if run.get("final_loss_below_accuracy")]

    def common(run):
        status = ", ".join(f"{n} {k}" for k, n in run["status"].items() if n)
        loss = run["final_loss_median"]
        seconds = run.get("seconds")
        mark = "*" if run["label"] in noisy else ""
        return (run["label"], status, "-" if loss is None else f"{loss:.3e}{mark}",
                str(run["num_steps_max"]), "-" if seconds is None else f"{seconds:.2f}",
                *((run.get("solver", "-"),) if flows else ()))

    head = ("run", "status", "final loss", "steps", "time [s]", *(("solver",) if flows else ()))
    if len(laws) <= max_columns:
        rows = [head + tuple(f"max drift {header(n)}" for n in laws)]
        rows += [common(run) + tuple(drift(run, n) for n in laws) for run in summary["runs"]]
    else:
        rows = [head + ("law", "max drift")]
        for run in summary["runs"]:
            first = common(run)
            for j, name in enumerate(n for n in laws if n in run["max_drift"]):
                rows.append((first if j == 0 else ("",) * len(first))
                            + (header(name), drift(run, name)))
    return text_table(rows) + (_BELOW_ACCURACY_NOTE if noisy else "")


# `Result.summary()["final_loss_below_accuracy"]` / `monitor.below_accuracy`: the rule.
_BELOW_ACCURACY_NOTE = (
    "\n* some members' final loss is below 1e-14 × their initial loss, the accuracy every "
    "objective guarantees in float64: those digits are round-off noise (see "
    "conservation._dynamics.monitor.below_accuracy)")


