"""Sweeps as independent jobs: `conservation sweep --worker` / `--shard I/N` processes share one
folder through per-point claims (claims/), a SIGKILLed worker loses only its claimed points,
every point is computed once, and the results equal a one-process sweep."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from _stored import assert_same_arrays, stored_arrays

from conservation._experiments.cli import main
from conservation._experiments.store import Claims

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 12 points (3 lr × 4 seeds); a worker's chunks hold ceil(12 / 16) = 1 point, each ~0.1 s
# (20000 steps): long enough to stop a worker between two of them.
GD = """
name = "workers"
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[[dynamics]]
kind = "gd"
lr = 0.05
steps = 20000
n_save = 4
[sweep]
lr = [0.02, 0.03, 0.05]
seed = [0, 1, 2, 3]
"""
POINTS = 12


# -- the claim logic, in one process -------------------------------------------------------

def _forge(folder, name, **record):
    """A claim file as another worker would have written it."""
    (folder / "claims").mkdir(parents=True, exist_ok=True)
    (folder / "claims" / f"{name}.claim").write_text(json.dumps(record))


def test_claims_are_exclusive_released_and_taken_over_from_dead_workers(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)
    with first, second:
        # Atomic: one owner per item; a live owner keeps it.
        assert first.claim("0") and not second.claim("0")
        assert not second.is_stale("0") and not second.take_over("0")
        assert second.owner("0")["worker"] == first.token
        # Release after success: the file goes and the next claim wins; a release never
        # deletes another worker's claim.
        first.release("0")
        assert not (tmp_path / "claims" / "0.claim").exists()
        assert second.claim("0")
        first.release("0")
        assert second.owner("0")["worker"] == second.token

        # Another machine: alive while its heartbeat lasts, taken over once it expired.
        remote = {"worker": "far-1", "host": "elsewhere", "boot": "b", "pidns": "n", "pid": 1}
        _forge(tmp_path, "3", **remote)
        beat = tmp_path / "claims" / "far-1.worker"
        beat.write_text(json.dumps(remote | {"expires": time.time() + 60}))
        assert not second.is_stale("3") and not second.take_over("3")
        beat.write_text(json.dumps(remote | {"expires": time.time() - 1}))
        assert second.is_stale("3") and second.take_over("3")
        assert second.owner("3")["worker"] == second.token
        assert not first.take_over("3")  # now held by a live worker
        # Its heartbeat file gone: dead as well.
        _forge(tmp_path, "4", **(remote | {"worker": "far-2"}))
        assert first.is_stale("4") and first.take_over("4")

        # This machine: a pid that has ended, or that a new process reuses (other start
        # time), is dead at once, whatever its heartbeat says.
        here = {k: first.record[k] for k in ("host", "boot", "pidns")}
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _forge(tmp_path, "5", worker="gone", pid=dead.pid, start=None, **here)
        _forge(tmp_path, "6", worker="reused", pid=os.getpid(), start="-1", **here)
        _forge(tmp_path, "7", worker="alive", pid=os.getpid(),
               start=first.record["start"], **here)
        assert first.is_stale("5") and first.is_stale("6") and not first.is_stale("7")

        # A claim still being written (empty) is alive for `ttl` seconds.
        (tmp_path / "claims" / "8.claim").write_text("")
        assert not first.is_stale("8")
        old = time.time() - 2 * first.ttl
        os.utime(tmp_path / "claims" / "8.claim", (old, old))
        assert first.is_stale("8") and first.take_over("8")
        held = set(first.held)
    # Closing releases what is still held (unfinished items pass to the next worker) and
    # removes the heartbeats.
    assert held == {"4", "8"}
    left = {p.name for p in (tmp_path / "claims").iterdir()}
    assert left >= {"5.claim", "6.claim", "7.claim", "far-1.worker"}
    assert not left & {"0.claim", "3.claim", "4.claim", "8.claim"}
    assert not any(n.endswith(".worker") and n != "far-1.worker" for n in left)
    # Tidying (all items finished) removes dead claims and heartbeats; the live one stays.
    last = Claims(tmp_path)
    last.tidy()
    assert {p.name for p in (tmp_path / "claims").iterdir()} - {".conservation.lock"} == {
        "7.claim"}
    (tmp_path / "claims" / "7.claim").unlink()
    last.tidy()
    assert not (tmp_path / "claims").exists()


def test_heartbeat_moves_the_expiry_forward(tmp_path):
    with Claims(tmp_path, ttl=0.2) as claims:
        path = tmp_path / "claims" / f"{claims.token}.worker"
        first = json.loads(path.read_text())["expires"]
        deadline = time.time() + 20
        while json.loads(path.read_text())["expires"] <= first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(path.read_text())["expires"] > first
    assert not path.exists()


# -- whole sweeps ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep in one process (one chunk of 12 points). A worker's run here compiles
    its program (chunks of 1 point) once: the worker subprocesses then load it from the
    persistent compilation cache (conftest's) instead of each compiling it."""
    folder = tmp_path_factory.mktemp("workers")
    config = folder / "gd.toml"
    config.write_text(GD)
    assert main(["sweep", str(config), "--out", str(folder / "one"), "--quiet"]) == 0
    assert main(["sweep", str(config), "--out", str(folder / "warm"), "--worker",
                 "--quiet"]) == 0
    return config, stored_arrays(folder / "one")


