"""Run a validated config: build models and data, run every [[dynamics]] entry, write results.

Each run's arrays are written (atomically) as soon as it finishes, and `summary.json` and
`plot.png` are refreshed after every run, so a crash or interrupt loses at most the run in
progress.
"""

import functools
import json
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np

from ._attention import LightningAttention
from ._augmentation import Augmentation
from ._config import Config, ConfigError, input_dim
from ._counting import count_laws
from ._data import Dataset, gaussian_inputs, teacher_dataset, whiten
from ._flow import GradientField, ModifiedGradientField, gradient_flow
from ._groups import GROUPS, AbstractGroup, OrthogonalGroup, PlanarRotations
from ._linear import DeepLinear
from ._mechanics import track_mechanics
from ._mlp import MLP, AbstractMechanicsLaw, mechanics_laws
from ._losses import LOSSES
from ._model import Ensemble, flat_parameters
from ._monitor import Result
from ._objective import Objective, make_objective
from ._plot import plot_landscapes, plot_mechanics, plot_results
from ._polynomial import Neuron, PolynomialNet
from ._symmetry_laws import (
    AttentionRangeLaw,
    CyclicRatioLaw,
    FourierPhaseLaw,
    RowSpaceLaw,
    augmentation_laws,
)
from ._train import optimizer, train


def model_factory(spec: dict) -> Callable:
    """`(key, init_scale) -> model` for a validated `[model]` table."""
    kind = spec["kind"]
    if kind == "deep_linear":
        return lambda key, scale: DeepLinear.random(spec["widths"], key=key, init_scale=scale)
    if kind == "polynomial":
        return lambda key, scale: PolynomialNet.random(
            spec["widths"], key=key, activation=spec["activation"], init_scale=scale)
    if kind == "mlp":
        return lambda key, scale: MLP.random(
            spec["widths"], key=key, activation=spec["activation"],
            normalize=spec["normalize"], init_scale=scale)
    if kind == "neuron":
        return lambda key, scale: Neuron.random(
            spec["dim"], key=key, activation=spec["activation"], init_scale=scale)
    return lambda key, scale: LightningAttention.random(
        spec["dim"], key=key, key_dim=spec["key_dim"], value_dim=spec["value_dim"],
        heads=spec["heads"], out_dim=spec["out_dim"] or None, init_scale=scale,
        decay=spec["decay"], causal=spec["causal"], form=spec["form"],
        block_size=spec["block_size"])


_CANDIDATE_LAWS = {  # `[laws] extra` names → laws (config.LAW_NAMES)
    "rowspace": RowSpaceLaw(None),
    "range_qkv": AttentionRangeLaw(),
    "ratio_c3": CyclicRatioLaw(),
    "phase1": FourierPhaseLaw(1),
    "phase2": FourierPhaseLaw(2),
    "phase3": FourierPhaseLaw(3),
}


def group_from_spec(spec: dict, dim: int) -> AbstractGroup:
    """The group of a validated `[augmentation]` table acting on R^`dim`."""
    name = spec["group"]
    if name == "rotations":
        return PlanarRotations(spec["order"])
    if name in ("octahedral", "icosahedral"):
        return GROUPS[name]()
    if name == "orthogonal":
        return OrthogonalGroup(dim, samples=spec["samples"] or None)
    return GROUPS[name](dim)


def augmentation_from_config(config: Config) -> Augmentation:
    spec = config.augmentation
    return Augmentation(group_from_spec(spec, input_dim(config.model)), spec["equivariant"])


def _initial_ensemble(config: Config, make, key) -> Ensemble:
    ensemble = Ensemble.init(lambda k: make(k, config.model["init_scale"]), key,
                             config.ensemble["size"])
    if config.ensemble["init"] is None:
        return ensemble
    params, static = eqx.partition(ensemble[0], eqx.is_inexact_array)
    flat, unravel = jfu.ravel_pytree(params)
    rows = config.ensemble["init"]
    if len(rows[0]) != flat.size:
        raise ConfigError(f"`ensemble.init` rows have {len(rows[0])} entries but the model has "
                          f"{flat.size} parameters.")
    return Ensemble.stack([eqx.combine(unravel(jnp.asarray(r, flat.dtype)), static)
                           for r in rows])


