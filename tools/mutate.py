"""Mutation testing of the numeric core: plant one small bug at a time, run the tests that cover
its file, and count the bugs the tests catch (the "mutation score").

    python tools/mutate.py --sample 40 --seed 0 --out benchmarks/results/mutation.json

Works on a copy of the repository (a `git worktree` of HEAD in a temporary folder), so the
checkout is never modified. A mutant is one token of one line of code (strings and comments
excluded) replaced by a plausible mistake:

- comparisons  `<`↔`<=`, `>`↔`>=`, `==`↔`!=`;
- arithmetic   `+`↔`-`, `*`↔`/`, `**` → `*`;
- numbers      an int n → n + 1, a float x → 2x (0.0 → 1.0);
- names        `max`↔`min`, `all`↔`any`, `True`↔`False`.

Each mutant runs the test files that cover its module (`COVERING`, the default test command's
markers: slow tests excluded) and, with `--map` (made by `tools/coverage_map.py` at HEAD),
every other default test file that executes the mutated line, with `-x`; it is *killed* if
they fail or time out, *survived* if they pass. The score is killed / (killed + survived);
the survivors are listed with their line, to be judged equivalent (no observable change) or
not. `--sample` draws that many mutants at random (seeded) from all of them: the full set is
thousands of mutants, each a test run of tens of seconds.
"""

import argparse
import io
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Module → the test files whose failure counts (those that exercise it directly).
COVERING = {
    "conservation/_laws/base.py": ["tests/test_laws.py", "tests/test_two_sided.py"],
    "conservation/_laws/symmetry.py": ["tests/test_symmetry_laws.py", "tests/test_two_sided.py",
                                       "tests/test_thresholds.py"],
    "conservation/_laws/counting.py": ["tests/test_counting.py", "tests/test_thresholds.py"],
    "conservation/_laws/discovery.py": ["tests/test_discovery.py", "tests/test_thresholds.py"],
    "conservation/_dynamics/flow.py": [
        "tests/test_flow.py", "tests/test_statuses.py", "tests/test_two_sided.py",
        "tests/test_long_runs.py", "tests/test_momentum_flows.py",
        "tests/test_sweep.py::test_a_sharded_flow_runs_each_devices_members_there"],
    "conservation/_dynamics/train.py": ["tests/test_train.py", "tests/test_train_guards.py",
                                        "tests/test_two_sided.py", "tests/test_long_runs.py"],
    "conservation/_dynamics/monitor.py": ["tests/test_statuses.py", "tests/test_two_sided.py",
                                          "tests/test_train_guards.py", "tests/test_thresholds.py"],
    "conservation/_dynamics/solvers.py": ["tests/test_solvers.py", "tests/test_statuses.py",
                                          "tests/test_solver_work.py"],
    "conservation/_dynamics/lockstep.py": ["tests/test_flow.py", "tests/test_statuses.py",
                                           "tests/test_long_runs.py"],
    "conservation/_dynamics/unrolled.py": ["tests/test_solvers.py", "tests/test_flow.py"],
    "conservation/_dynamics/mechanics.py": ["tests/test_mechanics.py"],
    "conservation/_dynamics/batching.py": ["tests/test_memory.py", "tests/test_solvers.py"],
    "conservation/_memory.py": ["tests/test_memory.py", "tests/test_momentum_runs.py"],
    "conservation/_data/objective.py": ["tests/test_objective.py", "tests/test_augmentation.py"],
    "conservation/_data/groups.py": ["tests/test_groups.py"],
    # The frontier modules (momentum, mirror and central flows, observables, transformers).
    "conservation/_dynamics/fields.py": ["tests/test_momentum_flows.py",
                                         "tests/test_momentum_runs.py"],
    "conservation/_dynamics/central.py": ["tests/test_central_flow.py"],
    "conservation/_dynamics/observables.py": ["tests/test_observables.py"],
    "conservation/_laws/phase_space.py": ["tests/test_momentum_flows.py",
                                          "tests/test_momentum_runs.py",
                                          "tests/test_two_sided.py"],
    "conservation/_laws/flows.py": [
        "tests/test_count_flows.py",
        "tests/test_counting.py::test_a_dead_neuron_under_momentum_keeps_two_laws_per_frozen_weight"],
    "conservation/_laws/generators.py": ["tests/test_generators.py"],
    "conservation/_laws/blocks.py": ["tests/test_transformer_models.py"],
}
# The tests written from the coverage run's list of lines no default test executed
# (tools/coverage_map.py), by module.
_PATHS = {
    "conservation/_dynamics/flow.py": ["tests/test_dynamics_paths.py"],
    "conservation/_dynamics/train.py": ["tests/test_dynamics_paths.py"],
    "conservation/_dynamics/lockstep.py": ["tests/test_dynamics_paths.py"],
    "conservation/_dynamics/solvers.py": ["tests/test_dynamics_paths.py"],
    "conservation/_dynamics/monitor.py": ["tests/test_dynamics_paths.py"],
    "conservation/_dynamics/observables.py": ["tests/test_dynamics_paths.py"],
    "conservation/_laws/flows.py": ["tests/test_flow_kinds_paths.py"],
    "conservation/_dynamics/fields.py": ["tests/test_flow_kinds_paths.py"],
    "conservation/_laws/counting.py": ["tests/test_counting_paths.py"],
    "conservation/_laws/discovery.py": ["tests/test_counting_paths.py"],
    "conservation/_laws/symmetry.py": ["tests/test_symmetry_paths.py"],
    "conservation/_laws/generators.py": ["tests/test_symmetry_paths.py"],
    "conservation/_data/groups.py": ["tests/test_symmetry_paths.py"],
    "conservation/_laws/blocks.py": ["tests/test_symmetry_paths.py"],
}
COVERING = {name: [*tests, *_PATHS.get(name, [])] for name, tests in COVERING.items()}
# Every module's Modules keep their sizes and names static (a 10 s check, run first).
COVERING = {name: ["tests/test_module_fields.py", *tests] for name, tests in COVERING.items()}

SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-",
         "-": "+", "*": "/", "/": "*", "**": "*"}
NAMES = {"max": "min", "min": "max", "all": "any", "any": "all", "True": "False",
         "False": "True"}


def mutants(path: pathlib.Path, relative: str):
    """Every mutant of one file: (file, line, column, old token, new token)."""
    source = path.read_text()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    out = []
    for tok in tokens:
        kind, text, (line, col) = tok.type, tok.string, tok.start
        new = None
        if kind == tokenize.OP and text in SWAPS:
            new = SWAPS[text]
        elif kind == tokenize.NAME and text in NAMES:
            new = NAMES[text]
        elif kind == tokenize.NUMBER and text.isdigit():
            new = str(int(text) + 1)
        elif kind == tokenize.NUMBER and text.replace(".", "", 1).replace("e-", "", 1) \
                .replace("e", "", 1).isdigit():
            new = repr(2 * float(text)) if float(text) else "1.0"
        if new is not None:
            out.append({"file": relative, "line": line, "col": col, "old": text, "new": new})
    return out


def apply(source: str, m: dict) -> str:
    lines = source.splitlines(keepends=True)
    text = lines[m["line"] - 1]
    assert text[m["col"]:m["col"] + len(m["old"])] == m["old"]
    lines[m["line"] - 1] = text[:m["col"]] + m["new"] + text[m["col"] + len(m["old"]):]
    return "".join(lines)


def run_tests(work: pathlib.Path, tests: list[str], timeout: float, cache: pathlib.Path) -> str:
    # One compilation cache for every mutant: programs the mutant does not change are loaded,
    # the mutated ones (a different program) compile afresh.
    env = {**os.environ, "PYTHONPATH": str(work), "CONSERVATION_CACHE_DIR": str(cache)}
    env.pop("CONSERVATION_NO_CACHE", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
                               "-p", "no:cacheprovider", *tests], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if proc.returncode == 0 else "failed"


