"""The whole benchmark suite, one command: `python benchmarks/run_all.py [--quick]`.

Runs every bench_*.py script here in a fresh process (threads pinned by _harness, compile
time reported apart, JSON to benchmarks/results/) and prints where each result went.
`--quick` passes the scripts' smallest settings (for a smoke run).
"""

import argparse
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
QUICK = {"bench_core.py": ["--members", "8", "--repeats", "1"],
         "bench_augmentation.py": ["--samples", "256", "--repeats", "1"],
         "bench_counting.py": ["--configs", "3"],
         "bench_solvers.py": ["--quick", "--repeats", "1"],
         "bench_ensembles.py": ["--quick", "--repeats", "1", "--no-torch"],
         "bench_lanes.py": ["--quick"],
         "bench_memory.py": ["--quick"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failures = []
    for script in sorted(HERE.glob("bench_*.py")):
        start = time.perf_counter()
        extra = QUICK.get(script.name, []) if args.quick else []
        done = subprocess.run([sys.executable, str(script), *extra], cwd=HERE)
        status = "ok" if done.returncode == 0 else f"FAILED ({done.returncode})"
        print(f"== {script.name}: {status} in {time.perf_counter() - start:.0f} s")
        if done.returncode:
            failures.append(script.name)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
