"""Plots of runs, neural mechanics and sweeps, drawn as the papers draw them.

Conventions shared by every figure:

- **One time axis.** Flows and discrete runs share the x axis t: a discrete run is drawn at
  t = η·step (its `Result.t`, which the runner records with `step_time` = lr), with the
  optimizer step on a secondary axis on top of its panels.
- **Medians on log axes.** A loss or drift panel draws the median over the members that
  succeeded (the statistic of the summary table's "final loss") with their min–max band, never
  an arithmetic mean (on a log axis a mean tracks the worst member). Members that stopped
  otherwise are left out of both and marked at the time they stopped (top edge of the panel),
  counted in the legend.
- **Labelled.** Every axis has a label, every figure a title, every row a legend; sweep axes
  of seeds (and other non-numeric axes) are categorical: no line joins seeds.

`results_figure`, `mechanics_figure` and `sweep_figure` return the matplotlib Figure (for
tests and notebooks; close it with `matplotlib.pyplot.close`); `plot_results`,
`plot_mechanics` and `plot_sweep` write it as PNG and close it.
"""

import math
import warnings

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import matplotlib.transforms as mtransforms
import numpy as np

from .._dynamics.monitor import STATUS_NAMES, SUCCESS

_FLOOR = 1e-17  # drifts below double-precision resolution are drawn at this level
# How a member that did not succeed is marked where it stopped: (marker, colour). Members
# that reached their loss goal stopped early on purpose: marked apart from the failures.
_MARKS = {"max_steps": ("x", "C3"), "diverged": ("x", "C3"), "failed": ("x", "C3"),
          "loss_increased": ("x", "C3"), "reached_loss": ("v", "C2")}
_SYMBOL = {"x": "×", "v": "▾"}  # the markers as the legend names them
T_LABEL = "t"  # flows: the flow's own time
T_STEP_LABEL = "t = η·step"  # discrete runs, on the same axis as flows


def drift_label(relative: bool) -> str:
    """The axis label of a law's drift (max over the law's components)."""
    return ("relative drift\n|Q(t) − Q(0)| / scale" if relative
            else "absolute drift\n|Q(t) − Q(0)|")


