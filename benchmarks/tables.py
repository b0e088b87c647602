"""Benchmark tables from the benchmark JSON: `python benchmarks/tables.py ensembles`.

Prints Markdown built only from benchmarks/results/*.json, so the documentation's numbers are
regenerated, never retyped (`benchmarks/docs_tables.py` writes them for the docs' benchmark
pages).
"""

import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _members_per_s(entry, key):
    value = entry.get(key, {}).get("members_per_s")
    return "-" if value is None else f"{value:.1f}"


def _torch(entry):
    torch = entry.get("torchdiffeq", {})
    return (f"{torch['members_per_s']:.1f}" if "members_per_s" in torch
            else torch.get("failed", torch.get("skipped", "-"))[:40])


def ensembles() -> str:
    rows = ["| device | B | members/s, B lanes | steps mean/max | B/4 lanes, refilled | one at a "
            "time | vmapped diffeqsolve (previous loop) | flow ÷ bare gradients | "
            "torchdiffeq dopri5 |", "|---|---|---|---|---|---|---|---|---|"]
    legacy = []
    for backend in ("cpu", "gpu"):
        report = _load(f"ensembles_{backend}.json")
        if report is None:
            continue
        device = report["environment"]["device"]
        for b, entry in report["sizes"].items():
            if "lanes" not in entry:  # written by the benchmark before the lanes
                legacy.append((device, b, entry))
                continue
            lanes, over = entry["lanes"], entry["overhead"]
            rows.append(
                f"| {device} | {b} | {lanes['members_per_s']:.1f} | "
                f"{lanes['steps_mean']:.0f}/{lanes['steps_max']} | "
                f"{_members_per_s(entry, 'refill')} | {_members_per_s(entry, 'one_at_a_time')} | "
                f"{_members_per_s(entry, 'diffrax_vmap')} | {over['flow_over_gradients']:.2f} | "
                f"{_torch(entry)} |")
    if legacy:
        rows += ["", "Measured with the loop before the lanes (`jax.vmap` of diffrax's solve, "
                 "diffrax's Tsit5 stage loop):", "",
                 "| device | B | members/s | steps mean/max | flow ÷ bare gradients | bare solve ÷ "
                 "bare gradients | sorted chunks, members/s | torchdiffeq dopri5, members/s |",
                 "|---|---|---|---|---|---|---|---|"]
        for device, b, entry in legacy:
            flow, over = entry["gradient_flow"], entry["overhead"]
            rows.append(
                f"| {device} | {b} | {flow['members_per_s']:.1f} | "
                f"{flow['steps_mean']:.0f}/{flow['steps_max']} | "
                f"{over['flow_over_gradients']:.2f} | {over['bare_solve_over_gradients']:.2f} | "
                f"{_members_per_s(entry, 'sorted_chunks')} | {_torch(entry)} |")
    return "\n".join(rows)


def core() -> str:
    report = _load("core_cpu.json")
    base = report["moments"]
    rows = ["| variant | run [s] | ratio |", "|---|---|---|"]
    for label, key in (
            (f"conservation, moment fast path (compile {base['compile_s']:.1f} s)", "moments"),
            ("same, all 64 members side by side in lanes (`batch_size=64`)",
             "moments_vmap_all"),
            ("same, Python loop of one-member calls", "moments_one_at_a_time"),
            ("conservation, per-sample loss (no moments)", "per_sample"),
            ("scipy `solve_ivp` RK45 loop, hand-written numpy gradient", "scipy_rk45_loop")):
        run = report[key]["run_s"]
        rows.append(f"| {label} | {run:.2f} | {run / base['run_s']:.2f} |")
    rows += ["", f"All core variants take {base['steps_mean']:.0f} steps on average and keep "
             f"the balance laws to {base['max_balance_drift']:.1e} (scipy "
             f"{report['scipy_rk45_loop']['max_balance_drift']:.1e}). Machine: "
             f"{report['environment']['cpu_count']} cores, jax "
             f"{report['environment']['versions']['jax']}."]
    return "\n".join(rows)


def augmentation() -> str:
    report = _load("augmentation_cpu.json")
    return json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1)


