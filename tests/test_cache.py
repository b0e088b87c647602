"""The persistent compilation cache: on by default in the CLI, off with `--no-cache`, and a
cached run's numbers equal a fresh one's bit for bit."""

import os
import pathlib
import subprocess
import sys

import numpy as np

import conservation as cn

CONFIG = """
name = "cached"
seed = 0
[model]
kind = "deep_linear"
widths = [2, 3, 1]
[data]
n = 8
[ensemble]
size = 2
[[dynamics]]
kind = "flow"
t1 = 1.0
rtol = 1e-8
solver = "tsit5"
"""


def _run(tmp_path, out, cache, *extra):
    env = {**os.environ, "CONSERVATION_CACHE_DIR": str(cache)}
    env.pop("CONSERVATION_NO_CACHE", None)
    subprocess.run([sys.executable, "-m", "conservation._experiments.cli", "run",
                    str(tmp_path / "c.toml"), "--out", str(tmp_path / out), "--quiet", *extra],
                   check=True, env=env, capture_output=True, text=True, cwd=tmp_path)
    return {p.name: dict(np.load(p)) for p in sorted((tmp_path / out).glob("*.npz"))}


def _entries(folder: pathlib.Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def test_cli_caches_its_programs_and_the_numbers_stay_bit_identical(tmp_path):
    (tmp_path / "c.toml").write_text(CONFIG)
    cache = tmp_path / "cache"
    fresh = _run(tmp_path, "off", cache, "--no-cache")
    assert _entries(cache) == set()  # --no-cache writes nothing there

    cold = _run(tmp_path, "cold", cache)
    stored = _entries(cache)
    assert len(stored) > 10  # every program of the run, however small
    warm = _run(tmp_path, "warm", cache)
    assert _entries(cache) == stored  # the second process compiled nothing new

    assert fresh.keys() == cold.keys() == warm.keys() and len(cold) == 1
    for name in cold:
        for key, value in fresh[name].items():
            if value.dtype.kind in "fiub":
                for run in (cold, warm):
                    np.testing.assert_array_equal(run[name][key], value, err_msg=f"{name}:{key}")


def test_enable_compilation_cache_respects_the_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSERVATION_NO_CACHE", "1")
    assert cn.enable_compilation_cache(tmp_path / "x") is None
    assert not (tmp_path / "x").exists()
