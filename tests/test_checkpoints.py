"""`checkpoints`: a long `conservation run` entry saved after each of its segments, and a run
stopped part-way continued from its last segment, not from t = 0."""

import re
import tomllib

import numpy as np
import pytest

import conservation._experiments.runner as runner
from conservation._experiments.config import ConfigError, parse_config

TOML = """
name = "segments"
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
checkpoints = {flow}
[[dynamics]]
kind = "sgd"
lr = 0.1
batch_size = 4
steps = 20
n_save = 11
checkpoints = {sgd}
"""


def _config(flow, sgd):
    return parse_config(tomllib.loads(TOML.format(flow=flow, sgd=sgd)), default_name="segments")


class _Stop(Exception):
    pass


EXECUTE = runner.execute  # the real one, whatever a test patched in before


def _run(config, out, monkeypatch, *, stop_after=None):
    """run_config, stopped (as by a kill) when `execute` is called for the
    `stop_after + 1`-th time; returns (log lines, the segments `execute` was called for)."""
    calls, lines = [], []

    def execute(run, *args, segment=(1, 1), **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise _Stop
        calls.append((run.kind, segment))
        return EXECUTE(run, *args, segment=segment, **kwargs)

    monkeypatch.setattr(runner, "execute", execute)
    try:
        runner.run_config(config, out_dir=out, progress=False, log=lines.append)
    except _Stop:
        pass
    return lines, calls


def _arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "identity"}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The same config in one segment, and in segments without a stop."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("whole")
    _run(_config(1, 1), base / "one", mp)
    _run(_config(2, 5), base / "segments", mp)
    mp.undo()
    return base


def test_a_stopped_run_continues_from_its_last_segment(whole, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = _config(2, 5)
    # Stopped in the sgd entry's 4th segment: the flow is finished, sgd has 3 of 5 saved.
    lines, calls = _run(config, out, monkeypatch, stop_after=2 + 3)
    assert calls == [("flow", (1, 2)), ("flow", (2, 2))] + [("sgd", (k, 5)) for k in (1, 2, 3)]
    assert (out / "0-flow-rtol-1e-09.npz").exists()
    assert not (out / "0-flow-rtol-1e-09.partial.npz").exists()  # whole: its partial is gone
    partial = out / "1-sgd-lr-0.1.partial.npz"
    assert int(_arrays(partial)["partial/segment"]) == 3
    assert _arrays(partial)["t"].tolist() == pytest.approx([0.1 * 2 * i for i in range(7)])
    lines, calls = _run(config, out, monkeypatch)
    assert calls == [("sgd", (4, 5)), ("sgd", (5, 5))]  # not from t = 0
    assert any("continuing from checkpoint 3/5 (t = 1.2)" in line for line in lines), lines
    assert not partial.exists()
    for name in ("0-flow-rtol-1e-09.npz", "1-sgd-lr-0.1.npz"):
        resumed, straight = _arrays(out / name), _arrays(whole / "segments" / name)
        assert resumed.keys() == straight.keys()
        for k in resumed:  # bit for bit: the same segments, the same numbers
            np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_segments_save_where_the_whole_run_saves(whole):
    one, seg = whole / "one", whole / "segments"
    # Discrete: segments continue the optimizer state and the minibatch keys exactly.
    a, b = _arrays(one / "1-sgd-lr-0.1.npz"), _arrays(seg / "1-sgd-lr-0.1.npz")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # A flow restarts its step-size controller at each segment's start: the same save times
    # and statuses, numbers equal to the tolerance (rtol 1e-9), not bit for bit.
    a, b = _arrays(one / "0-flow-rtol-1e-09.npz"), _arrays(seg / "0-flow-rtol-1e-09.npz")
    np.testing.assert_allclose(b["t"], a["t"], rtol=1e-15)
    np.testing.assert_array_equal(b["status"], a["status"])
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-7)
    assert not np.array_equal(b["loss"], a["loss"])  # it did run in two solves
    assert (b["num_steps"] >= a["num_steps"]).all()


@pytest.mark.parametrize("flow, sgd, message", [
    (3, 1, "`dynamics[0].checkpoints` = 3 must divide `n_save` − 1 = 10, so that every "
           "segment ends on a save point; e.g. checkpoints = 2, or n_save = 31."),
    (1, 4, "`dynamics[1].checkpoints` = 4 must divide `n_save` − 1 = 10 and `steps` = 20, so "
           "that every segment ends on a save point; e.g. checkpoints = 2."),
    (0, 1, "checkpoints"),
])
def test_checkpoints_must_end_segments_on_save_points(flow, sgd, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(flow, sgd)


def test_a_sweep_refuses_checkpoints():
    raw = tomllib.loads(TOML.format(flow=2, sgd=1))
    raw["dynamics"] = raw["dynamics"][:1]
    raw["sweep"] = {"seed": [0, 1]}
    with pytest.raises(ConfigError, match="checkpoints"):
        parse_config(raw)