def counting() -> str:
    import collections
    import statistics

    report = _load("counting_cpu.json")
    cold = _load("counting_linear_cpu.json")  # `--only linear`: no warm-up before it
    configs = report["configs"]
    rows = ["| | total | total, cold (`--only linear`) | median | verdicts | correct |",
            "|---|---|---|---|---|---|"]
    for label, kind, mode, total in (
            ("linear, proof (`pad_to=(4, 5)`, compile included)", "linear", "proof",
             "linear_proof"),
            ("linear, estimate (`known_laws=False`)", "linear", "estimate", "linear_estimate"),
            ("ReLU (default arguments)", "relu", None, "relu")):
        entries = [c[mode] if mode else c for c in configs if c["kind"] == kind]
        verdicts = collections.Counter(e["verdict"] for e in entries)
        correct = sum(c["correct"] for c in configs if c["kind"] == kind)
        median = statistics.median(e["seconds"] for e in entries)
        cold_total = cold["total_seconds"][total] if cold and kind == "linear" else None
        rows.append(f"| {label} | {report['total_seconds'][total]:.1f} s | "
                    f"{'-' if cold_total is None else f'{cold_total:.1f} s'} | "
                    f"{median:.2f} s | "
                    + ", ".join(f"{n} {v}" for v, n in verdicts.most_common())
                    + f" | {correct}/{len(entries)} |")
    repeat = report["repeat"]
    rows.append("")
    rows.append(f"A repeated count of the same shapes ({', '.join(map(str, repeat['widths']))}, "
                f"unpadded): {repeat['first_s']:.2f} s first, {repeat['repeat_s']:.3f} s "
                f"repeated ({repeat['speedup']:.0f}×). Machine: "
                f"{report['environment']['cpu_count']} cores, jax "
                f"{report['environment']['versions']['jax']}.")
    return "\n".join(rows)


def _large_model_rows(large) -> list[str]:
    if not large:
        return []
    p = large["problem"]
    rows = ["", f"Deep linear {'-'.join(map(str, p['widths']))} ({p['num_params']} "
            f"parameters), n = {p['n']}, t1 = {p['t1']:g}, rtol = {p['rtol']:g}:", "",
            "| solver | steps | gradient evaluations | run [s] | loss ÷ start | "
            "max law drift |",
            "|---|---|---|---|---|---|"]
    for name, run in large.items():
        if name == "problem":
            continue
        if isinstance(run, str):
            rows.append(f"| {name} | {run} | | | | |")
            continue
        compile_note = " (with compile)" if run.get("run_includes_compile") else ""
        rows.append(f"| {name} | {run['steps_mean']:.0f} | {run['grad_evals_mean']:.3g} | "
                    f"{run['run_s']:.3g}{compile_note} | "
                    f"{run['final_loss_over_start_max']:.1e} | {run['max_drift']:.1e} |")
    return rows


def solvers_large() -> str:
    report = _load("solvers_large_model_cpu.json")
    env = report["environment"]
    large = report["large_model"]
    rock, tsit = large["stabilized"], large["tsit5"]
    return "\n".join(_large_model_rows(large)[1:] + [
        "", f"Stabilized ÷ Tsit5: {tsit['grad_evals_mean'] / rock['grad_evals_mean']:.1f}× fewer "
        f"gradient evaluations, {tsit['run_s'] / rock['run_s']:.1f}× less time, drift "
        f"{rock['max_drift']:.1e} vs {tsit['max_drift']:.1e}. Machine: {env['device']}, "
        f"{env['cpu_count']} cores, jax {env['versions']['jax']}."])


