"""Shared benchmark harness: pinned threads, compile time reported apart, JSON output.

Import this module before numpy/jax: it pins BLAS and XLA CPU threads to one, so that
ratios against single-threaded peers (scipy) compare like with like.
"""

import json
import os
import pathlib
import platform
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for var in THREAD_VARS:
    os.environ.setdefault(var, "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("EQX_ON_ERROR", "nan")  # what the diffrax FAQ asks for when timing

import jax  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def timed(fn, *, repeats: int = 5) -> dict:
    """Time `fn()` (which must return JAX arrays or plain data): the first call (trace +
    compile + run) and the best of `repeats` warm calls, each ended by block_until_ready."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return {"first_call_s": first, "run_s": best, "compile_s": max(first - best, 0.0),
            "output": out}


def timed_interleaved(fns: dict, *, repeats: int = 5) -> dict:
    """`timed` for several variants at once: each is called once (trace + compile + run),
    then `repeats` rounds call every variant once in turn, and each keeps its best round.
    Interleaving keeps a slow spell of a shared machine from falling on one variant alone
    (on the 2-core VM here single runs drift by up to ±40% over minutes)."""
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        out[name] = {"first_call_s": time.perf_counter() - start, "run_s": float("inf"),
                     "output": result}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name]["output"] = jax.block_until_ready(fn())
            out[name]["run_s"] = min(out[name]["run_s"], time.perf_counter() - start)
    for entry in out.values():
        entry["compile_s"] = max(entry["first_call_s"] - entry["run_s"], 0.0)
    return out


def _commit() -> str | None:
    """The repository's HEAD commit, with "+dirty" when the measured code (the package, the
    benchmark scripts, pyproject.toml) has uncommitted changes (None outside a git checkout):
    the code the numbers were measured with."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "conservation",
             "benchmarks/*.py", "pyproject.toml"],
            cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        # A copy without its .git (a device machine's working tree): the commit it was made
        # from, when the command that copied it says so.
        return os.environ.get("CONSERVATION_COMMIT")
    return head + ("+dirty" if dirty.strip() else "")


def environment() -> dict:
    import diffrax
    import equinox
    import numpy

    device = jax.devices()[0]
    return {
        "commit": _commit(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # an accelerator's runtime (e.g. the CUDA version); the CPU's says nothing more
        "platform_version": None if device.platform == "cpu" else getattr(
            device.client, "platform_version", None),
        "versions": {"jax": jax.__version__, "diffrax": diffrax.__version__,
                     "equinox": equinox.__version__, "numpy": numpy.__version__},
        "threads": {var: os.environ.get(var) for var in THREAD_VARS} | {
            "XLA_FLAGS": os.environ.get("XLA_FLAGS")},
    }


def write(name: str, payload: dict) -> pathlib.Path:
    """Write `payload` (plus the environment) to benchmarks/results/<name>_<backend>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{jax.default_backend()}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **payload},
                               indent=2))
    return path
