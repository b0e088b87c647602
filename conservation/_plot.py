"""Plots of runs: loss and per-law drift against time, one colour per run."""

import math
import warnings

import matplotlib


matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np


_FLOOR = 1e-17  # drifts below double-precision resolution are drawn at this level


def plot_results(results, file, *, title: str = "", max_laws: int = 5) -> None:
    """Draw `results` = [(label, Result), …] into `file` (a path or binary file) as PNG.

    Panels: the loss, then the relative drift of each law (log scale; the median over the
    ensemble as a thick line, every member as a thin one). Laws beyond `max_laws` are merged
    into one panel showing their worst drift.
    """
    names = []
    for _, result in results:
        names += [n for n in result.drift if n not in names]
    shown = names if len(names) <= max_laws else names[: max_laws - 1] + ["other laws"]
    n_panels = 1 + len(shown)
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, result) in enumerate(results):
        colour = colours[i % len(colours)]
        t = np.asarray(result.t)
        _draw(axes[0], t, np.asarray(result.loss), colour, label)
        for ax, name in zip(axes[1:], shown):
            if name == "other laws":
                rest = [np.asarray(result.drift[n]) for n in names[max_laws - 1:]
                        if n in result.drift]
                curves = np.max(np.stack(rest), axis=0) if rest else None
            else:
                curves = np.asarray(result.drift[name]) if name in result.drift else None
            if curves is not None:
                _draw(ax, t, np.maximum(curves, _FLOOR), colour, label)
    axes[0].set_ylabel("loss")
    for ax, name in zip(axes[1:], shown):
        ax.set_ylabel(f"relative drift: {name}")
    for ax in axes[:n_panels]:
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    for ax in axes[n_panels:]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def _draw(ax, t, curves, colour, label):
    curves = np.where(np.isfinite(curves) & (curves > 0), curves, np.nan)
    for c in curves:
        ax.plot(t, c, color=colour, lw=0.5, alpha=0.35)
    with warnings.catch_warnings():  # columns where every member stopped are all-NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(curves, axis=0) if np.isfinite(curves).any() else None
    if median is not None:
        ax.plot(t, median, color=colour, lw=2.0, label=label)


def plot_landscapes(objectives, ensemble, results, file, *, title: str = "",
                    grid: int = 161) -> None:
    """Loss landscapes of a two-parameter model, one panel per objective (e.g. plain and
    augmented: augmentation by a design group makes the landscape rotationally symmetric),
    with every member's start (o) and end (x) of each run drawn on its objective's panel."""
    import equinox as eqx
    import jax
    import jax.flatten_util as jfu
    import jax.numpy as jnp

    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    starts = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)
    _, unravel = jfu.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], params))
    ends = {label: jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(
        eqx.partition(result.final.models, eqx.is_inexact_array)[0])
        for label, result in results}
    points = np.concatenate([np.asarray(starts)] + [np.asarray(e) for e in ends.values()])
    finite = points[np.all(np.isfinite(points), axis=1)]
    radius = 1.2 * float(np.max(np.abs(finite))) if finite.size else 2.0
    axis = np.linspace(-radius, radius, grid)
    mesh = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.0 * len(objectives), 4.4),
                             squeeze=False)
    surfaces = {}
    for name, objective in objectives.items():
        surface = jax.jit(jax.vmap(lambda v: objective(eqx.combine(unravel(v), static))))(
            jnp.asarray(mesh))
        surfaces[name] = np.asarray(surface).reshape(grid, grid)
    top = np.percentile(np.concatenate([s.ravel() for s in surfaces.values()]), 92)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, surface) in zip(axes[0], surfaces.items()):
        image = ax.contourf(axis, axis, np.minimum(surface, top), levels=30, cmap="viridis")
        ax.scatter(*np.asarray(starts).T, marker="o", facecolors="none", edgecolors="w", s=30)
        for i, (label, end) in enumerate(ends.items()):
            if label.endswith(name) or not name:
                ax.scatter(*np.asarray(end).T, marker="x", color=colours[i % len(colours)],
                           s=30, label=label)
        ax.set_title(f"loss landscape: {name or 'data'}")
        ax.set_xlabel("θ₁")
        ax.set_ylabel("θ₂")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower left")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def plot_mechanics(entries, file, *, title: str = "", components: int = 3) -> None:
    """Kunin-style figure: per run (row) and law (column), the simulated law of the first
    member (colour, a few components) against the continuous-time theory (black dashed) and
    the exact discrete identity (dots, sparse)."""
    names = list(entries[0][1].simulated)
    fig, axes = plt.subplots(len(entries), len(names),
                             figsize=(4.4 * len(names), 3.0 * len(entries)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (label, mechanics) in zip(axes, entries):
        t = np.asarray(mechanics.t)
        every = max(1, len(t) // 25)
        for ax, name in zip(row, names):
            sim = np.asarray(mechanics.simulated[name][0])
            cont = np.asarray(mechanics.continuous[name][0])
            disc = np.asarray(mechanics.discrete[name][0])
            for c in range(min(components, sim.shape[1])):
                colour = colours[c % len(colours)]
                ax.plot(t, sim[:, c], color=colour, lw=1.6)
                ax.plot(t, cont[:, c], "k--", lw=1.0)
                ax.plot(t[::every], disc[::every, c], ".", color=colour, ms=3)
            ax.set_title(f"{name} — {label}", fontsize=8)
            ax.set_xlabel("t = η·step")
            ax.grid(alpha=0.3)
    axes[0][0].plot([], [], "k--", label="continuous theory")
    axes[0][0].plot([], [], "k.", label="exact discrete identity")
    axes[0][0].plot([], [], "k-", label="simulated")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=100)
    plt.close(fig)


def plot_sweep(rows, manifest, file) -> None:
    """Final loss and each law's worst drift against every numeric sweep axis (one dot per
    finished point; log scales)."""
    numeric = {k: v for k, v in manifest["config"]["sweep"]["axes"].items()
               if all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)}
    axes_names = list(numeric) or ["point"]  # categorical axes (loss, group, solver) skipped
    done = [r for r in rows if r["status"] != "missing"]
    metrics = ["final_loss"] + [k for k in done[0] if k.startswith("max_drift[")]
    fig, axes = plt.subplots(len(metrics), len(axes_names),
                             figsize=(4.2 * len(axes_names), 3.0 * len(metrics)), squeeze=False)
    for row_axes, metric in zip(axes, metrics):
        for ax, name in zip(row_axes, axes_names):
            x = np.array([r[name] for r in done], float)
            y = np.array([r.get(metric, np.nan) for r in done], float)
            ok = np.isfinite(y) & (y > 0)
            ax.scatter(x[ok], y[ok], s=12)
            ax.set_yscale("log")
            if name in ("lr", "weight_decay", "init_scale", "rtol", "atol") and np.all(x > 0):
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=100)
    plt.close(fig)
