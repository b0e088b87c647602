"""What the CLI stores, read back for comparison: shared by the CLI, sweep, worker and
multi-host tests (each compares a run's stored arrays with a reference run's)."""

import pathlib

import numpy as np


def write_config(folder: pathlib.Path, text: str, name: str = "c.toml") -> pathlib.Path:
    """A config file `name` in `folder` holding `text`."""
    path = folder / name
    path.write_text(text)
    return path


def stored_arrays(folder: pathlib.Path, pattern: str = "points/*.npz") -> dict[str, dict]:
    """Every result file under `folder` matching `pattern`, by file name: its arrays."""
    out = {}
    for path in sorted(folder.glob(pattern)):
        with np.load(path) as data:
            out[path.name] = {k: data[k] for k in data.files}
    return out


def assert_same_arrays(got: dict, want: dict, *, ignore=("batch_size",), tol: float = 1e-12):
    """Every stored array equal: numbers to `tol` (relative and absolute), strings exactly
    (e.g. the solver a point ran). `batch_size` is ignored by default: how a point ran depends
    on its chunk's size, which depends on the number of processes or the worker's rule."""
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for k in set(want[name]) - set(ignore):
            if want[name][k].dtype.kind in "USO":
                np.testing.assert_array_equal(got[name][k], want[name][k], err_msg=f"{name}:{k}")
            else:
                np.testing.assert_allclose(got[name][k], want[name][k], rtol=tol, atol=tol,
                                           err_msg=f"{name}:{k}")
