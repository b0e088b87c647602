"""Plots of runs: loss and per-law drift, one row of panels per run (runs never overlap).

Each panel shows the ensemble mean over the members that succeeded (thick line, as in the
seed paper) with their min–max band; members that diverged or hit `max_steps` are left out of
both and marked × at the time they stopped (top edge), with their count in the legend.
"""

import math
import warnings

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import matplotlib.transforms as mtransforms
import numpy as np

_FLOOR = 1e-17  # drifts below double-precision resolution are drawn at this level
_STATUS = ("success", "max_steps", "diverged", "failed", "loss_increased")  # = STATUS_NAMES


def drift_label(relative: bool) -> str:
    return "relative drift" if relative else "absolute drift"


def plot_results(results, file, *, title: str = "", max_laws: int = 4,
                 relative: dict[str, bool] | None = None,
                 step_times: dict[str, float] | None = None, x: str = "auto") -> None:
    """Draw `results` = [(label, Result), …] into `file` (a path or binary file) as PNG.

    One row per run; columns: the loss, then each law's drift (log scales; laws beyond
    `max_laws` merged into one panel of their worst drift). `relative` maps law names to
    whether their drift is relative (default) or absolute, for the axis labels. `step_times`
    maps the labels of discrete runs to their step time η; with `x` = "auto" or "step" those
    runs are drawn against the optimizer step, with "time" against t = η·step.
    """
    if x not in ("auto", "step", "time"):
        raise ValueError(f"`x` must be 'auto', 'step' or 'time', got {x!r}.")
    relative = relative or {}
    step_times = step_times or {}
    names = []
    for _, result in results:
        names += [n for n in result.drift if n not in names]
    shown = names if len(names) <= max_laws else names[: max_laws - 1] + ["other laws"]
    cols, rows = 1 + len(shown), max(1, len(results))
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 2.5 * rows + 0.5),
                             squeeze=False, sharey="col")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (label, result) in enumerate(results):
        colour = colours[row % len(colours)]
        t = np.asarray(result.t, float)
        step_time = step_times.get(label)
        by_step = step_time is not None and x != "time"
        xs = t / step_time if by_step else t
        status = np.asarray(result.status).reshape(-1)
        loss = np.asarray(result.loss, float)
        stops = _stop_points(xs, loss, status)
        _panel(axes[row, 0], xs, loss, status, stops, colour, legend=True)
        axes[row, 0].set_ylabel("loss")
        axes[row, 0].set_title(label, fontsize=9, loc="left", color=colour)
        for col, name in enumerate(shown, start=1):
            ax = axes[row, col]
            if name == "other laws":
                rest = [np.asarray(result.drift[n]) for n in names[max_laws - 1:]
                        if n in result.drift]
                curves = np.max(np.stack(rest), axis=0) if rest else None
                kinds = {relative.get(n, True) for n in names[max_laws - 1:]}
                ylabel = (drift_label(kinds.pop()) if len(kinds) == 1 else "drift") + " (worst)"
            else:
                curves = np.asarray(result.drift[name]) if name in result.drift else None
                ylabel = drift_label(relative.get(name, True))
            if curves is None:
                ax.text(0.5, 0.5, "not monitored", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="0.5")
            else:
                # From the first save after the start: the drift at t = 0 is 0 by definition.
                _panel(ax, xs[1:], np.maximum(curves[:, 1:], _FLOOR), status, stops, colour)
            ax.set_ylabel(ylabel, fontsize=8)
            if row == 0:
                ax.set_title(name if name != "other laws" else
                             f"{len(names) - max_laws + 1} other laws", fontsize=9)
        for ax in axes[row]:
            ax.set_xlabel("step" if by_step else ("t = η·step" if step_time else "t"),
                          fontsize=8)
    for ax in axes.ravel():
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def _stop_points(xs, loss, status):
    """Per failed member: the x where it stopped (its last changing, finite save point)."""
    stops = []
    for member in np.flatnonzero(status != 0):
        values = loss[member]
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            j = max(int(bad[0]) - 1, 0)
        else:
            same = values == values[-1]
            j = len(values) - 1
            while j > 0 and same[j - 1]:
                j -= 1
        stops.append((xs[j], int(status[member])))
    return stops