def build(config: Config) -> tuple[Ensemble, dict[str, Objective], tuple]:
    """The initial ensemble, the objectives (`{"": plain}` or `{"plain": …, "augmented": …}`)
    and the laws to monitor (architecture + augmentation-induced) described by `config`."""
    k_model, k_teacher, k_x, k_y = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    make = model_factory(config.model)
    ensemble = _initial_ensemble(config, make, k_model)
    data_spec = config.data
    if config.model["kind"] == "lightning_attention":
        shape = (data_spec["tokens"], config.model["dim"])
    else:
        shape = (input_dim(config.model),)
    if data_spec["inputs"] == "explicit":
        x = jnp.asarray(data_spec["x"])
    else:
        x = gaussian_inputs(k_x, data_spec["n"], shape)
        if data_spec["inputs"] == "whitened":
            x = whiten(x)
    x = data_spec["input_scale"] * x
    teacher = make(k_teacher, data_spec["teacher_scale"])
    classify = config.loss["kind"] == "cross_entropy"
    if data_spec["targets"] == "explicit":
        y = jnp.asarray(data_spec["y"])
    elif data_spec["targets"] == "teacher":
        y = teacher_dataset(teacher, x, noise=data_spec["noise"], key=k_y).y
        if classify:  # class probabilities of the teacher's logits
            y = jax.nn.sigmoid(y) if y.shape[-1] == 1 else jax.nn.softmax(y, axis=-1)
    else:
        out_shape = jax.eval_shape(teacher, x[0]).shape
        y = jax.random.normal(k_y, (data_spec["n"], *out_shape))
        if classify:
            y = ((y > 0).astype(float) if out_shape[-1] == 1 else
                 jax.nn.one_hot(jnp.argmax(y, -1), out_shape[-1]))
    data = Dataset(x, y)
    loss = LOSSES[config.loss["kind"]]()
    plain = make_objective(loss, data, ensemble, moments=config.loss["moments"])
    own = (mechanics_laws(ensemble[0], loss) if isinstance(ensemble[0], MLP)
           else ensemble[0].laws())
    laws = (own if config.laws["architecture"] else ()) + tuple(
        _CANDIDATE_LAWS[name] for name in config.laws["extra"])
    spec = config.augmentation
    if spec is None:
        return ensemble, {"": plain}, laws
    augmentation = augmentation_from_config(config)
    if spec["mode"] == "orbit":
        augmented = make_objective(loss, augmentation.apply(data), ensemble,
                                   moments=config.loss["moments"])
    else:
        augmented = make_objective(loss, data, ensemble, moments=config.loss["moments"],
                                   augment=augmentation)
    if config.laws["augmentation"]:
        names = {law.name for law in laws}
        laws += tuple(law for law in augmentation_laws(ensemble[0], augmentation)
                      if law.name not in names)
    objectives = {"augmented": augmented}
    if spec["compare"]:
        objectives = {"plain": plain} | objectives
    return ensemble, objectives, laws


def execute(run: dict, objective: Objective, ensemble: Ensemble, *, key, progress: bool,
            laws=None) -> Result:
    """One validated `[[dynamics]]` entry."""
    if run["kind"] in ("flow", "modified_flow"):
        field = (GradientField(run["weight_decay"]) if run["kind"] == "flow" else
                 ModifiedGradientField(run["lr"], run["momentum"], run["weight_decay"]))
        return gradient_flow(
            objective, ensemble, run["t1"], n_save=run["n_save"], solver=run["solver"],
            rtol=run["rtol"], atol=run["atol"] or run["rtol"], max_steps=run["max_steps"],
            laws=laws, progress=progress, divergence=run["divergence"], field=field)
    kind = "gd" if run["kind"] == "sgd" else run["kind"]
    optim = optimizer(kind, lr=run["lr"], momentum=run.get("momentum", 0.0),
                      weight_decay=run["weight_decay"])
    return train(
        objective, ensemble, optim, run["steps"], batch_size=run.get("batch_size") or None,
        key=key, laws=laws, n_save=run["n_save"], step_time=run["lr"], progress=progress,
        divergence=run["divergence"])


@functools.lru_cache(maxsize=8)
def _sweep_optimizer(kind: str):
    # One object per kind: every sweep chunk then reuses the same compiled program, with the
    # actual values supplied per member through `hyperparams`.
    return optimizer(kind, lr=1.0, momentum=0.0, weight_decay=0.0)


def execute_with(run: dict, objective: Objective, ensemble: Ensemble, *, laws, hyperparams,
                 key) -> Result:
    """A discrete `[[dynamics]]` entry with per-member hyperparameters (sweeps)."""
    kind = "gd" if run["kind"] == "sgd" else run["kind"]
    size = len(ensemble)
    defaults = {"learning_rate": run["lr"], "weight_decay": run["weight_decay"],
                "momentum": run.get("momentum", 0.0)}
    full = {k: hyperparams.get(k, jnp.full((size,), v)) for k, v in defaults.items()}
    return train(objective, ensemble, _sweep_optimizer(kind), run["steps"],
                 batch_size=run.get("batch_size") or None, key=key, laws=laws,
                 n_save=run["n_save"], divergence=run["divergence"], hyperparams=full)


