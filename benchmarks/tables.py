"""README tables from the benchmark JSON: `python benchmarks/tables.py ensembles`.

Prints Markdown built only from benchmarks/results/*.json, so the README's numbers are
regenerated, never retyped.
"""

import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def ensembles() -> str:
    rows = ["| device | B | members/s | steps mean/max | flow ÷ bare gradients | bare solve ÷ "
            "bare gradients | sorted chunks, members/s | torchdiffeq dopri5, members/s |",
            "|---|---|---|---|---|---|---|---|"]
    for backend in ("cpu", "gpu"):
        report = _load(f"ensembles_{backend}.json")
        if report is None:
            continue
        device = report["environment"]["device"]
        for b, entry in report["sizes"].items():
            flow, over = entry["gradient_flow"], entry["overhead"]
            chunks = entry.get("sorted_chunks", {}).get("members_per_s")
            torch = entry.get("torchdiffeq", {})
            peer = (f"{torch['members_per_s']:.1f}" if "members_per_s" in torch
                    else torch.get("failed", torch.get("skipped", "-"))[:40])
            rows.append(
                f"| {device} | {b} | {flow['members_per_s']:.1f} | "
                f"{flow['steps_mean']:.0f}/{flow['steps_max']} | "
                f"{over['flow_over_gradients']:.2f} | {over['bare_solve_over_gradients']:.2f} | "
                f"{'-' if chunks is None else f'{chunks:.1f}'} | {peer} |")
    return "\n".join(rows)


def augmentation() -> str:
    report = _load("augmentation_cpu.json")
    return json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1)


def solvers() -> str:
    report = _load("solvers_cpu.json")
    return json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1)


if __name__ == "__main__":
    print({"ensembles": ensembles, "augmentation": augmentation,
           "solvers": solvers}[sys.argv[1]]())
