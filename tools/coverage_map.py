"""Which default test files execute which lines of the numeric core: the map `tools/mutate.py
--map` uses to run, for each mutant, every test file of the default test command that reaches
the mutated line (besides `COVERING`'s), so that a mutant counts as killed when the default
suite would kill it, not only the files listed for its module.

    python tools/coverage_map.py --out benchmarks/results/coverage_map.json [--jobs 2]

Each test file runs in its own process under `coverage` (`pip install coverage`), so a file
is credited with the lines it executes itself: in one process, a function that an earlier
file traced for `jax.jit` is not traced (executed) again. Works on a `git worktree` of HEAD,
like `mutate.py`; the map records that commit (line numbers are a commit's). Also lists the
lines no default test executes (every mutant there survives).
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from mutate import COVERING, ROOT, mutants


def _file_lines(work: pathlib.Path, test: str, data: pathlib.Path,
                cache: pathlib.Path) -> dict[str, list[int]]:
    """The numeric-core lines one test file executes (module → sorted line numbers)."""
    import coverage  # a development tool, not a dependency

    # The worktree's package first; one compilation cache (a cache hit still traces).
    env = {**os.environ, "PYTHONPATH": str(work), "CONSERVATION_CACHE_DIR": str(cache)}
    env.pop("CONSERVATION_NO_CACHE", None)
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}",
                    "--source=conservation", "-m", "pytest", "-q", "-p", "no:randomly",
                    test], cwd=work, env=env, capture_output=True, text=True)
    db = coverage.CoverageData(basename=str(data))
    db.read()
    out = {}
    for measured in db.measured_files():
        relative = pathlib.Path(measured).resolve().relative_to(work.resolve()).as_posix()
        if relative in COVERING:
            out[relative] = sorted(db.lines(measured) or ())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/coverage_map.json")
    parser.add_argument("--jobs", type=int, default=2, help="test files run at once")
    parser.add_argument("--tests", nargs="*", default=None,
                        help="these test files only (default: every tests/test_*.py)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp) / "work"
        subprocess.run(["git", "worktree", "add", "--detach", str(work), "HEAD"], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            tests = args.tests or sorted(p.relative_to(work).as_posix()
                                         for p in (work / "tests").glob("test_*.py"))
            lines: dict[str, dict[int, list[str]]] = {m: {} for m in COVERING}
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                futures = {pool.submit(_file_lines, work, t, pathlib.Path(tmp) / f"cov{i}",
                                       pathlib.Path(tmp) / "cache"): t
                           for i, t in enumerate(tests)}
                for done in concurrent.futures.as_completed(futures):
                    test = futures[done]
                    for module, executed in done.result().items():
                        for line in executed:
                            lines[module].setdefault(line, []).append(test)
                    print(f"{test}: done", flush=True)
            from coverage.parser import PythonParser

            code, first = {}, {}
            for module in COVERING:
                parsed = PythonParser(filename=str(work / module))
                parsed.parse_source()
                code[module] = sorted(parsed.statements)
                # Coverage credits a statement to its first line; a mutant can sit on any.
                carrying = {m["line"] for m in mutants(work / module, module)}
                first[module] = {str(n): parsed.first_line(n) for n in sorted(carrying)
                                 if parsed.first_line(n) != n}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(work)], cwd=ROOT,
                           capture_output=True)
    result = {
        "commit": commit,
        "tests": tests,
        "lines": {m: {str(k): sorted(v) for k, v in sorted(by.items())}
                  for m, by in lines.items()},
        "first_line": first,
        "never_executed": {m: [n for n in code[m] if n not in lines[m]] for m in COVERING},
    }
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=1) + "\n")
    missing = sum(len(v) for v in result["never_executed"].values())
    print(f"{len(tests)} test files; {missing} statements of the numeric core never executed; "
          f"{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
