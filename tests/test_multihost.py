"""Multi-host sweeps on JAX's distributed runtime: two local CPU processes (the CLI's
`--coordinator/--num-processes/--process-id`) give the same stored arrays as one process,
every point is computed exactly once, and a rerun resumes only what is missing."""

import os
import pathlib
import re
import socket
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from _stored import assert_same_arrays, stored_arrays

from conservation._experiments.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
GD = """
name = "mh"
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[[dynamics]]
kind = "gd"
lr = 0.05
steps = 20
n_save = 4
[sweep]
lr = [0.02, 0.05]
seed = [0, 1]
"""
FLOW = """
name = "mhflow"
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[[dynamics]]
kind = "flow"
t1 = 1.0
n_save = 4
[sweep]
rtol = [1e-6, 1e-8]
seed = [0, 1]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(config, out, timeout=240) -> list[int]:
    """Run `conservation sweep` as processes 0 and 1 of one distributed run; returns how many
    points each computed. Both are killed if either hangs or the test fails."""
    port = _free_port()
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [subprocess.Popen(
        [sys.executable, "-m", "conservation._experiments.cli", "sweep", str(config),
         "--out", str(out),
         "--quiet", "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    counts = []
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        counts.append(int(re.search(r"\((\d+) computed now", stdout).group(1)))
    return counts


# Three fresh JAX processes plus compiles (~40 s on a loaded 2-core box): the flow sweep runs
# in the default suite (a stored string field once broke it unseen while both were slow).
@pytest.mark.parametrize("text", [pytest.param(GD, marks=pytest.mark.slow), FLOW],
                         ids=["gd", "flow"])
def test_two_process_sweep_equals_one_process(tmp_path, text):
    config = tmp_path / "tiny.toml"
    config.write_text(text)
    assert main(["sweep", str(config), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    want = stored_arrays(tmp_path / "one")
    assert len(want) == 4

    counts = _two_processes(config, tmp_path / "two")
    # 4 distinct files written and 4 computations in all: each point computed exactly once,
    # and the work really was shared.
    assert sum(counts) == 4 and min(counts) > 0, counts
    got = stored_arrays(tmp_path / "two")
    assert_same_arrays(got, want)
    if text is FLOW:
        # One process ran each rtol's two seeds as 2 lanes, two processes ran one point
        # per chunk in diffrax's own solve (as recorded): the two loops agree to 1e-12 here.
        assert {int(a["batch_size"]) for a in want.values()} == {2}
        assert {int(a["batch_size"]) for a in got.values()} == {1}
    assert (tmp_path / "two" / "summary.json").exists()
    # The report drawn from the two processes' points is the one-process report, pixel for
    # pixel: panels for final loss and balance[0]'s drift (rows, ≥ 2.7 inches each) against
    # rtol and seed (two 4.2-inch columns) at 100 dpi, with something drawn in them.
    image = matplotlib.image.imread(tmp_path / "two" / "report.png")
    assert image.shape[1] == 840 and image.shape[0] >= 2 * 270
    np.testing.assert_array_equal(image, matplotlib.image.imread(tmp_path / "one" / "report.png"))
    assert np.mean(np.any(image[..., :3] < 0.5, axis=-1)) > 0.01  # dark pixels: text, points
    assert (tmp_path / "two" / "sweep.json").read_text() == \
        (tmp_path / "one" / "sweep.json").read_text()

    # Resume: a lost point is recomputed once, by one process; the others are skipped.
    (tmp_path / "two" / "points" / "2.npz").unlink()
    assert sorted(_two_processes(config, tmp_path / "two")) == [0, 1]
    assert_same_arrays(stored_arrays(tmp_path / "two"), want)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:1", "--num-processes", "2"], "`--process-id` is missing"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "`--process-id` must lie in 0 … 1"),
])
def test_distributed_flags_are_checked(tmp_path, capsys, flags, message):
    config = tmp_path / "tiny.toml"
    config.write_text(GD)
    assert main(["sweep", str(config), "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