def _survivors_now(path: str, work: pathlib.Path) -> list[dict]:
    """The survivors recorded in the result file `path`, located in HEAD's code: the same
    token, at the same place in the first line whose code is the recorded line's (lines move
    between commits). A survivor whose line no longer exists is reported and left out."""
    record = json.loads(pathlib.Path(path).read_text())
    found = []
    for old in record["mutants"]:
        if old["result"] != "survived":
            continue
        then = subprocess.run(["git", "show", f"{record['commit']}:{old['file']}"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.splitlines()
        line = then[old["line"] - 1]
        offset = old["col"] - (len(line) - len(line.lstrip()))  # within the stripped code
        lines = (work / old["file"]).read_text().splitlines()
        at = [i for i, now in enumerate(lines) if now.strip() == old["code"]]
        if not at:
            print(f"gone: {old['file']}:{old['line']} {old['code'][:60]}", flush=True)
            continue
        indent = len(lines[at[0]]) - len(lines[at[0]].lstrip())
        found.append({"file": old["file"], "line": at[0] + 1, "col": indent + offset,
                      "old": old["old"], "new": old["new"], "replayed_from": path})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=40, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    parser.add_argument("--files", nargs="*", default=sorted(COVERING),
                        help="modules to mutate (default: the numeric core)")
    parser.add_argument("--out", default="benchmarks/results/mutation.json")
    parser.add_argument("--map", default=None, metavar="JSON",
                        help="a `tools/coverage_map.py` map of HEAD: also run every default "
                             "test file that executes the mutated line")
    parser.add_argument("--replay", nargs="*", default=None, metavar="JSON",
                        help="instead of sampling, run again the survivors of earlier result "
                             "files on HEAD (found by their line's code, wherever it moved)")
    args = parser.parse_args(argv)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = []
    out = ROOT / args.out
    reach = None
    if args.map is not None:
        reach = json.loads((ROOT / args.map).read_text())
        # Its line numbers hold while the numeric core is the same as where it was made.
        moved = subprocess.run(["git", "diff", "--quiet", reach["commit"], commit, "--",
                                *COVERING], cwd=ROOT).returncode
        if moved:
            parser.error(f"--map was made at {reach['commit'][:7]}, and the numeric core "
                         f"has changed since (HEAD {commit[:7]}): line numbers differ; run "
                         "tools/coverage_map.py again")

    def tests_for(m: dict) -> list[str]:
        # COVERING's files first (the likeliest to fail fast under -x), then the rest of the
        # default suite's files that execute the mutated statement.
        tests = list(COVERING[m["file"]])
        if reach is not None:
            line = reach["first_line"][m["file"]].get(str(m["line"]), m["line"])
            tests += [t for t in reach["lines"][m["file"]].get(str(line), [])
                      if t not in tests]
        return tests
    out.parent.mkdir(parents=True, exist_ok=True)

    def report(population: int) -> dict:
        killed = sum(r["result"] == "killed" for r in results)
        return {"commit": commit, "population": population, "sampled": len(results),
                "map": None if reach is None else reach["commit"],
                "seed": args.seed, "killed": killed, "survived": len(results) - killed,
                "timeouts": sum(r["how"] == "timeout" for r in results),
                "score": killed / len(results) if results else None, "mutants": results}

    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp) / "work"
        subprocess.run(["git", "worktree", "add", "--detach", str(work), "HEAD"], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            # The committed code (HEAD), not the checkout's uncommitted edits.
            everything = [m for f in args.files for m in mutants(work / f, f)]
            if args.replay is not None:
                chosen = [m for path in args.replay for m in _survivors_now(path, work)]
            else:
                chosen = (everything if not args.sample else random.Random(args.seed).sample(
                    everything, min(args.sample, len(everything))))
            for i, m in enumerate(chosen, 1):
                target = work / m["file"]
                original = target.read_text()
                target.write_text(apply(original, m))
                start = time.perf_counter()
                tests = tests_for(m)
                verdict = run_tests(work, tests, args.timeout, pathlib.Path(tmp) / "cache")
                target.write_text(original)
                m |= {"result": "survived" if verdict == "passed" else "killed",
                      "how": verdict, "seconds": round(time.perf_counter() - start, 1),
                      "test_files": len({t.split("::")[0] for t in tests}),
                      "code": original.splitlines()[m["line"] - 1].strip()}
                results.append(m)
                # After every mutant: a run stopped part-way keeps what it measured.
                out.write_text(json.dumps(report(len(everything)), indent=1) + "\n")
                print(f"[{i}/{len(chosen)}] {m['result']:8s} {m['file']}:{m['line']} "
                      f"{m['old']!r} -> {m['new']!r}  {m['code'][:70]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(work)], cwd=ROOT,
                           capture_output=True)
    final = report(len(everything))
    out.write_text(json.dumps(final, indent=1) + "\n")
    print(f"mutation score {final['killed']}/{len(results)} = {final['score']:.2f} "
          f"(population {len(everything)}); {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
