"""Sweeps: one compile for a 64-point lr × seed sweep, resumable store, sharded = unsharded."""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest

import conservation._runner as runner
import conservation._train as train_module
from conservation._cli import main
from conservation._config import ConfigError, parse_config


ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = """
name = "s"
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[[dynamics]]
kind = "momentum"
lr = 0.05
momentum = 0.5
steps = 30
n_save = 4
[sweep]
lr = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
seed = [0, 1, 2, 3, 4, 5, 6, 7]
"""


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _arrays(folder):
    return {p.name: dict(np.load(p)) for p in sorted((folder / "points").glob("*.npz"))}


def test_64_point_sweep_compiles_once_and_reports(tmp_path):
    before = train_module.TRACES
    assert main(["sweep", str(_write(tmp_path, SWEEP)), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    assert train_module.TRACES - before == 1  # one trace of the training program, 64 points
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] == summary["points"] == 64
    rows = summary["rows"]
    # Per-member learning rates really differ: drift grows with lr for a fixed seed.
    seed0 = sorted((r for r in rows if r["seed"] == 0), key=lambda r: r["lr"])
    drifts = [r["max_drift[balance[0]]"] for r in seed0]
    assert drifts[-1] > 5 * drifts[0]  # identical lrs would give equal drifts
    assert (tmp_path / "out" / "summary.csv").read_text().startswith("point,lr,seed,")
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000


def test_an_interrupted_sweep_resumes_without_touching_finished_points(tmp_path, monkeypatch):
    config = _write(tmp_path, SWEEP.replace("[sweep]", "[sweep]\nchunk = 16"))
    main(["sweep", str(config), "--out", str(tmp_path / "reference"), "--quiet"])
    real, calls = runner.execute_with, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute_with", crash_on_third)
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").iterdir()}
    assert len(finished) == 32  # two chunks of 16 were written before the crash
    monkeypatch.setattr(runner, "execute_with", real)
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").iterdir()}
    assert len(after) == 64 and all(after[n] == t for n, t in finished.items())
    resumed, reference = _arrays(tmp_path / "out"), _arrays(tmp_path / "reference")
    for name, arrays in reference.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(resumed[name][key], value)


def test_sharded_sweep_over_four_cpu_devices_matches_unsharded(tmp_path):
    config = _write(tmp_path, SWEEP)
    sharded = _write(tmp_path, SWEEP.replace("[sweep]", "[sweep]\ndevices = 4"), "sharded.toml")
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                        "JAX_PLATFORMS": "cpu"}
    script = (
        "import sys, jax; from conservation._cli import main; assert len(jax.devices()) == 4; "
        "sys.exit(main(['sweep', sys.argv[1], '--out', sys.argv[2], '--quiet']))")
    for path, out in ((config, "plain"), (sharded, "sharded")):
        subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / out)],
                       check=True, env=env, cwd=ROOT)
    plain, split = _arrays(tmp_path / "plain"), _arrays(tmp_path / "sharded")
    assert len(plain) == len(split) == 64
    for name, arrays in plain.items():
        for key, value in arrays.items():
            np.testing.assert_allclose(split[name][key], value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("change, message", [
    ("[sweep]\nlr = []", "axis `sweep.lr` must be a non-empty list"),
    ("[sweep]\nlearning_rate = [0.1]", "unknown field `sweep.learning_rate`"),
    ("[sweep]\nseed = [0.5]", "axis `sweep.seed` must list an integer values"),
    ("[sweep]\nwidths = [[3, 5]]", "must keep the depth and input width"),
    ("[sweep]\nchunk = -1\nlr = [0.1]", "field `sweep.chunk` must be an integer ≥ 0"),
])
def test_sweep_config_errors_name_the_field(change, message):
    raw = tomllib.loads(SWEEP.split("[sweep]")[0] + change)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert message in str(error.value)


def test_shipped_sweep_config_is_valid():
    from conservation._config import load_config

    config = load_config(ROOT / "configs" / "sweep_lr_seed.toml")
    assert len(config.sweep["axes"]["lr"]) * len(config.sweep["axes"]["seed"]) == 64