def test_shards_from_slurm_and_workers_mix(reference, tmp_path, monkeypatch, capsys):
    config, want = reference
    out = tmp_path / "out"
    # Task 3 of `--array=1-7:2` (ids 1, 3, 5, 7) is shard 1 of 4: points 1, 5, 9.
    for name, value in {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                        "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    assert main(["sweep", str(config), "--out", str(out), "--shard", "--quiet"]) == 0
    assert "3/12 points" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "points").iterdir()) == ["1.npz", "5.npz", "9.npz"]
    assert not (out / "summary.json").exists()  # not the last: the summary waits
    assert main(["sweep", str(config), "--out", str(out), "--shard", "0/4", "--quiet"]) == 0
    assert len(list((out / "points").iterdir())) == 6
    # A worker takes the rest (the shard's points are finished, not recomputed) and, the
    # last one, writes the summary.
    assert main(["sweep", str(config), "--out", str(out), "--worker", "--quiet"]) == 0
    assert "12/12 points" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["finished"] == POINTS
    assert not (out / "claims").exists()
    assert_same_arrays(stored_arrays(out), want)


def test_one_process_sweep_leaves_live_workers_points_to_them(reference, tmp_path, capsys):
    config, want = reference
    out = tmp_path / "out"
    # Point 5 is claimed by a live worker (this process, under another worker's name).
    here = Claims(out).record
    _forge(out, "5", **(here | {"worker": "busy-worker"}))
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "11/12 points" in captured.out
    assert "1 point(s) are being computed by other workers" in captured.err
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["point"] for r in rows if r["status"] == "missing"] == [5]
    # Its worker gone (the claim released), the same command computes it.
    (out / "claims" / "5.claim").unlink()
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 0
    assert "12/12 points in" in capsys.readouterr().out
    assert not (out / "claims").exists()
    assert_same_arrays(stored_arrays(out), want)


@pytest.mark.parametrize("flags, message", [
    (["--shard", "4/4"], "`--shard` must be I/N with N ≥ 1 and 0 ≤ I < N, got '4/4'"),
    (["--shard", "x"], "`--shard` must be I/N"),
    (["--shard"], "reads SLURM_ARRAY_TASK_ID, which is not set"),
    (["--worker", "--distributed"], "give one of them"),
])
def test_worker_flags_are_checked(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    config = tmp_path / "gd.toml"
    config.write_text(GD)
    assert main(["sweep", str(config), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # refused before any work


def _worker(config, out, log):
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "conservation._experiments.cli", "sweep", str(config),
         "--out", str(out), "--worker"], env=env, stdout=log, stderr=subprocess.STDOUT)


def _computed(log: pathlib.Path) -> list[int]:
    """The points a worker logged as computed (each logged after its file was written)."""
    return [int(i) for line in re.findall(r"computed point\(s\) ([\d, ]+)", log.read_text())
            for i in line.split(",")]


def _claims_of(out, pid) -> set[int]:
    found = set()
    for path in (out / "claims").glob("*.claim"):
        try:
            if json.loads(path.read_text()).get("pid") == pid:
                found.add(int(path.stem))
        except (OSError, ValueError):  # being written or just released
            pass
    return found


def test_killed_worker_loses_only_its_claimed_points(reference, tmp_path, capsys):
    config, want = reference
    out = tmp_path / "out"
    logs = [tmp_path / f"worker{k}.log" for k in range(3)]
    handles = [log.open("w") for log in logs]
    procs = [_worker(config, out, h) for h in handles]
    deadline = time.time() + 200
    try:
        # The first worker that has finished a point and holds the claim of another is
        # stopped (SIGSTOP, so that the claims read are the ones it dies with) and SIGKILLed.
        victim, lost = None, set()
        while victim is None:
            assert time.time() < deadline, [log.read_text()[-1000:] for log in logs]
            assert any(p.poll() is None for p in procs), "all done before a kill"
            for k, p in enumerate(procs):
                if p.poll() is not None:  # a fast one may be done already
                    assert p.returncode == 0, logs[k].read_text()[-3000:]
                    continue
                if _computed(logs[k]) and _claims_of(out, p.pid):
                    p.send_signal(signal.SIGSTOP)
                    lost = _claims_of(out, p.pid)
                    if lost:
                        p.kill()
                        victim = k
                        break
                    p.send_signal(signal.SIGCONT)  # between two chunks: let it go on
            time.sleep(0.005)
        assert procs[victim].wait(timeout=30) == -signal.SIGKILL
        for k, p in enumerate(procs):
            if k != victim:
                assert p.wait(timeout=200) == 0, logs[k].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for h in handles:
            h.close()
    # One more worker (here, in this process) finishes whatever is left and, the last one,
    # writes the summary.
    capsys.readouterr()
    assert main(["sweep", str(config), "--out", str(out), "--worker"]) == 0
    logs[victim].rename(tmp_path / "victim.log")
    (tmp_path / "last.log").write_text(capsys.readouterr().err)
    died = _computed(tmp_path / "victim.log")
    survivors = [i for log in tmp_path.glob("*.log") if log.name != "victim.log"
                 for i in _computed(log)]
    # Every point computed once: by the victim before it died, or by exactly one survivor;
    # the points it held when killed were computed by a survivor, none it finished was.
    assert died and lost
    assert len(survivors) == len(set(survivors)), survivors
    assert not set(survivors) & set(died), (died, survivors)
    assert set(survivors) | set(died) == set(range(POINTS))
    assert lost <= set(survivors) and not lost & set(died)
    assert json.loads((out / "summary.json").read_text())["finished"] == POINTS
    assert (out / "report.png").stat().st_size > 0
    assert not (out / "claims").exists()  # the dead worker's claim and heartbeat tidied
    assert_same_arrays(stored_arrays(out), want)
