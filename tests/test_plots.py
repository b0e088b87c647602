"""The figures read back: titles, axis labels, legends and the plotted numbers themselves
(medians of the stored values, discrete runs at t = η·step, seeds as categories), checked
against numpy on hand-made arrays rather than against pixels."""

import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from conservation._experiments import plot

SUCCESS, DIVERGED, REACHED_LOSS = 0, 2, 5  # codes of conservation.STATUS_NAMES


def _run(t, seed, *, status):
    """A Result-like run: t, loss (B, T) spread over decades, two laws' drifts (B, T)."""
    rng = np.random.default_rng(seed)
    b = len(status)
    loss = np.exp(-t[None] * rng.uniform(0.5, 3.0, (b, 1))) * 10.0 ** rng.normal(0, 2, (b, 1))
    drift = {"balance[0]": np.abs(rng.normal(0, 1e-3, (b, len(t)))) * t[None],
             "angle": np.abs(rng.normal(0, 1e-9, (b, len(t))))}
    status = np.asarray(status)
    loss[status == DIVERGED, 3:] = np.inf  # stopped: the entries after it are inf
    return types.SimpleNamespace(t=t, loss=loss, drift=drift, status=status)


def _line(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return line


def _legend(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _secondary(ax):
    return [child for child in ax.child_axes if child.get_xlabel().startswith("step")]


@pytest.fixture(scope="module")
def runs():
    lr = 0.1
    flow = _run(np.linspace(0.0, 2.0, 9), 0, status=[SUCCESS] * 5)
    gd = _run(lr * np.arange(21), 1, status=[SUCCESS] * 3 + [DIVERGED, REACHED_LOSS])
    fig = plot.results_figure([("flow", flow), ("gd (lr 0.1)", gd)], title="tiny",
                              relative={"angle": False}, step_times={"gd (lr 0.1)": lr})
    fig.canvas.draw()  # lays out the secondary axes
    yield fig, flow, gd, lr
    plt.close(fig)


def test_run_figure_is_titled_and_labelled(runs):
    fig, *_ = runs
    assert fig.get_suptitle() == "tiny"
    axes = np.array(fig.axes[:6]).reshape(2, 3)
    for row, xlabel in zip(axes, ["t", "t = η·step"]):
        assert [ax.get_xlabel() for ax in row] == [xlabel] * 3
        assert [ax.get_ylabel() for ax in row] == [
            "loss", "relative drift\n|Q(t) − Q(0)| / scale", "absolute drift\n|Q(t) − Q(0)|"]
        assert [ax.get_title() for ax in row[1:]] == ["balance[0]", "angle"]
        assert all(ax.get_yscale() == "log" for ax in row)
    assert [axes[0, 0].get_title(loc="left"), axes[1, 0].get_title(loc="left")] == [
        "flow", "gd (lr 0.1)"]
    assert _legend(axes[0, 0]) == ["min–max of 5", "median of 5 succeeded"]
    assert _legend(axes[1, 0]) == [
        "min–max of 3", "median of 3 succeeded",
        "1 diverged (× where stopped; not in median)",
        "1 reached_loss (▾ where stopped; not in median)"]


def test_run_lines_are_medians_of_the_members_that_succeeded(runs):
    fig, flow, gd, _ = runs
    axes = np.array(fig.axes[:6]).reshape(2, 3)
    for row, run, n in ((axes[0], flow, 5), (axes[1], gd, 3)):
        ok = run.status == SUCCESS
        line = _line(row[0], f"median of {n} succeeded")
        np.testing.assert_allclose(line.get_ydata(), np.median(run.loss[ok], axis=0),
                                   rtol=1e-14)
        # Not the arithmetic mean, which on a log axis tracks the worst member.
        assert np.max(np.abs(np.log10(np.mean(run.loss[ok], axis=0)[1:] /
                                      line.get_ydata()[1:]))) > 0.3
        (band,) = [c for c in row[0].collections if isinstance(c, PolyCollection)]
        y = band.get_paths()[0].vertices[:, 1]
        np.testing.assert_allclose([y.min(), y.max()],
                                   [run.loss[ok].min(), run.loss[ok].max()], rtol=1e-14)
        for ax, law in zip(row[1:], ("balance[0]", "angle")):
            # Drifts from the first save after t = 0, drawn no lower than 1e-17.
            line = _line(ax, f"median of {n} succeeded")
            np.testing.assert_allclose(line.get_xdata(), run.t[1:], rtol=0, atol=0)
            np.testing.assert_allclose(
                line.get_ydata(),
                np.median(np.maximum(run.drift[law][ok, 1:], 1e-17), axis=0), rtol=1e-14)


def test_discrete_runs_share_the_flow_time_axis_with_the_step_on_top(runs):
    fig, flow, gd, lr = runs
    axes = np.array(fig.axes[:6]).reshape(2, 3)
    np.testing.assert_array_equal(_line(axes[0, 0], "median of 5 succeeded").get_xdata(),
                                  flow.t)
    np.testing.assert_allclose(_line(axes[1, 0], "median of 3 succeeded").get_xdata(),
                               lr * np.arange(21), rtol=1e-15)  # t = η·step, not step
    assert len({ax.get_xlim() for ax in axes.ravel()}) == 1  # one time axis
    assert all(not _secondary(ax) for ax in axes[0])  # a flow has no steps
    for ax in axes[1]:
        (top,) = _secondary(ax)
        assert top.get_xlabel() == "step (η = 0.1)"
        np.testing.assert_allclose(top.get_xlim(), np.array(ax.get_xlim()) / lr)


def _mechanics(eta, steps, seed):
    rng = np.random.default_rng(seed)
    k = np.arange(steps + 1)

    def law(c):
        return np.cumsum(rng.normal(0, 0.01, (2, steps + 1, c)), axis=1) + 1.0

    names = {"scale[0]": 1, "rescale[1]": 3}
    return types.SimpleNamespace(
        t=eta * k, simulated={n: law(c) for n, c in names.items()},
        continuous={n: law(c) for n, c in names.items()},
        discrete={n: law(c) for n, c in names.items()})


def test_mechanics_figure_labels_every_curve_and_keeps_one_time_axis():
    entries = [("sgd (lr 0.05)", _mechanics(0.05, 40, 0)),
               ("momentum (lr 0.02)", _mechanics(0.02, 40, 1))]
    fig = plot.mechanics_figure(entries, title="mech", components=2)
    try:
        fig.canvas.draw()
        assert fig.get_suptitle() == "mech"
        axes = np.array(fig.axes[:4]).reshape(2, 2)
        for row, (label, mech) in zip(axes, entries):
            eta = mech.t[1]
            for ax, name in zip(row, ("scale[0]", "rescale[1]")):
                assert ax.get_title() == f"{name} — {label}"
                assert ax.get_xlabel() == "t = η·step"
                assert name in ax.get_ylabel() and "Q(θ(t))" in ax.get_ylabel()
                components = min(2, mech.simulated[name].shape[2])
                assert _legend(ax) == [f"component {c}" for c in range(components)] + [
                    "continuous theory", "exact discrete identity"]
                for c in range(components):
                    line = _line(ax, f"component {c}")
                    np.testing.assert_array_equal(line.get_ydata(),
                                                  mech.simulated[name][0, :, c])
                    np.testing.assert_allclose(line.get_xdata(), eta * np.arange(41))
                (top,) = _secondary(ax)
                assert top.get_xlabel() == f"step (η = {eta:g})"
                np.testing.assert_allclose(top.get_xlim(), np.array(ax.get_xlim()) / eta)
        assert len({ax.get_xlim() for ax in axes.ravel()}) == 1
    finally:
        plt.close(fig)


def test_sweep_figure_draws_seeds_as_categories_and_medians_over_lr():
    lrs, seeds = [0.01, 0.03, 0.1], [3, 0, 7]
    rng = np.random.default_rng(0)
    rows = [{"point": i, "lr": lr, "seed": seed, "status": "success",
             "final_loss": float(10.0 ** rng.normal(-6, 3)),
             "max_drift[balance[0]]": float(lr ** 2 * rng.uniform(1, 2))}
            for i, (lr, seed) in enumerate((lr, s) for lr in lrs for s in seeds)]
    rows[4]["status"], rows[4]["final_loss"] = "diverged", float("inf")
    manifest = {"config": {"name": "swp", "sweep": {"axes": {"lr": lrs, "seed": seeds}}}}
    fig = plot.sweep_figure(rows, manifest, relative={"balance[0]": True})
    try:
        assert fig.get_suptitle() == "swp: 9 of 9 sweep points"
        (loss_lr, loss_seed), (drift_lr, drift_seed) = np.array(fig.axes).reshape(2, 2)
        assert [loss_lr.get_ylabel(), drift_lr.get_ylabel()] == [
            "final loss", "max relative drift\n|Q(t) − Q(0)| / scale\nbalance[0]"]
        assert [loss_lr.get_xlabel(), loss_seed.get_xlabel()] == ["lr", "seed (categorical)"]
        ok = [r for r in rows if r["status"] == "success"]
        for ax, metric in ((loss_seed, "final_loss"), (drift_seed, "max_drift[balance[0]]")):
            assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "0", "7"]
            # No line joins the seeds: every drawn line is markers only or a single point.
            assert all(ln.get_linestyle() == "None" or len(ln.get_xdata()) < 2
                       for ln in ax.get_lines())
            medians = [c for c in ax.collections if c.get_label().startswith("median")]
            (marks,) = medians
            want = [np.median([r[metric] for r in ok if r["seed"] == s]) for s in seeds]
            np.testing.assert_allclose(marks.get_offsets(), np.c_[[0, 1, 2], want])
            assert "median over the other axes" in _legend(ax)
        for ax, metric in ((loss_lr, "final_loss"), (drift_lr, "max_drift[balance[0]]")):
            line = _line(ax, "median over the other axes")
            want = [np.median([r[metric] for r in ok if r["lr"] == lr]) for lr in lrs]
            np.testing.assert_allclose(line.get_xdata(), lrs)
            np.testing.assert_allclose(line.get_ydata(), want)
            assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
            assert "1 did not succeed (not in median)" in _legend(ax)
    finally:
        plt.close(fig)


def test_a_run_where_no_member_succeeded_is_drawn_not_refused():
    """Every member stopped (max_steps, inf after): nothing can go on a log axis, and the
    figure must still be drawn (matplotlib refused it: "Data cannot be log-scaled"), saying
    so in the panel and marking where each member stopped."""
    import io

    t = np.linspace(0.0, 2.0, 9)
    loss = np.exp(-t)[None].repeat(3, 0)
    loss[:, 5:] = np.inf
    run = types.SimpleNamespace(t=t, loss=loss, drift={"a": np.full((3, 9), 1e-6)},
                                status=np.array([1, 1, 1]))  # max_steps
    fig = plot.results_figure([("flow", run)])
    fig.savefig(io.BytesIO(), format="png")
    loss_ax = fig.axes[0]
    assert [tx.get_text() for tx in loss_ax.texts] == ["no member succeeded"]
    assert loss_ax.get_yscale() == "linear"  # nothing to put on a log scale
    assert _legend(loss_ax) == ["3 max_steps (× where stopped; not in median)"]
    # With a run that succeeded in the same column, the column is logarithmic again.
    ok = types.SimpleNamespace(t=t, loss=np.exp(-t)[None].repeat(2, 0),
                               drift={"a": np.full((2, 9), 1e-6)}, status=np.array([0, 0]))
    fig = plot.results_figure([("flow", run), ("gd", ok)])
    fig.savefig(io.BytesIO(), format="png")
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_yscale() == "log"
    plt.close("all")