def _panel(ax, xs, curves, status, stops, colour, *, legend=False):
    curves = np.where(np.isfinite(curves) & (curves > 0), curves, np.nan)
    ok = curves[status == 0]
    if ok.size:
        with warnings.catch_warnings():  # columns where no member has a value are all-NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(ok, axis=0)
            low, high = np.nanmin(ok, axis=0), np.nanmax(ok, axis=0)
        ax.fill_between(xs, low, high, color=colour, alpha=0.2, lw=0,
                        label=f"min–max of {len(ok)}" if len(ok) > 1 else None)
        ax.plot(xs, mean, color=colour, lw=1.8,
                label=f"mean of {len(ok)} succeeded" if len(ok) > 1 else "succeeded")
    else:
        ax.text(0.5, 0.5, "no member succeeded", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="C3")
    if stops:
        top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        counts = {}
        for x_stop, code in stops:
            counts[_STATUS[code]] = counts.get(_STATUS[code], 0) + 1
            ax.plot([x_stop], [0.94], "x", color="C3", ms=6, mew=1.5, transform=top,
                    clip_on=False)
        what = ", ".join(f"{n} {k}" for k, n in counts.items())
        ax.plot([], [], "x", color="C3", label=f"{what} (× where stopped; not in mean)")
    if legend:
        ax.legend(fontsize=6, loc="lower left")


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


def plot_sweep(rows, manifest, file, *, relative: dict[str, bool] | None = None) -> None:
    """Final loss and each law's worst drift against every numeric sweep axis: one dot per
    point that succeeded, the mean over the other axes as a line; points that diverged or hit
    `max_steps` are left out and marked × at the top edge (log scales, labels that never
    overlap)."""
    relative = relative or {}
    numeric = {k: v for k, v in manifest["config"]["sweep"]["axes"].items()
               if all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)}
    axes_names = list(numeric) or ["point"]  # categorical axes (loss, group, solver) skipped
    done = [r for r in rows if r["status"] not in ("missing", "corrupted")]
    metrics = ["final_loss"] + list(dict.fromkeys(
        k for r in done for k in r if k.startswith("max_drift[")))
    fig, axes = plt.subplots(len(metrics), len(axes_names),
                             figsize=(4.2 * len(axes_names), 3.0 * len(metrics)), squeeze=False)
    for row_axes, metric in zip(axes, metrics):
        for ax, name in zip(row_axes, axes_names):
            x = np.array([r[name] for r in done], float)
            y = np.array([np.nan if r.get(metric) is None else r[metric] for r in done], float)
            ok = np.array([r["status"] == "success" for r in done]) & np.isfinite(y) & (y > 0)
            ax.scatter(x[ok], y[ok], s=12, alpha=0.7)
            values = np.unique(x[ok])
            if values.size > 1:
                ax.plot(values, [np.mean(y[ok & (x == v)]) for v in values], lw=1.2,
                        color="C1", label="mean")
            failed = np.array([r["status"] != "success" for r in done])
            if failed.any():
                top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(x[failed], np.full(failed.sum(), 0.94), "x", color="C3",
                        transform=top, clip_on=False,
                        label=f"{failed.sum()} diverged/max_steps")
            ax.set_yscale("log")
            _decade_limits(ax, y[ok])
            if name in ("lr", "weight_decay", "init_scale", "rtol", "atol") and np.all(x > 0):
                ax.set_xscale("log")
                _value_ticks(ax, np.unique(x))
            elif all(float(v).is_integer() for v in x):  # seeds: integer ticks only
                ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
            ax.set_xlabel(name)
            if metric == "final_loss":
                ax.set_ylabel("final loss", fontsize=8)
            else:
                law = metric[len("max_drift["):-1]
                ax.set_ylabel(f"max {drift_label(relative.get(law, True))}\n{law}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if failed.any() or values.size > 1:
                ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=100)
    plt.close(fig)


def _decade_limits(ax, y):
    """Log y-limits spanning at least one power of ten, so only major (decade) ticks are
    labelled (minor labels within one decade overlap)."""
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_major_locator(mticker.LogLocator(numticks=6))
    if y.size:
        low, high = np.log10(np.min(y)), np.log10(np.max(y))
        ax.set_ylim(10 ** math.floor(low - 0.05), 10 ** math.ceil(high + 0.05))


def _value_ticks(ax, values):
    """Log x ticks at the swept values themselves when there are few, else at decades."""
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    if values.size <= 8:
        ax.xaxis.set_major_locator(mticker.FixedLocator(values))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
        ax.tick_params(axis="x", labelrotation=40)
    else:
        ax.xaxis.set_major_locator(mticker.LogLocator(numticks=6))
