"""First-call latency: the README's first example and the quickstart CLI in fresh processes.

Each case runs in a new Python process (interpreter start, import, compile and run, as a new
user meets it), timed from outside, and counts the XLA programs it hands to the compiler with
JAX's own event (`/jax/core/compile/backend_compile_duration`, which a persistent-cache hit
fires too; the seconds it reports are the compile or the cache load). Cases:

- README example without the persistent cache, cold (an empty cache folder,
  `cn.enable_compilation_cache()`) and warm (a second process on the same folder);
- `conservation run configs/quickstart.toml` cold and warm (the CLI's cache is on by default);
- `import conservation` alone (no program: what every process pays before its first call);
- `import ml_dtypes` alone, after numpy (JAX imports it in every process).

Every case also records its exit: the seconds from its last exit handler to the end of the
process (the interpreter's teardown).

`--baseline DIR` runs every case also with the package found in DIR first on PYTHONPATH
(e.g. `git archive HEAD conservation | tar -x -C DIR` of an earlier commit), interleaved with
the current code, so before/after ratios come from one run of one machine. DIR may hold
dependencies as well (the `ml_dtypes` an earlier install resolved to): each case records the
`ml_dtypes` version it ran with. Every case finds
the package's bytecode compiled (as an installed copy has it; written once, untimed, into a
scratch folder), and the machine's load average is recorded with the results: on a shared
machine the wall seconds scale with it, the program counts do not. Writes
`benchmarks/results/latency_cpu.json`.

    python benchmarks/bench_latency.py [--rounds R] [--baseline DIR]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import _harness

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVENT = "/jax/core/compile/backend_compile_duration"

PRELUDE = f"""
import atexit, json, os, sys, time
_programs = [0, 0.0]
def _report():  # registered before JAX's: the last exit handler to run, then only teardown
    import ml_dtypes  # imported by JAX already; its version sets ~0.6 s of import time
    print("LATENCY " + json.dumps({{"programs": _programs[0], "compile_s": _programs[1],
                                   "ml_dtypes": ml_dtypes.__version__,
                                   "exit_started": time.time()}}), flush=True)
atexit.register(_report)
import jax, jax.monitoring
def _listen(event, seconds, **kwargs):
    if event == {EVENT!r}:
        _programs[0] += 1
        _programs[1] += seconds
jax.monitoring.register_event_duration_secs_listener(_listen)
"""


def readme_example() -> str:
    """The README's first ```python block."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start:text.index("```", start)]


def _case(name: str, cache: str | None, out: pathlib.Path) -> str:
    """The program text of one case."""
    if name == "import":
        return PRELUDE + "import conservation\n"
    if name == "readme":
        enable = "import conservation as cn; cn.enable_compilation_cache()\n" if cache else ""
        return PRELUDE + enable + readme_example()
    argv = ["run", str(ROOT / "configs" / "quickstart.toml"), "--out", str(out), "--quiet"]
    if cache is None:
        argv.append("--no-cache")
    # As the `conservation` command runs it (`main()` reading sys.argv).
    return PRELUDE + ("from conservation._experiments.cli import main\n"
                      f"sys.argv = ['conservation', *{argv!r}]\n"
                      "rc = main()\nsys.stdout.flush()\nsys.exit(rc)\n")


def run_case(name: str, cache: str | None, baseline: str | None, scratch: pathlib.Path) -> dict:
    """Run one case in a fresh process: wall seconds, programs compiled (or loaded) and their
    seconds."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("EQX_ON_ERROR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    # Bytecode as an installed package has it (pip compiles it on install): written once by
    # `precompile` into the scratch folder, never into the source tree.
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    env.pop("CONSERVATION_NO_CACHE", None)
    if cache is not None:
        env["CONSERVATION_CACHE_DIR"] = cache
    else:
        env.pop("CONSERVATION_CACHE_DIR", None)
    if baseline:
        env["PYTHONPATH"] = baseline
    out = pathlib.Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _case(name, cache, out / "out")], env=env,
                          capture_output=True, text=True, cwd=out)
    wall, ended = time.perf_counter() - start, time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("LATENCY ")][-1]
    entry = json.loads(line[len("LATENCY "):])
    # The interpreter's teardown after the last exit handler (its final garbage collections,
    # freeing every module), part of the wall time a user waits for.
    entry["exit_s"] = ended - entry.pop("exit_started")
    return {"wall_s": wall, **entry}


def ml_dtypes_import(baseline: str | None, scratch: pathlib.Path) -> float:
    """Seconds `import ml_dtypes` takes after numpy (JAX imports it in every process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    if baseline:
        env["PYTHONPATH"] = baseline
    code = ("import time, numpy\nstart = time.perf_counter()\nimport ml_dtypes\n"
            "print(time.perf_counter() - start)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, cwd=scratch)
    return float(proc.stdout.split()[-1])


def precompile(baseline: str | None, scratch: pathlib.Path) -> None:
    """Import the package and the CLI once, untimed, so that every timed case finds their
    bytecode (a run with PYTHONDONTWRITEBYTECODE would otherwise recompile ~50 modules from
    source in every process, ~0.4 s that no installed copy pays)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    if baseline:
        env["PYTHONPATH"] = baseline
    subprocess.run([sys.executable, "-c", "import conservation._experiments.cli"], env=env,
                   check=True, cwd=scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", default=None,
                        help="a folder holding an earlier `conservation` package")
    args = parser.parse_args()
    codes = {"current": None} | ({"baseline": str(pathlib.Path(args.baseline).resolve())}
                                 if args.baseline else {})
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-latency-"))
    results: dict = {code: {} for code in codes}
    for path in codes.values():
        precompile(path, scratch)
    for _ in range(args.rounds):
        for code, path in codes.items():  # interleaved: a slow spell hits both alike
            for name in ("import", "readme", "quickstart"):
                cases = {f"{name}_cold": None, f"{name}_warm": None}
                if name == "readme":
                    cases = {"readme_no_cache": None, **cases}
                if name == "import":
                    cases = {"import_no_cache": None}
                folder = tempfile.mkdtemp(dir=scratch)  # empty: cold, then warm on it
                for case in cases:
                    cache = None if case.endswith("no_cache") else folder
                    entry = run_case(name, cache, path, scratch)
                    results[code].setdefault(case, []).append(entry)
                    print(code, case, json.dumps(entry), flush=True)
            seconds = ml_dtypes_import(path, scratch)
            results[code].setdefault("ml_dtypes_import", []).append({"seconds": seconds})
            print(code, "ml_dtypes_import", seconds, flush=True)
    summary = {code: {case: {"wall_s": min(r["wall_s"] for r in runs),
                             "compile_s": min(r["compile_s"] for r in runs),
                             "exit_s": min(r["exit_s"] for r in runs),
                             "programs": runs[0]["programs"],
                             "ml_dtypes": runs[0]["ml_dtypes"], "rounds": runs}
                      for case, runs in cases.items() if case != "ml_dtypes_import"}
               for code, cases in results.items()}
    for code, cases in results.items():
        summary[code]["ml_dtypes_import_s"] = min(
            r["seconds"] for r in cases["ml_dtypes_import"])
    payload = {"rounds": args.rounds, "results": summary, "load_average": os.getloadavg(),
               "goal_s": {"readme_cold": 8.0, "readme_warm": 3.0, "quickstart_cold": 15.0}}
    if "baseline" in summary:
        payload["current_over_baseline"] = {
            case: summary["current"][case]["wall_s"] / summary["baseline"][case]["wall_s"]
            for case in summary["current"] if case != "ml_dtypes_import_s"}
    path = _harness.write("latency", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