def _atomic_write(path: pathlib.Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def result_arrays(result: Result) -> dict[str, np.ndarray]:
    """Flat name → numpy array view of a result, as stored in the npz files."""
    arrays = {"t": result.t, "loss": result.loss, "status": result.status,
              "num_steps": result.num_steps}
    for name in result.drift:
        arrays[f"condition/{name}"] = result.condition[name]
        arrays[f"drift/{name}"] = result.drift[name]
        arrays[f"max_drift/{name}"] = result.max_drift[name]
        arrays[f"values/{name}"] = result.values[name]
    return {k: np.asarray(v) for k, v in arrays.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def run_config(config: Config, *, out_dir: str | os.PathLike | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every `[[dynamics]]` entry of `config` and write results to `out_dir`.

    Writes `<i>-<label>.npz` per run (arrays of `result_arrays`), `summary.json` (resolved
    config, per-run statuses, worst drifts, timings) and `plot.png`.

    **Returns:** the summary dictionary.
    """
    out = pathlib.Path(out_dir or config.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ensemble, objectives, laws = build(config)
    summary = {
        "name": config.name,
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "moment_fast_path": all(o.moments is not None for o in objectives.values()),
        "laws": [law.name for law in laws],
        "build_seconds": time.perf_counter() - start,
        "runs": [],
    }
    if config.augmentation is not None:
        augmentation = augmentation_from_config(config)
        summary["symmetry_defect"] = {
            name or "plain": float(augmentation.defect(o.moments, ensemble[0]))
            for name, o in objectives.items() if o.moments is not None}
    finished, theory = [], []
    batch_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    jobs = [(run, variant, objective) for run in config.dynamics
            for variant, objective in objectives.items()]
    for i, (run, variant, objective) in enumerate(jobs):
        label = f"{run['label']} · {variant}" if variant else run["label"]
        log(f"[{i + 1}/{len(jobs)}] {label}")
        start = time.perf_counter()
        result = jax.block_until_ready(execute(run, objective, ensemble, key=batch_key,
                                               progress=progress, laws=laws))
        seconds = time.perf_counter() - start
        filename = f"{i}-{_slug(label)}.npz"
        _atomic_write(out / filename, lambda f: np.savez_compressed(f, **result_arrays(result)))
        finished.append((label, result))
        entry = {"label": label, "kind": run["kind"], "data": variant or "plain",
                 "file": filename, "seconds": seconds, **result.summary()}
        if run["kind"] in ("gd", "sgd", "momentum") and laws and all(
                isinstance(law, AbstractMechanicsLaw) for law in laws):
            mechanics = track_mechanics(
                objective, ensemble, laws, lr=run["lr"], steps=run["steps"],
                weight_decay=run["weight_decay"], momentum=run.get("momentum", 0.0),
                batch_size=run.get("batch_size") or None, key=batch_key)
            theory.append((label, mechanics))
            entry["mechanics"] = {"discrete_identity_error": mechanics.discrete_error(),
                                  "continuous_theory_error": mechanics.continuous_error()}
            _atomic_write(out / "mechanics.png",
                          lambda f: plot_mechanics(theory, f, title=config.name))
        summary["runs"].append(entry)
        _atomic_write(out / "summary.json",
                      lambda f: f.write(json.dumps(summary, indent=2).encode()))
        _atomic_write(out / "plot.png",
                      lambda f: plot_results(finished, f, title=config.name))
    if _has_two_parameters(ensemble) and config.augmentation is not None:
        _atomic_write(out / "landscape.png", lambda f: plot_landscapes(
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
    table = _text_table(rows)
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


def format_summary(summary: dict) -> str:
    """A plain-text table of a run summary (one row per run)."""
    rows = [("run", "status", "final loss", "worst drift", "steps", "time [s]")]
    for run in summary["runs"]:
        status = ", ".join(f"{n} {k}" for k, n in run["status"].items() if n)
        drifts = [d for d in run["max_drift"].values() if d is not None]
        worst = max(drifts) if drifts else None
        rows.append((
            run["label"], status,
            "-" if run["final_loss_median"] is None else f"{run['final_loss_median']:.3e}",
            "-" if worst is None else f"{worst:.2e}",
            str(run["num_steps_max"]), f"{run['seconds']:.2f}",
        ))
    return _text_table(rows)


def _text_table(rows) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