def _attention_rows(attention) -> list[str]:
    problem = attention["problem"]
    rows = []
    for batch, entry in attention.items():
        if not batch.startswith("B"):
            continue
        auto = entry.get("auto_choice")
        rows += [f"Attention d = {problem['d']}, {problem['tokens']} tokens, n = {problem['n']}, "
                 f"t1 = {problem['t1']:g}, {batch[1:]} members, Tsit5 capped at "
                 f"{problem['max_steps']} steps; "
                 + (f"`auto` chose `{auto['name']}`:" if auto
                    else "`auto`'s choice not recorded:"),
                 "",
                 "| solver | rtol | members | status | steps | gradient evaluations / member "
                 "(mean, max) | rejected | run [s] | max law drift |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for name, run in entry.items():
            if name in ("auto_choice", "targets"):
                continue
            evals = run.get("grad_evals_mean")
            evals = ("-" if evals is None else f"{evals:.3g}"
                     + (f", {run['grad_evals_max']:.3g}" if "grad_evals_max" in run else ""))
            rejected = run.get("rejected_fraction")
            status = ", ".join(f"{n} {k}" for k, n in run["status_counts"].items())
            compile_note = " (with compile)" if run.get("run_includes_compile") else ""
            # A member stopped at max_steps saved nothing after its stop: its drift covers a
            # part of the flow only and must not read as a whole-flow figure.
            drift = (f"{run['max_drift']:.1e}" if run["all_reached_t1"]
                     else "- (stopped before t1)")
            rows.append(f"| {name} | {run['rtol']:.1e} | {run.get('members', '-')} | {status} | "
                        f"{run['steps_mean']:.0f} | "
                        f"{evals} | {'-' if rejected is None else f'{rejected:.0%}'} | "
                        f"{run['run_s']:.3g}{compile_note} | {drift} |")
        t = entry.get("targets")
        if t is None:  # a run stopped at its time limit: the rows that finished
            continue
        rows += ["", "Targets: " + "; ".join(
            f"{k.replace('_', ' ')} = {v:.3g}" if isinstance(v, float) else
            f"{k.replace('_', ' ')} = {v}" for k, v in t.items()) + "."]
    return rows


def solvers_attention() -> str:
    rows = []
    for name in ("solvers_stiff_attention_cpu.json", "solvers_stiff_attention_B256_cpu.json",
                 "solvers_stiff_attention_B16_gpu.json", "solvers_stiff_attention_B256_gpu.json",
                 "solvers_stiff_attention_B16_partial_gpu.json",
                 "solvers_stiff_attention_B256_partial_gpu.json"):
        report = _load(name)
        if report is None:  # the GPU's: only where a session was lent one
            continue
        env = report["environment"]
        partial = ([f"Partial: {report['recovered_from_log']}", ""]
                   if "recovered_from_log" in report else
                   ["Partial: the rows finished before the time limit.", ""]
                   if report.get("complete") is False else [])
        rows += [f"`{name}`:", ""] + partial + _attention_rows(report["stiff_attention"]) + [
            "", f"Machine: {env['device']}, {env['cpu_count']} cores, jax "
            f"{env['versions']['jax']}" + (f", {env['platform_version']}"
                                           if env.get("platform_version") else "")
            + (f", commit {env['commit'][:7]}" if env.get("commit") else "") + ".", ""]
    return "\n".join(rows).strip()


def memory() -> str:
    report = _load("memory_gpu.json")
    if report is None:
        return "No accelerator run yet (`bash benchmarks/gpu_check.sh memory`)."
    env = report["environment"]
    rows = ["| flow | members | solver | parameters / member | default `batch_size` | status | "
            "peak − before [GB] | estimate [GB] | peak ÷ estimate | largest part of the "
            "estimate |", "|---|---|---|---|---|---|---|---|---|---|"]
    limits = []
    for label, case in report["cases"].items():
        if "failed" in case:  # out of memory or another failure (bench_memory keeps the rest)
            rows.append(f"| {label} | failed: {' '.join(case['failed'])[:200]} |"
                        + " |" * 8)
            continue
        limits.append(case["bytes_limit"])
        used = (case["peak_bytes_in_use"] - case["bytes_in_use_before"]) / 1e9
        status = ", ".join(f"{n} {k}" for k, n in case["status"].items() if n)
        part = max(case["estimate_parts"], key=case["estimate_parts"].get)
        rows.append(
            f"| {'-'.join(map(str, case['widths']))}, n = {case['n']} | {case['members']} | "
            f"{case['solver']} | {case['parameters']} | {case['batch_size_default']} | {status} | "
            f"{used:.2f} | {case['estimate_bytes'] / 1e9:.2f} | "
            f"{case['peak_minus_before_over_estimate']:.2f} | {part} "
            f"({case['estimate_parts'][part] / 1e9:.2f}) |")
    limit = f" ({limits[0] / 2**30:.0f} GiB for JAX)" if limits else ""
    return "\n".join(rows + ["", f"Machine: {env['device']}{limit}, jax "
                             f"{env['versions']['jax']}, {env.get('platform_version', '')}, "
                             f"commit {env['commit'][:7]}."])


def solvers_auto_probe() -> str:
    report = _load("solvers_auto_probe_cpu.json")
    probe = report["auto_probe"]
    rows = ["| flow (t1 = 50) | choice | ρ_max | probe stopped at t | first call [s] "
            "(with compile) | warm, per member [s] |", "|---|---|---|---|---|---|"]
    for label, entry in probe.items():
        if isinstance(entry, dict):
            rows.append(f"| {label} | {entry['name']} | {entry['rho_max']:.3g} | "
                        f"{entry['probe_t']:.3g} | {entry['first_call_s']:.2f} | "
                        f"{entry['warm_mean_s']:.3f} |")
    env = report["environment"]
    return "\n".join(rows + ["", f"Machine: {env['device']}, {env['cpu_count']} cores, jax "
                             f"{env['versions']['jax']}."])


def solvers_quick() -> str:
    report = _load("solvers_quick_cpu.json")
    rows = _attention_rows(report["stiff_attention"])
    rows += _large_model_rows(report.get("large_model"))
    env = report["environment"]
    rows += ["", f"Machine: {env['device']}, {env['cpu_count']} cores, jax "
             f"{env['versions']['jax']}."]
    return "\n".join(rows)


_LANES_FLOWS = {
    "dln_small": "deep linear 16-32-32-8, n = 128",
    "attention_small_tsit5": "attention d = 4, 6 tokens, n = 16, t1 = 1",
    "attention_small_stabilized": "attention d = 4, 6 tokens, n = 16",
    "attention_small_kvaerno5": "attention d = 4, 6 tokens, n = 16",
    "attention_stabilized": "attention d = 8, 16 tokens, n = 64",
    "dln_mid": "deep linear 64-128-128-32, n = 512, t1 = 20",
    "dln_large": "deep linear 128-256-256-32, n = 4096, t1 = 20",
}


def lanes() -> str:
    report = _load("lanes_cpu.json")
    rows = ["| flow | solver | parameters | B | members/s, 1 lane | 2 lanes | 4 lanes | gradient "
            "cost per member, 2 / 4 lanes ÷ 1 | steps mean/max (1 lane) | final θ, lanes vs 1 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, flow in report["flows"].items():
        problem, by = flow["problem"], flow["lanes"]

        def rate(k, by=by):
            entry = by.get(k)
            return "-" if entry is None else (
                f"{entry['members_per_s']:.2f}" if k == "1" else
                f"{entry['members_per_s']:.2f} ({entry['speedup_over_one_lane']:.2f}×)")

        def cost(k, by=by):  # a flow with fewer than 4 members has no 4-lane entry
            entry = by.get(k)
            return "-" if entry is None else f"{entry['gradient_cost_over_one_lane']:.2f}"

        one = by["1"]
        diff = max(e["max_final_diff_to_one_lane"] for e in by.values())
        rows.append(
            f"| {_LANES_FLOWS.get(name, name)} | {problem['solver']} | {problem['parameters']} | "
            f"{problem['members']} | {rate('1')} | {rate('2')} | {rate('4')} | "
            f"{cost('2')} / {cost('4')} | "
            f"{one['steps_mean']:.0f}/{one['steps_max']} | {diff:.0e} |")
    env = report["environment"]
    rows += ["", f"Machine: {env['device']}, {env['cpu_count']} cores, jax "
             f"{env['versions']['jax']}."]
    return "\n".join(rows)


def solvers() -> str:
    report = _load("solvers_cpu.json")
    return json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1)


if __name__ == "__main__":
    print({"core": core, "ensembles": ensembles, "augmentation": augmentation, "counting": counting,
           "solvers_quick": solvers_quick, "solvers_large": solvers_large,
           "solvers_attention": solvers_attention, "solvers_auto_probe": solvers_auto_probe,
           "solvers": solvers, "lanes": lanes, "memory": memory}[sys.argv[1]]())
