"""The CLI's last holes (issue 23): Adam sweeps, full disks, foreign files, swapped result
files, damaged manifests, `sweep --force`, SIGTERM, a closed stdout, a second Ctrl-C, and
integer class labels. One tiny model shape throughout, so the compiled programs are shared."""

import errno
import gc
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _stored import write_config

import conservation._experiments.runner as runner
from conservation._experiments.cli import main
from conservation._experiments.config import parse_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUN = """
name = "faults"
[model]
kind = "deep_linear"
widths = [2, 3, 1]
[data]
n = 8
[[dynamics]]
kind = "gd"
lr = 0.1
steps = 5
[[dynamics]]
kind = "gd"
lr = 0.05
steps = 5
"""
FIRST, SECOND = "0-gd-lr-0.1.npz", "1-gd-lr-0.05.npz"

X = np.array([[0.3, -1.2], [1.1, 0.4], [-0.7, 0.9], [0.2, 0.5], [-1.5, -0.3], [0.8, -0.6],
              [0.1, 1.3], [-0.4, -0.8]])
Y = np.array([0.5, -0.2, 0.9, 0.1, -1.1, 0.3, 0.7, -0.6])
SWEEP = f"""
name = "sweep"
[model]
kind = "deep_linear"
widths = [2, 3, 1]
[data]
inputs = "explicit"
x = {X.tolist()}
targets = "explicit"
y = {Y.tolist()}
[[dynamics]]
kind = "adam"
lr = 0.1
steps = 5
[sweep]
lr = [0.01, 0.05]
"""


def _arrays(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """RUN finished once: the folder the other tests copy and damage."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder, RUN)
    assert main(["run", str(config), "--out", str(folder / "out"), "--quiet"]) == 0
    return config, folder / "out"


def _copy(finished, tmp_path):
    import shutil

    config, out = finished
    shutil.copytree(out, tmp_path / "out")
    return config, tmp_path / "out"


def _adam_reference(weights, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba) in numpy on L = mean_i ‖W₂W₁xᵢ − yᵢ‖², gradients by hand: the
    losses after 0 … `steps` steps and the final weights."""
    w1, w2 = (np.array(w) for w in weights)
    m = [np.zeros_like(w1), np.zeros_like(w2)]
    v = [np.zeros_like(w1), np.zeros_like(w2)]
    n, y = len(X), Y[:, None]
    losses = []
    for t in range(1, steps + 2):
        hidden = X @ w1.T
        residual = hidden @ w2.T - y
        losses.append(np.mean(np.sum(residual**2, axis=1)))
        if t > steps:
            break
        grads = [2 / n * w2.T @ residual.T @ X, 2 / n * residual.T @ hidden]
        for i, (w, g) in enumerate(zip((w1, w2), grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g**2
            w -= lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
    return np.array(losses), (w1, w2)


def test_an_adam_sweep_runs_and_matches_a_numpy_adam(tmp_path):
    """Adam injects no momentum: a sweep over its lr failed with `internal error`."""
    from conservation import DeepLinear

    config = write_config(tmp_path, SWEEP)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    start = DeepLinear.random([2, 3, 1], key=jax.random.PRNGKey(0)).weights  # seed 0
    for index, lr in enumerate([0.01, 0.05]):
        losses, (w1, w2) = _adam_reference(start, lr, 5)
        point = _arrays(out / "points" / f"{index}.npz")
        np.testing.assert_allclose(point["loss"], losses, rtol=1e-10)
        np.testing.assert_allclose(point["final.weights[1]"], w2, rtol=1e-10)
        np.testing.assert_allclose(point["final.weights[0]"], w1, rtol=1e-10)
        assert losses[-1] < losses[0]


def test_a_full_disk_ends_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, RUN)
    real = np.savez_compressed

    def full(file, **arrays):
        if "identity" in arrays or "loss" in arrays:  # a result file (the probe write passes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", full)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("conservation: error: cannot write "), err
    assert str(out / FIRST) in err and "No space left" in err and "free some space" in err
    assert not list(out.glob(".*.tmp"))


def test_a_users_files_are_never_replaced_without_force(finished, tmp_path, capsys):
    config, _ = finished
    out = tmp_path / "out"
    out.mkdir()
    mine = out / FIRST
    mine.write_bytes(b"a user's own file, named like ours")
    (out / "notes.npz").write_bytes(b"another one")
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mine) in err and "--force" in err, err
    assert mine.read_bytes() == b"a user's own file, named like ours"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        FIRST, "notes.npz"]
    # --force replaces it, saying so; a file without our names is never touched.
    assert main(["run", str(config), "--out", str(out), "--force"]) == 0
    assert f"--force: replacing {mine}" in capsys.readouterr().err
    assert (out / "notes.npz").read_bytes() == b"another one"
    np.testing.assert_array_equal(_arrays(mine)["loss"], _arrays(finished[1] / FIRST)["loss"])


