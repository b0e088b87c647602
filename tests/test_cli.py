"""The command line and the result files, as a user runs them."""

import json
import pathlib

import numpy as np
import pytest

import conservation._runner as runner
from conservation._cli import main


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
    assert arrays["values/balance[0]"].shape == (2, 11, 4, 4)
    np.testing.assert_allclose(arrays["max_drift/balance[0]"],
                               arrays["drift/balance[0]"].max(axis=1))
    width, height = _png_size(out / "plot.png")
    assert width > 600 and height > 200


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
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["flow (rtol 1e-09)"]
    assert (tmp_path / "out" / summary["runs"][0]["file"]).is_file()
    assert not list((tmp_path / "out").glob(".*tmp"))  # no half-written files left behind


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(TINY.replace("rtol = 1e-9", "rtol = -1e-9"))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "dynamics[0].rtol" in err and "must be > 0" in err
    assert not (tmp_path / "out").exists()


def test_quickstart_main_job(tmp_path):
    """The README's first command: the embedded quickstart config, end to end."""
    out = tmp_path / "quickstart"
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
    assert _png_size(out / "plot.png")[0] > 600


@pytest.mark.slow  # the Fig. 1 physics is tested fast in test_symmetry_laws / test_counting
def test_fig1_config_end_to_end_with_landscapes(tmp_path):
    """Seed paper Fig. 1 from the CLI: C₁₈ conserves the direction of p, plain data do not;
    the run writes both loss landscapes."""
    out = tmp_path / "fig1"
    assert main(["run", str(ROOT / "configs" / "fig1_sextic_c18.toml"), "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["laws"] == ["rowspace[W1]"]
    assert summary["symmetry_defect"]["augmented"] < 1e-14 < 0.1 < summary["symmetry_defect"]["plain"]
    drift = {r["label"]: r["max_drift"]["rowspace[W1]"] for r in summary["runs"]}
    flow_rtol = summary["config"]["dynamics"][0]["rtol"]
    assert drift["flow (rtol 1e-10) · augmented"] <= 10 * flow_rtol
    assert drift["gd (lr 0.01) · augmented"] <= 1e-12  # GD keeps Grassmannian laws exactly
    assert min(drift["flow (rtol 1e-10) · plain"], drift["gd (lr 0.01) · plain"]) > 0.1
    arrays = np.load(out / summary["runs"][1]["file"])
    assert arrays["condition/rowspace[W1]"].shape == (6, 101)
    width, height = _png_size(out / "landscape.png")
    assert width > 800 and height > 300