def _save(fig, file, dpi):
    try:
        fig.savefig(file, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def plot_results(results, file, *, title: str = "", max_laws: int = 4,
                 relative: dict[str, bool] | None = None,
                 step_times: dict[str, float] | None = None) -> None:
    """Write `results_figure(results, ...)` into `file` (a path or binary file) as PNG."""
    _save(results_figure(results, title=title, max_laws=max_laws, relative=relative,
                         step_times=step_times), file, dpi=110)


def results_figure(results, *, title: str = "", max_laws: int = 4,
                   relative: dict[str, bool] | None = None,
                   step_times: dict[str, float] | None = None):
    """The figure of `results` = [(label, Result), …]: one row of panels per run (runs never
    overlap), all against the same time axis t.

    **Arguments:**

    - `results`: (label, `conservation.Result`) pairs; each Result's `t` is its time axis
      (for discrete runs step × `step_time`, as `train` records it).
    - `title`: the figure's title (the config name); "runs" when empty.
    - `max_laws`: drift panels per row; laws beyond it are merged into one panel of their
      worst drift.
    - `relative`: law name → whether its drift is relative (default) or absolute (labels).
    - `step_times`: label → the step time η of a discrete run: its panels get the optimizer
      step t / η on a secondary x axis on top.

    **Returns:** a `matplotlib.figure.Figure`. Columns: the loss, then each law's drift, on log
    y axes, then each observable of `Result.observables` (its first component: λ₁ of the
    sharpness) on a linear y axis: the median over the members that succeeded (thick line)
    and their min–max (band); drifts start at the first save after t = 0 (where they are 0 by
    definition) and are drawn no lower than 1e-17. Members with another status are marked
    where they stopped.
    """
    relative = relative or {}
    step_times = step_times or {}
    names = []
    for _, result in results:
        names += [n for n in result.drift if n not in names]
    shown = names if len(names) <= max_laws else names[: max_laws - 1] + ["other laws"]
    observed = []
    for _, result in results:
        observed += [n for n in getattr(result, "observables", {}) if n not in observed]
    cols, rows = 1 + len(shown) + len(observed), max(1, len(results))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.7 * rows + 0.6),
                             squeeze=False, sharex=True, sharey="col")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = set()  # (column, whether a panel of it drew a median)
    for row, (label, result) in enumerate(results):
        colour = colours[row % len(colours)]
        t = np.asarray(result.t, float)
        step_time = step_times.get(label)
        status = np.asarray(result.status).reshape(-1)
        loss = np.asarray(result.loss, float)
        stops = _stop_points(t, loss, status)
        drawn.add((0, _panel(axes[row, 0], t, loss, status, stops, colour, legend=True)))
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
                ax.set_title(f"{len(names) - max_laws + 1} other laws", fontsize=9)
            else:
                curves = np.asarray(result.drift[name]) if name in result.drift else None
                ylabel = drift_label(relative.get(name, True))
                ax.set_title(name, fontsize=9)
            if curves is None:
                ax.text(0.5, 0.5, "not monitored", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="0.5")
            else:
                # From the first save after the start: the drift at t = 0 is 0 by definition.
                drawn.add((col, _panel(ax, t[1:], np.maximum(curves[:, 1:], _FLOOR), status,
                                       stops, colour)))
            ax.set_ylabel(ylabel, fontsize=8)
        for col, name in enumerate(observed, start=1 + len(shown)):
            ax = axes[row, col]
            ax.set_title(name, fontsize=9)
            if name not in getattr(result, "observables", {}):
                ax.text(0.5, 0.5, "not monitored", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="0.5")
                continue
            value = np.asarray(result.observables[name], float)
            first = value.reshape(value.shape[0], value.shape[1], -1)[:, :, 0]
            _panel(ax, t, first, status, stops, colour)
            ax.set_ylabel(name if value.ndim == 2 else f"{name}[0]", fontsize=8)
        for ax in axes[row]:
            ax.set_xlabel(T_STEP_LABEL if step_time else T_LABEL, fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
            if step_time:
                _step_axis(ax, step_time)
    # Observables: linear (λ may be < 0). A column where no member of any run succeeded has
    # nothing to put on a log scale (matplotlib refuses it): it stays linear, empty.
    logarithmic = {ax for col in range(1 + len(shown)) if (col, True) in drawn
                   for ax in axes[:, col]}
    for ax in axes.ravel():
        if ax in logarithmic:
            ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "runs")
    fig.tight_layout()
    return fig


def _step_axis(ax, step_time):
    """The optimizer step k = t / η on a secondary x axis on top of `ax`."""
    eta = float(step_time)
    top = ax.secondary_xaxis("top", functions=(lambda t: t / eta, lambda k: k * eta))
    top.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))  # steps are whole
    top.set_xlabel(f"step (η = {eta:g})", fontsize=7)
    top.tick_params(labelsize=6)
    return top