def test_a_result_file_copied_over_another_is_detected_and_recomputed(finished, tmp_path,
                                                                      capsys):
    config, out = _copy(finished, tmp_path)
    want = _arrays(out / FIRST)
    (out / FIRST).write_bytes((out / SECOND).read_bytes())  # lr 0.05's numbers as lr 0.1's
    assert main(["run", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / FIRST} holds entry 1" in err and "recomputing it" in err, err
    for key, value in want.items():
        np.testing.assert_array_equal(_arrays(out / FIRST)[key], value, err_msg=key)


def test_a_swapped_sweep_point_is_detected_and_recomputed(tmp_path, capsys):
    config = write_config(tmp_path, SWEEP)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    points = out / "points"
    want = _arrays(points / "0.npz")
    assert not np.array_equal(want["loss"], _arrays(points / "1.npz")["loss"])
    (points / "0.npz").write_bytes((points / "1.npz").read_bytes())
    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # the report does not show it as point 0
    assert str(points / "0.npz") in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["rows"][0]["status"] == "corrupted"
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {points / '0.npz'} holds point 1 (lr = 0.05)" in err, err
    for key, value in want.items():
        np.testing.assert_array_equal(_arrays(points / "0.npz")[key], value, err_msg=key)
    # `sweep --force` replaces a different sweep (refused without it).
    other = write_config(tmp_path, SWEEP.replace("0.05]", "0.02]"), "o.toml")
    assert main(["sweep", str(other), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["sweep", str(other), "--out", str(out), "--quiet", "--force"]) == 0
    assert json.loads((out / "sweep.json").read_text())["points"][1] == {"lr": 0.02}


def test_a_damaged_run_json_names_what_works(finished, tmp_path, capsys):
    config, out = _copy(finished, tmp_path)
    (out / "run.json").write_text('{"config": ')
    for _ in range(2):  # the advice is not "rerun the same command", which fails again
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(out / "run.json") in err and "--force" in err and "rerun" not in err, err
    assert main(["run", str(config), "--out", str(out), "--quiet", "--force"]) == 0
    assert json.loads((out / "run.json").read_text())["jobs"][0]["file"] == FIRST


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_a_closed_stdout_ends_quietly_with_141(finished, tmp_path, monkeypatch, capsys):
    """`conservation run … | head`: the table is printed last, every result is saved."""
    config, _ = finished
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""
    assert (out / FIRST).is_file() and (out / SECOND).is_file() and (out / "summary.json")\
        .is_file()


def test_after_an_interrupt_the_exiting_command_ignores_a_second_one(finished, tmp_path,
                                                                     monkeypatch, capsys):
    """The command (`main()` reading sys.argv) handles one Ctrl-C; a second one during exit
    would raise inside JAX's atexit clean-up and print its traceback."""
    config, _ = finished

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    monkeypatch.setattr(sys, "argv", ["conservation", "run", str(config), "--out",
                                      str(tmp_path / "out"), "--quiet"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    gc.unfreeze()  # (what `import conservation` froze, so that the command's freeze shows)
    try:
        assert main() == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        # The command's exit: what it made is frozen, out of the final collections' way.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert "interrupted" in capsys.readouterr().err
    # Called from Python (argv given), the caller's handlers and collector stay.
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
    assert gc.get_freeze_count() == 0


@pytest.mark.slow  # a fresh interpreter, stopped by a real SIGTERM
def test_sigterm_ends_with_one_line_exit_143_and_the_same_command_resumes(tmp_path):
    config = write_config(tmp_path, RUN.replace("lr = 0.05\nsteps = 5", "lr = 0.05\nsteps = 20000"))
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "conservation._experiments.cli", "run", str(config), "--out",
         str(out), "--quiet"], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / FIRST).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / FIRST).exists(), child.communicate()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    assert err.count("\n") == 1 and "terminated (SIGTERM)" in err and str(out) in err, err
    stamp = (out / FIRST).stat().st_mtime_ns
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert (out / FIRST).stat().st_mtime_ns == stamp  # resumed: the first entry was kept


def test_integer_class_labels_with_cross_entropy_match_numpy():
    """Labels y of shape (n,) (or (n, 1)) with values in [0, k), as optax's
    softmax_cross_entropy_with_integer_labels; one-hot targets give the same number."""
    from conservation import CrossEntropy, Dataset, DeepLinear, make_objective
    from conservation._validation import ArgumentError

    key = jax.random.PRNGKey(7)
    x = np.asarray(jax.random.normal(key, (6, 2)))
    labels = np.array([0, 2, 1, 1, 0, 2])
    model = DeepLinear.random([2, 4, 3], key=jax.random.PRNGKey(1))
    logits = x @ np.asarray(model.weights[0]).T @ np.asarray(model.weights[1]).T
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    want = -np.mean(log_p[np.arange(6), labels])
    for y in (labels, labels[:, None], labels.astype(np.float32), np.eye(3)[labels]):
        objective = make_objective(CrossEntropy(), Dataset(x, y), model)
        np.testing.assert_allclose(float(objective(model)), want, rtol=1e-13)
    for bad in (labels + 1, labels - 0.5):  # a label 3 of 3 classes; not an integer
        with pytest.raises(ArgumentError, match=r"not integers in \[0, 3\)"):
            make_objective(CrossEntropy(), Dataset(x, bad), model)
    # A config's explicit targets: integer labels.
    config = parse_config({
        "model": {"kind": "deep_linear", "widths": [2, 4, 3]}, "loss": {"kind": "cross_entropy"},
        "data": {"inputs": "explicit", "x": x.tolist(), "targets": "explicit",
                 "y": labels.tolist()},
        "dynamics": [{"kind": "gd", "lr": 0.1, "steps": 2}]})
    ensemble, objectives, _ = runner.build(config)
    member = ensemble[0]
    logits = x @ np.asarray(member.weights[0]).T @ np.asarray(member.weights[1]).T
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(float(objectives[""](member)),
                               -np.mean(log_p[np.arange(6), labels]), rtol=1e-13)
