"""Run a validated config: build models and data, run every [[dynamics]] entry, write results.

Each run's arrays are written (atomically) as soon as it finishes, and `summary.json` and
`plot.png` are refreshed after every run, so a crash or interrupt loses at most the run in
progress.
"""

import json
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._attention import LightningAttention
from ._config import Config
from ._data import Dataset, gaussian_inputs, teacher_dataset, whiten
from ._flow import gradient_flow
from ._linear import DeepLinear
from ._losses import LOSSES
from ._model import Ensemble
from ._monitor import Result
from ._objective import Objective, make_objective
from ._plot import plot_results
from ._train import optimizer, train


def model_factory(spec: dict) -> Callable:
    """`key -> model` for a validated `[model]` table (with `init_scale` as a keyword)."""
    kind = spec["kind"]
    if kind == "deep_linear":
        return lambda key, scale: DeepLinear.random(spec["widths"], key=key, init_scale=scale)
    if kind == "polynomial":
        from ._polynomial import PolynomialNet

        return lambda key, scale: PolynomialNet.random(
            spec["widths"], key=key, activation=spec["activation"], init_scale=scale)
    return lambda key, scale: LightningAttention.random(
        spec["dim"], key=key, key_dim=spec["key_dim"], value_dim=spec["value_dim"],
        heads=spec["heads"], out_dim=spec["out_dim"] or None, init_scale=scale,
        decay=spec["decay"], causal=spec["causal"], form=spec["form"],
        block_size=spec["block_size"])


def build(config: Config) -> tuple[Ensemble, Objective]:
    """The ensemble of initial models and the objective described by `config`."""
    k_model, k_teacher, k_x, k_y = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    make = model_factory(config.model)
    ensemble = Ensemble.init(lambda k: make(k, config.model["init_scale"]), k_model,
                             config.ensemble["size"])
    data_spec = config.data
    if config.model["kind"] == "lightning_attention":
        shape = (data_spec["tokens"], config.model["dim"])
    else:
        shape = (config.model["widths"][0],)
    x = gaussian_inputs(k_x, data_spec["n"], shape)
    if data_spec["inputs"] == "whitened":
        x = whiten(x)
    x = data_spec["input_scale"] * x
    teacher = make(k_teacher, data_spec["teacher_scale"])
    classify = config.loss["kind"] == "cross_entropy"
    if data_spec["targets"] == "teacher":
        data = teacher_dataset(teacher, x, noise=data_spec["noise"], key=k_y)
        y = data.y
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
    return ensemble, make_objective(loss, data, ensemble, moments=config.loss["moments"])


def execute(run: dict, objective: Objective, ensemble: Ensemble, *, key, progress: bool
            ) -> Result:
    """One validated `[[dynamics]]` entry."""
    if run["kind"] == "flow":
        return gradient_flow(
            objective, ensemble, run["t1"], n_save=run["n_save"], solver=run["solver"],
            rtol=run["rtol"], atol=run["atol"] or run["rtol"], max_steps=run["max_steps"],
            progress=progress, divergence=run["divergence"])
    kind = "gd" if run["kind"] == "sgd" else run["kind"]
    optim = optimizer(kind, lr=run["lr"], momentum=run.get("momentum", 0.0),
                      weight_decay=run["weight_decay"])
    return train(
        objective, ensemble, optim, run["steps"], batch_size=run.get("batch_size") or None,
        key=key, n_save=run["n_save"], step_time=run["lr"], progress=progress,
        divergence=run["divergence"])


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
    ensemble, objective = build(config)
    summary = {
        "name": config.name,
        "config": config.to_dict(),
        "backend": jax.default_backend(),
        "moment_fast_path": objective.moments is not None,
        "build_seconds": time.perf_counter() - start,
        "runs": [],
    }
    finished = []
    batch_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    for i, run in enumerate(config.dynamics):
        log(f"[{i + 1}/{len(config.dynamics)}] {run['label']}")
        start = time.perf_counter()
        result = jax.block_until_ready(
            execute(run, objective, ensemble, key=batch_key, progress=progress))
        seconds = time.perf_counter() - start
        filename = f"{i}-{_slug(run['label'])}.npz"
        _atomic_write(out / filename, lambda f: np.savez_compressed(f, **result_arrays(result)))
        finished.append((run["label"], result))
        summary["runs"].append({"label": run["label"], "kind": run["kind"], "file": filename,
                                "seconds": seconds, **result.summary()})
        _atomic_write(out / "summary.json",
                      lambda f: f.write(json.dumps(summary, indent=2).encode()))
        _atomic_write(out / "plot.png",
                      lambda f: plot_results(finished, f, title=config.name))
    return summary


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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
