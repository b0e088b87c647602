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
