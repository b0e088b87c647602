"""The command line and the result files, as a user runs them."""

import json
import pathlib

import numpy as np
import pytest
from _stored import stored_arrays

import conservation._experiments.runner as runner
from conservation._experiments.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
seed = 3
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[ensemble]
size = 2
[[dynamics]]
kind = "flow"
t1 = 2.0
rtol = 1e-9
n_save = 11
[[dynamics]]
kind = "gd"
lr = 0.1
steps = 20
n_save = 11
"""


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.mark.slow  # end-to-end; keeps the default suite under 10 min on 2 cores
def test_run_writes_results_plot_and_summary(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "flow (rtol 1e-09)" in printed and "gd (lr 0.1)" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["moment_fast_path"] is True
    flow, gd = summary["runs"]
    assert flow["status"]["success"] == 2 and gd["status"]["success"] == 2
    assert flow["max_drift"]["balance[0]"] <= 1e-8  # ≤ 10 rtol
    assert gd["max_drift"]["balance[0]"] > 1e-6  # GD breaks it
    assert summary["config"]["dynamics"][0]["t1"] == 2.0

    arrays = np.load(out / flow["file"])
    assert arrays["loss"].shape == (2, 11) and arrays["t"][-1] == 2.0
    # Law values are stored at the final time only (per-save values: `values="all"`).
    assert arrays["final_values/balance[0]"].shape == (2, 4, 4)
    assert "values/balance[0]" not in arrays
    np.testing.assert_allclose(arrays["max_drift/balance[0]"],
                               arrays["drift/balance[0]"].max(axis=1))
    width, height = _png_size(out / "plot.png")
    assert width > 600 and height > 200


def _record_plots(monkeypatch):
    """The labels of every figure of runs the runner draws, in order."""
    drawn, real = [], runner.plot_results

    def record(results, *args, **kwargs):
        drawn.append([label for label, _ in results])
        return real(results, *args, **kwargs)

    monkeypatch.setattr(runner, "plot_results", record)
    return drawn


def test_a_crash_keeps_finished_runs(tmp_path, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    real = runner.execute
    calls = []

    def crash_on_second(run, *args, **kwargs):
        calls.append(run["label"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, *args, **kwargs)

    monkeypatch.setattr(runner, "execute", crash_on_second)
    drawn = _record_plots(monkeypatch)
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["flow (rtol 1e-09)"]
    # The figure of the runs that finished is drawn once, on the way out.
    assert drawn == [["flow (rtol 1e-09)"]]
    assert _png_size(tmp_path / "out" / "plot.png")[0] > 600
    assert (tmp_path / "out" / summary["runs"][0]["file"]).is_file()
    assert not list((tmp_path / "out").glob(".*tmp"))  # no half-written files left behind


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(TINY.replace("rtol = 1e-9", "rtol = -1e-9"))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "dynamics[0].rtol" in err and "must be > 0" in err
    assert not (tmp_path / "out").exists()


def test_quickstart_main_job(tmp_path, monkeypatch):
    """The README's first command: the embedded quickstart config, end to end."""
    out = tmp_path / "quickstart"
    drawn = _record_plots(monkeypatch)
    assert main(["run", str(ROOT / "configs" / "quickstart.toml"), "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    flow, gd, momentum = summary["runs"]
    rtol = summary["config"]["dynamics"][0]["rtol"]
    assert flow["status"]["success"] == summary["config"]["ensemble"]["size"]
    assert max(flow["max_drift"].values()) <= 10 * rtol
    assert min(gd["max_drift"].values()) > 1e3 * rtol
    assert min(momentum["max_drift"].values()) > 1e3 * rtol
    assert flow["final_loss_median"] < 1e-6
    # Near a perfect fit (momentum reaches ~1e-30) the factored moment loss stays positive.
    assert all(run["final_loss_median"] > 0.0 for run in summary["runs"])
    assert _png_size(out / "plot.png")[0] > 600
    # Drawn once, with every run (a quick config is not redrawn after each of its runs).
    assert drawn == [[run["label"] for run in summary["runs"]]]


@pytest.mark.slow  # the Fig. 1 physics is tested fast in test_symmetry_laws / test_counting
def test_fig1_config_end_to_end_with_landscapes(tmp_path):
    """Seed paper Fig. 1 from the CLI: C₁₈ conserves the direction of p, plain data do not;
    the run writes both loss landscapes."""
    out = tmp_path / "fig1"
    assert main(["run", str(ROOT / "configs" / "fig1_sextic_c18.toml"), "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["laws"] == ["rowspace[W1]"]
    defect = summary["symmetry_defect"]
    assert defect["augmented"] < 1e-14 < 0.1 < defect["plain"]
    drift = {r["label"]: r["max_drift"]["rowspace[W1]"] for r in summary["runs"]}
    flow_rtol = summary["config"]["dynamics"][0]["rtol"]
    assert drift["flow (rtol 1e-10) · augmented"] <= 10 * flow_rtol
    assert drift["gd (lr 0.01) · augmented"] <= 1e-12  # GD keeps Grassmannian laws exactly
    assert min(drift["flow (rtol 1e-10) · plain"], drift["gd (lr 0.01) · plain"]) > 0.1
    arrays = np.load(out / summary["runs"][1]["file"])
    assert arrays["condition/rowspace[W1]"].shape == (6, 101)
    width, height = _png_size(out / "landscape.png")
    assert width > 800 and height > 300


# --- Fault tolerance: resume, locks, permissions, strict JSON, one-line errors -------------

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time

from conservation._experiments.config import load_config
from conservation._experiments.runner import final_ensemble, format_summary


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _strict(path):
    return json.loads(path.read_text(), parse_constant=_no_constants)


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """TINY run once, uninterrupted, under umask 022: what resumed runs must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "tiny.toml").write_text(TINY)
    with _umask(0o022):
        assert main(["run", str(folder / "tiny.toml"), "--out", str(folder / "out"),
                     "--quiet"]) == 0
    return folder / "out"


def test_run_resumes_skipping_finished_entries_bit_identically(tmp_path, monkeypatch,
                                                               tiny_reference):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    with _umask(0o022):
        real, calls = runner.execute, []

        def crash_on_second(run, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(run, *args, **kwargs)

        monkeypatch.setattr(runner, "execute", crash_on_second)
        out = tmp_path / "out"
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 130
        first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
        assert list(first) == ["0-flow-rtol-1e-09.npz"]
        (out / ".1-gd-lr-0.1.npz.k1ll3d.tmp").write_bytes(b"half")  # a killed write's orphan
        monkeypatch.setattr(runner, "execute", real)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert len(calls) == 2  # the resumed run computed only the second entry
    assert (out / "0-flow-rtol-1e-09.npz").stat().st_mtime_ns == first["0-flow-rtol-1e-09.npz"]
    assert not list(out.glob(".*.tmp"))
    resumed, reference = stored_arrays(out, "*.npz"), stored_arrays(tiny_reference, "*.npz")
    assert resumed.keys() == reference.keys()
    for name, arrays in reference.items():
        assert arrays.keys() == resumed[name].keys()
        for key, value in arrays.items():
            np.testing.assert_array_equal(resumed[name][key], value, err_msg=f"{name}:{key}")
    # Strict JSON, the same per-entry results, readable by others (umask 022 → 0644).
    summary, expected = _strict(out / "summary.json"), _strict(tiny_reference / "summary.json")
    # The flow records the solver "auto" chose and its lanes (read back from the npz of the
    # skipped entry); a discrete run has neither.
    assert [(r.get("solver"), r.get("batch_size")) for r in summary["runs"]] == [
        ("tsit5", 2), (None, None)]
    for got, want in zip(summary["runs"], expected["runs"]):
        assert {k: v for k, v in got.items() if k != "seconds"} == {
            k: v for k, v in want.items() if k != "seconds"}
    for path in out.iterdir():
        if not path.name.startswith("."):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    # The final parameters are stored: the model can be reloaded without rerunning.
    ensemble, _, _ = runner.build(load_config(config))
    gd = resumed["1-gd-lr-0.1.npz"]
    final = final_ensemble(gd, ensemble)
    w = np.asarray(final.models.weights[0])
    np.testing.assert_array_equal(w, gd["final.weights[0]"])
    assert not np.array_equal(w, np.asarray(ensemble.models.weights[0]))  # it did train


def test_run_refuses_a_different_config_unless_forced_and_recomputes_corrupted(
        tmp_path, tiny_reference):
    import shutil

    config, other = tmp_path / "tiny.toml", tmp_path / "other.toml"
    config.write_text(TINY)
    other.write_text(TINY.replace("steps = 20", "steps = 10"))
    out = tmp_path / "out"
    shutil.copytree(tiny_reference, out)
    reference = stored_arrays(out, "*.npz")
    entry = out / "1-gd-lr-0.1.npz"
    entry.write_bytes(entry.read_bytes()[:100])  # truncated: must be named and recomputed
    before = (out / "0-flow-rtol-1e-09.npz").stat().st_mtime_ns
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert (out / "0-flow-rtol-1e-09.npz").stat().st_mtime_ns == before
    for key, value in reference["1-gd-lr-0.1.npz"].items():
        np.testing.assert_array_equal(np.load(entry)[key], value)
    (out / "notes.txt").write_text("a user's own file")
    assert main(["run", str(other), "--out", str(out), "--quiet"]) == 2
    assert main(["run", str(other), "--out", str(out), "--quiet", "--force"]) == 0
    assert (out / "notes.txt").exists()  # --force deletes our files only
    assert json.loads((out / "run.json").read_text())["config"]["dynamics"][1]["steps"] == 10
    assert np.load(entry)["t"].size == 11


def test_format_summary_reports_each_laws_worst_drift():
    summary = {
        "relative_drift": {"qk[0]": True, "range[QKV]": False},
        "runs": [{"label": "gd", "status": {"success": 3, "diverged": 1}, "seconds": 1.0,
                  "final_loss_median": 0.5, "num_steps_max": 10,
                  "max_drift": {"qk[0]": 1.1e-5, "range[QKV]": 4.5e-15}}]}
    header, row = format_summary(summary).splitlines()
    assert "max drift qk[0] rel" in header and "max drift range[QKV] abs" in header
    assert "1.10e-05" in row and "4.50e-15" in row and "3 success, 1 diverged" in row
    long = format_summary(summary, max_columns=1).splitlines()
    assert len(long) == 3 and "4.50e-15" in long[2] and "range[QKV] abs" in long[2]
    assert "solver" not in header  # no flow among the runs
    summary["runs"].append(summary["runs"][0] | {"label": "flow", "solver": "stabilized"})
    header, gd, flow = format_summary(summary).splitlines()
    column = header.index("solver")  # left-aligned columns: cells start where headers do
    assert gd[column:].startswith("- ") and flow[column:].startswith("stabilized "), (gd, flow)


def _user_error_cases(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + TINY.encode())
    latin = tmp_path / "latin.toml"
    latin.write_bytes(TINY.replace('"tiny"', '"caf\xe9"').encode("latin-1"))
    empty = tmp_path / "empty_folder"
    empty.mkdir(exist_ok=True)
    return [
        (["run", str(config), "--out", str(a_file)], "is a file, not a folder", a_file),
        (["run", str(config), "--out", str(a_file / "x")], "lies under the file", a_file),
        (["run", str(tmp_path)], "is a folder", tmp_path),
        (["run", str(bom)], "byte-order mark", bom),
        (["count", str(latin)], "not UTF-8", latin),
        (["report", str(empty)], "holds no sweep", empty),
        (["report", str(tmp_path / "missing")], "is not a folder", tmp_path / "missing"),
    ] + ([  # sysfs refuses new files even to root
        (["run", str(config), "--out", "/sys/conservation-test"], "is not writable",
         "/sys/conservation-test"),
    ] if pathlib.Path("/sys/kernel").is_dir() else [])


def test_user_errors_are_one_line_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    for argv, message, path in _user_error_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("conservation: error: "), err
        assert message in err and str(path) in err and "Traceback" not in err
    argv, message, _ = _user_error_cases(tmp_path)[0]
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and message in err
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("conservation ")


LOCK_TINY = """
name = "lock"
seed = 1
[model]
kind = "deep_linear"
widths = [2, 3, 2]
[data]
n = 8
[[dynamics]]
kind = "gd"
lr = 0.1
steps = 20
[[dynamics]]
kind = "gd"
lr = 0.05
steps = 20000
"""


def _child(config, out, *extra):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "conservation._experiments.cli", "run", str(config),
         "--out", str(out),
         *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two fresh interpreters (JAX import + compile each)
def test_two_processes_on_one_folder_compute_each_entry_once(tmp_path):
    config = tmp_path / "lock.toml"
    config.write_text(LOCK_TINY.replace("steps = 20000", "steps = 30"))
    children = [_child(config, tmp_path / "out") for _ in range(2)]
    logs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], logs
    lines = [line for _, err in logs for line in err.splitlines() if line.startswith("[")]
    computed = [line for line in lines if not line.endswith("skipped")]
    assert len(computed) == 2 and len(lines) == 4, lines  # each entry computed exactly once
    assert any("waiting for another conservation process" in err for _, err in logs)
    # Every step is saved by default for runs of ≤ 1000 steps (step 1 included).
    arrays = np.load(tmp_path / "out" / "0-gd-lr-0.1.npz")
    np.testing.assert_allclose(arrays["t"], 0.1 * np.arange(21), rtol=1e-15)


@pytest.mark.slow  # a fresh interpreter, interrupted by a real SIGINT
def test_ctrl_c_ends_with_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    config = tmp_path / "lock.toml"
    config.write_text(LOCK_TINY)
    out = tmp_path / "out"
    child = _child(config, out, "--quiet")
    first = out / "0-gd-lr-0.1.npz"
    deadline = time.monotonic() + 240
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), child.communicate()
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted" in err and str(out) in err, err
    stamp = first.stat().st_mtime_ns
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert first.stat().st_mtime_ns == stamp
    assert main(["run", str(config), "--out", str(tmp_path / "reference"), "--quiet"]) == 0
    for name, arrays in stored_arrays(tmp_path / "reference", "*.npz").items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(np.load(out / name)[key], value)
    assert main(["report", str(out)]) == 0  # a run folder: its table


SWEEP_TINY = """
name = "s"
[model]
kind = "deep_linear"
widths = [2, 3, 2]
[data]
n = 8
[[dynamics]]
kind = "gd"
lr = 0.1
steps = 10
[sweep]
lr = [0.05, 0.1]
"""


def test_a_corrupted_sweep_point_is_named_and_recomputed(tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_TINY)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    point = out / "points" / "1.npz"
    good = dict(np.load(point))
    point.write_bytes(point.read_bytes()[:64])
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert str(point) in captured.err and "corrupted" in captured.out
    summary = _strict(out / "summary.json")
    assert summary["finished"] == 1 and summary["corrupted"] == [str(point)]
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    assert "1 computed now" in capsys.readouterr().out
    for key, value in good.items():
        np.testing.assert_array_equal(np.load(point)[key], value)
    table = capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "balance[0] rel" in table and "2/2 points" in table
    assert _strict(out / "summary.json")["finished"] == 2