def _stop_points(xs, loss, status):
    """Per member that did not succeed: (x where it stopped — its last changing, finite save
    point —, its status code)."""
    stops = []
    for member in np.flatnonzero(status != SUCCESS):
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
    curves = np.where(np.isfinite(curves), curves, np.nan)
    ok = curves[status == SUCCESS]
    if ok.size:
        with warnings.catch_warnings():  # columns where no member has a value are all-NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(ok, axis=0)
            low, high = np.nanmin(ok, axis=0), np.nanmax(ok, axis=0)
        if len(ok) > 1:
            ax.fill_between(xs, low, high, color=colour, alpha=0.2, lw=0,
                            label=f"min–max of {len(ok)}")
        ax.plot(xs, median, color=colour, lw=1.8,
                label=f"median of {len(ok)} succeeded" if len(ok) > 1 else "1 succeeded")
    else:
        ax.text(0.5, 0.5, "no member succeeded", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="C3")
    drew = bool(ok.size)
    if stops:
        top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        counts = {}
        for x_stop, code in stops:
            name = STATUS_NAMES[code]
            counts[name] = counts.get(name, 0) + 1
            marker, mark_colour = _MARKS.get(name, ("x", "C3"))
            ax.plot([x_stop], [0.94], marker, color=mark_colour, ms=6, mew=1.5,
                    transform=top, clip_on=False)
        for name, n in counts.items():
            marker, mark_colour = _MARKS.get(name, ("x", "C3"))
            ax.plot([], [], marker, color=mark_colour,
                    label=f"{n} {name} ({_SYMBOL[marker]} where stopped; not in median)")
    if legend:
        ax.legend(fontsize=6, loc="lower left")
    return drew


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
        fig.colorbar(image, ax=ax, shrink=0.8, label="loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, file, dpi=110)


def plot_mechanics(entries, file, *, title: str = "", components: int = 3) -> None:
    """Write `mechanics_figure(entries, ...)` into `file` (a path or binary file) as PNG."""
    _save(mechanics_figure(entries, title=title, components=components), file, dpi=100)


def mechanics_figure(entries, *, title: str = "", components: int = 3):
    """Kunin-style figure of [(label, `conservation.MechanicsResult`), …]: per run (row) and
    law (column), the law's value Q(θ(t)) for the first member — a few components, one colour
    each — as simulated (solid), as the continuous-time theory predicts (black dashed) and
    as the exact discrete identity gives it (dots, sparse), against t = η·step with the step
    on a secondary axis on top; all rows share the time axis. Returns a
    `matplotlib.figure.Figure` titled `title` ("neural mechanics" when empty)."""
    names = list(entries[0][1].simulated)
    fig, axes = plt.subplots(len(entries), len(names),
                             figsize=(4.4 * len(names), 3.2 * len(entries) + 0.5),
                             squeeze=False, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (label, mechanics) in zip(axes, entries):
        t = np.asarray(mechanics.t, float)
        every = max(1, len(t) // 25)
        for ax, name in zip(row, names):
            sim = np.asarray(mechanics.simulated[name][0])
            cont = np.asarray(mechanics.continuous[name][0])
            disc = np.asarray(mechanics.discrete[name][0])
            for c in range(min(components, sim.shape[1])):
                colour = colours[c % len(colours)]
                ax.plot(t, sim[:, c], color=colour, lw=1.6, label=f"component {c}")
                ax.plot(t, cont[:, c], "k--", lw=1.0)
                ax.plot(t[::every], disc[::every, c], ".", color=colour, ms=3)
            ax.plot([], [], "k--", lw=1.0, label="continuous theory")
            ax.plot([], [], "k.", label="exact discrete identity")
            ax.set_title(f"{name} — {label}", fontsize=8)
            ax.set_xlabel(T_STEP_LABEL, fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_ylabel(f"Q(θ(t)) of {name}\n(member 0)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
            if len(t) > 1 and t[1] > t[0]:  # t = η·k at every step k: η = t[1] − t[0]
                _step_axis(ax, t[1] - t[0])
    fig.suptitle(title or "neural mechanics")
    fig.tight_layout()
    return fig


def plot_sweep(rows, manifest, file, *, relative: dict[str, bool] | None = None) -> None:
    """Write `sweep_figure(rows, manifest, ...)` into `file` (a path or binary file) as PNG."""
    _save(sweep_figure(rows, manifest, relative=relative), file, dpi=100)


def _categorical(name, values) -> bool:
    """Seeds and non-numeric axes (loss, group, solver) are categories, not a continuum."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return not numeric or name == "seed" or name.endswith("seed")


def _category(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, list) else str(value)


def sweep_figure(rows, manifest, *, relative: dict[str, bool] | None = None):
    """The report of a sweep: final loss and each law's worst drift (rows of panels) against
    every sweep axis (columns), one dot per point that succeeded.

    **Arguments:** `rows`, the report's rows (one dict per point: its axis values, `status`,
    `final_loss`, `max_drift[<law>]`); `manifest`, the sweep's `sweep.json` (its
    `config.sweep.axes` and `config.name`); `relative`, law name → relative drift or not.

    **Returns:** a `matplotlib.figure.Figure` titled with the config name. Numeric axes get
    the median over the other axes as a line (log x for lr, weight decay, init scale and
    tolerances); seeds and non-numeric axes are categorical (one tick per value, the median
    marked per value, no line). Points that did not succeed are left out and marked × at the
    top edge. Log y axes.
    """
    relative = relative or {}
    axes_values = dict(manifest["config"]["sweep"]["axes"])
    axes_names = list(axes_values) or ["point"]
    done = [r for r in rows if r["status"] not in ("missing", "corrupted")]
    metrics = ["final_loss"] + list(dict.fromkeys(
        k for r in done for k in r if k.startswith("max_drift[")))
    fig, axes = plt.subplots(len(metrics), len(axes_names),
                             figsize=(4.2 * len(axes_names), 3.0 * len(metrics) + 0.5),
                             squeeze=False)
    for row_axes, metric in zip(axes, metrics):
        for ax, name in zip(row_axes, axes_names):
            raw = [r[name] if name in r else r.get("point") for r in done]
            categorical = _categorical(name, axes_values.get(name, raw))
            if categorical:
                # In the sweep's order; a list value reads "a-b" in the rows, as here.
                categories = list(dict.fromkeys(
                    _category(v) for v in [*axes_values.get(name, []), *raw]))
                x = np.array([categories.index(_category(v)) for v in raw], float)
            else:
                x = np.array(raw, float)
            y = np.array([np.nan if r.get(metric) is None else r[metric] for r in done], float)
            ok = np.array([r["status"] == "success" for r in done]) & np.isfinite(y) & (y > 0)
            ax.scatter(x[ok], y[ok], s=12, alpha=0.7, label=f"{ok.sum()} succeeded")
            values = np.unique(x[ok])
            medians = [np.median(y[ok & (x == v)]) for v in values]
            if categorical and values.size:
                ax.scatter(values, medians, marker="_", s=300, color="C1", zorder=3,
                           label="median over the other axes")
            elif values.size > 1:
                ax.plot(values, medians, lw=1.2, color="C1",
                        label="median over the other axes")
            failed = np.array([r["status"] != "success" for r in done])
            if failed.any():
                top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(x[failed], np.full(failed.sum(), 0.94), "x", color="C3",
                        transform=top, clip_on=False,
                        label=f"{failed.sum()} did not succeed (not in median)")
            ax.set_yscale("log")
            _decade_limits(ax, y[ok])
            if categorical:
                ax.set_xticks(range(len(categories)), categories)
                ax.set_xlim(-0.6, len(categories) - 0.4)
                ax.set_xlabel(f"{name} (categorical)")
            else:
                if name in ("lr", "weight_decay", "init_scale", "rtol", "atol") and \
                        np.all(x > 0):
                    ax.set_xscale("log")
                    _value_ticks(ax, np.unique(x))
                elif all(float(v).is_integer() for v in x):
                    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
                ax.set_xlabel(name)
            if metric == "final_loss":
                ax.set_ylabel("final loss", fontsize=8)
            else:
                law = metric[len("max_drift["):-1]
                ax.set_ylabel(f"max {drift_label(relative.get(law, True))}\n{law}",
                              fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
    name = manifest["config"].get("name") or "sweep"
    fig.suptitle(f"{name}: {len(done)} of {len(rows)} sweep points")
    fig.tight_layout()
    return fig


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
