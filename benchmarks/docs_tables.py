"""The benchmark pages' tables, generated from benchmarks/results/*.json.

    python benchmarks/docs_tables.py            # rewrite benchmarks/results/tables/*.md
    python benchmarks/docs_tables.py --check    # exit 1 if a committed table is stale

Each table is one Markdown fragment in `benchmarks/results/tables/`; the documentation's
benchmark pages include them with `--8<-- "benchmarks/results/tables/<name>.md"`
(pymdownx.snippets), so a number on those pages comes from the JSON, never retyped.
`tests/test_docs.py` checks that the committed fragments equal a fresh generation.
"""

import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results" / "tables"


def tables_module():
    """benchmarks/tables.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_benchmark_tables", HERE / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def augmentation(t) -> str:
    report = t._load("augmentation_cpu.json")
    by_n, ratios = report["run_s_vs_base_sequences"], report["ratios"]
    agree, problem = report["agreement"], report["problem"]
    orbit = " / ".join(f"{by_n[n]['orbit_expansion']:.3g}" for n in by_n
                       if "orbit_expansion" in by_n[n])
    orbit_ns = " / ".join(n for n in by_n if "orbit_expansion" in by_n[n])
    sym = " / ".join(f"{by_n[n]['symmetrised']:.2f}" for n in by_n)
    moments = report["loss_and_gradient_moments"]["run_s"]
    per_sample = report["loss_and_gradient_per_sample"]["run_s"]
    rows = ["| step | run [s] |", "|---|---|",
            f"| moments (factored, TSQR) from the orbit-expanded data ({orbit_ns} base "
            f"sequences) | {orbit} |",
            f"| moments symmetrised over the {problem['group_samples']} samples "
            f"({' / '.join(by_n)} base sequences) | {sym} |",
            f"| exact O({problem['d']}) projection (orthonormal invariant basis) | "
            f"{report['moments_exact_O8_projection']['run_s']:.2g} "
            f"({ratios['orbit_over_exact']:.0f}× faster than the orbit, and exact) |",
            f"| exact O(2) projection of the sextic neuron's 12-axis moments | "
            f"{report['moments_exact_O2_sextic_projection']['run_s']:.2g} |",
            f"| one loss + gradient: moments / per sample over "
            f"{problem['augmented_sequences']} sequences | {moments:.1g} / {per_sample:.3g} "
            f"({ratios['per_sample_over_moments_gradient']:.0f}×) |",
            "",
            f"Orbit-expanded and symmetrised moments agree to "
            f"{agree['orbit_vs_symmetrised_relative']:.1e}; the symmetry defect is "
            f"{agree['defect_exact']:.1e} exact and {agree['defect_sampled']:.2g} for the "
            f"{problem['group_samples']} samples. Machine: "
            f"{report['environment']['cpu_count']} cores, jax "
            f"{report['environment']['versions']['jax']}."]
    return "\n".join(rows)


_LATENCY_CASES = {
    "import_no_cache": "`import conservation`",
    "readme_no_cache": "README example, no cache",
    "readme_cold": "README example, cold cache",
    "readme_warm": "README example, warm cache",
    "quickstart_cold": "`conservation run` quickstart, cold",
    "quickstart_warm": "`conservation run` quickstart, warm",
}


def latency(t) -> str:
    report = t._load("latency_cpu.json")
    now, before = report["results"]["current"], report["results"]["baseline"]
    rows = ["| case | before [s] | after [s] | after ÷ before | after, each round [s] | "
            "programs before → after | compile/load [s] before → after | "
            "exit [s] before → after | ml_dtypes before → after |",
            "|---|---|---|---|---|---|---|---|---|"]

    def rounds(e):
        return " / ".join(f"{r['wall_s']:.1f}" for r in e["rounds"])

    def exit_s(e):
        return f"{e['exit_s']:.2f}" if "exit_s" in e else "?"

    for key, entry in now.items():
        if not isinstance(entry, dict):  # ml_dtypes_import_s: a number, below the table
            continue
        old = before[key]
        rows.append(f"| {_LATENCY_CASES.get(key, key)} | {old['wall_s']:.1f} | "
                    f"{entry['wall_s']:.1f} | {entry['wall_s'] / old['wall_s']:.2f} | "
                    f"{rounds(entry)} | "
                    f"{old['programs']} → {entry['programs']} | {old['compile_s']:.1f} → "
                    f"{entry['compile_s']:.1f} | {exit_s(old)} → {exit_s(entry)} | "
                    f"{old.get('ml_dtypes', '?')} → {entry.get('ml_dtypes', '?')} |")
    env = report["environment"]
    goals = ", ".join(f"{_LATENCY_CASES.get(k, k)} ≤ {v:g} s" for k, v in report["goal_s"].items())
    rows += [""]
    if "ml_dtypes_import_s" in now:
        rows += [f"`import ml_dtypes` alone (after numpy): {before['ml_dtypes_import_s']:.3f} s "
                 f"before, {now['ml_dtypes_import_s']:.3f} s after. Exit: from the last exit "
                 "handler to the end of the process (the interpreter's teardown).", ""]
    rows += [f"Goals: {goals}. Before and after: the best of {report['rounds']} interleaved "
             f"round(s), measured at "
             f"commit {env['commit'][:7]}. Machine: {env['device']}, {env['cpu_count']} cores, "
             f"jax {env['versions']['jax']}."]
    return "\n".join(rows)


def mutation(t) -> str:
    """The latest sample (seed 2), its survivors replayed on a later commit, and the survivors
    judged equivalent (`mutation_judgments.json`, each with its reason)."""
    sample = t._load("mutation_sample_seed2.json")
    # The survivors replayed after the tests that followed the sample; the second file
    # replays the three that survived the first replay and got a test after it.
    replays = [t._load(name) for name in ("mutation_replay_seed2.json",
                                          "mutation_replay_seed2b.json")]
    judged = t._load("mutation_judgments.json")["equivalent"]

    def key(m):
        return m["file"], m["code"], m["old"], m["new"]

    def equivalent(m):
        return any(m["file"] == j["file"] and m["code"].startswith(j["code_starts"])
                   and (m["old"], m["new"]) == (j["old"], j["new"]) for j in judged)

    replayed = {key(m): m["result"] for r in replays for m in r["mutants"]}
    by_file = {}
    for m in sample["mutants"]:
        row = by_file.setdefault(m["file"], [0, 0, 0, 0])  # killed, killed on replay, eq., left
        if m["result"] == "killed":
            row[0] += 1
        elif replayed.get(key(m)) == "killed":
            row[1] += 1
        elif equivalent(m):
            row[2] += 1
        else:
            row[3] += 1
    rows = ["| module | killed | killed on replay | equivalent | survived |",
            "|---|---|---|---|---|"]
    rows += [f"| `{name}` | {a} | {b} | {c} | {d} |"
             for name, (a, b, c, d) in sorted(by_file.items())]
    killed = sum(r[0] + r[1] for r in by_file.values())
    eq = sum(r[2] for r in by_file.values())
    left = sum(r[3] for r in by_file.values())
    rows += ["", f"{sample['sampled']} mutants sampled (seed {sample['seed']}) of "
             f"{sample['population']} at commit {sample['commit'][:7]}: {sample['killed']} "
             f"killed there; the {sample['survived']} survivors replayed at commits "
             f"{' and '.join(r['commit'][:7] for r in replays)}: "
             f"{killed - sample['killed']} killed. {eq} judged "
             f"equivalent, {left} surviving: **{killed} of {killed + left} non-equivalent "
             f"mutants killed ({killed / (killed + left):.0%})**."]
    return "\n".join(rows)


def train(t) -> str:
    report = t._load("train_cpu.json")
    tim, problem, agree = report["timings"], report["problem"], report["agreement"]
    env = report["environment"]
    rows = ["| run | run [s] | compile [s] |", "|---|---|---|",
            f"| `conservation.train` | {tim['train']['run_s']:.3f} | "
            f"{tim['train']['compile_s']:.1f} |",
            f"| hand-written `lax.scan` (same update and drift) | {tim['scan']['run_s']:.3f} | "
            f"{tim['scan']['compile_s']:.1f} |",
            "",
            f"train ÷ scan: {report['train_over_scan']:.2f}× (goal ≤ 1.1×) for "
            f"{problem['members']} members × {problem['steps']} steps of GD (lr "
            f"{problem['lr']:g}) on the deep linear net {problem['widths']}, the drift of "
            f"{', '.join(problem['laws'])} at every step; final parameters differ by "
            f"{agree['final_params_max_abs_diff']:.1g}, worst drifts by "
            f"{agree['max_drift_max_rel_diff']:.1g} (relative). Best of the interleaved "
            f"rounds, at commit {(env['commit'] or '?')[:7]}; machine: {env['cpu_count']} "
            f"cores, jax {env['versions']['jax']}."]
    return "\n".join(rows)


def overhead(t) -> str:
    report = t._load("overhead_cpu.json")
    problem, env, rounds = report["problem"], report["environment"], report["rounds_s"]
    median, bare = report["median_s"], report["median_s"]["bare_gradients"]

    def per_round(name):
        return " / ".join(f"{v / b:.2f}" for v, b in zip(rounds[name],
                                                          rounds["bare_gradients"]))

    rows = ["| run | median [s] | ÷ bare gradients (median) | each round |",
            "|---|---|---|---|",
            f"| `gradient_flow` ({problem['n_save']} saves of the loss and "
            f"{', '.join(problem['laws'])}) | "
            f"{median['flow']:.3f} | {report['flow_over_bare_median']:.2f}× | "
            f"{per_round('flow')} |",
            f"| without saves or laws (`n_save=2, laws=()`) | {median['flow_no_saves']:.3f} | "
            f"{report['no_saves_over_bare_median']:.2f}× | {per_round('flow_no_saves')} |"]
    if "solver_loop" in median:  # the Runge–Kutta step and its controller alone
        rows.append(f"| the solver alone (`fori_loop` of the flow's step attempts, same lanes "
                    f"and steps) | {median['solver_loop']:.3f} | "
                    f"{report['solver_loop_over_bare_median']:.2f}× | "
                    f"{per_round('solver_loop')} |")
    rows.append(f"| the bare gradients (`fori_loop`, same width and count) | {bare:.3f} | 1× "
                "| — |")
    if "flow_2_lanes" in median:  # the previous CPU default, against its own bare gradients
        bare2 = median["bare_gradients_2_lanes"]
        rows += [
            f"| `gradient_flow` on 2 lanes (`batch_size=2`) | {median['flow_2_lanes']:.3f} | "
            f"{report['flow_2_lanes_over_bare_2_lanes_median']:.2f}× (of the bare gradients "
            f"at 2 lanes) | " + " / ".join(f"{v / b:.2f}" for v, b in zip(
                rounds["flow_2_lanes"], rounds["bare_gradients_2_lanes"])) + " |",
            f"| the bare gradients at 2 lanes | {bare2:.3f} | 1× | — |",
            "", f"The default ({problem['batch_size']} lanes) takes "
            f"{report['flow_over_flow_2_lanes_median']:.2f}× the wall time of 2 lanes."]
    if "step_floor" in report:  # the lanes alone, on a field that costs nothing
        floor = report["step_floor"]
        rows += ["", f"The lanes alone (Tsit5 on dy/dt = −c⊙y, {floor['parameters']} "
                 f"parameters, {floor['lanes']} lanes): {floor['us_per_step']:.1f} µs a step "
                 f"of all lanes ({floor['us_per_step_16_parameters']:.1f} µs at 16 "
                 f"parameters), {floor['at_flow_steps_s']:.3f} s at the flow's steps, against "
                 f"{floor['flow_minus_bare_s']:.3f} s of the flow over its bare gradients."]
    if "arithmetic" in report:  # XLA's flop count of each part, against the bare loop's
        work = report["arithmetic"]
        extra = work["extra_over_bare"]
        rows += ["", f"XLA's flop count (`cost_analysis`), against the bare loop's "
                 f"{work['bare_flops'] / 1e9:.1f} GFLOP: the solver's steps beyond their "
                 f"gradients add {100 * extra['solver']:.1f} % "
                 f"({work['flops']['step_beyond_gradients'] / work['flops']['parameters']:.0f}"
                 f" flops per parameter and step; a gradient is "
                 f"{work['flops']['gradient'] / work['flops']['parameters']:.0f}), the laws at "
                 f"the {work['member_saves']} member-saves {100 * extra['laws']:.1f} % "
                 f"({work['flops']['save_laws'] / work['flops']['gradient']:.2f} of a gradient "
                 f"each), the saved losses {100 * extra['losses']:.1f} %: "
                 f"{100 * sum(extra.values()):.0f} % more arithmetic in all. The bare loop "
                 f"computes {work['bare_gflops_per_s']:.1f} GFLOP/s, " + (
                     f"the solver loop its extra at {rate:.1f} GFLOP/s."
                     if (rate := work["solver_loop_extra_gflops_per_s"]) is not None else
                     "and the solver loop measured no slower than it (noise).")]
    rows += ["",
            f"Goal ≤ {report['goal_flow_over_bare']:g}×. Deep linear {problem['widths']}, "
            f"{problem['members']} members, t1 = {problem['t1']:g}, rtol {problem['rtol']:g}, "
            f"Tsit5 on {problem['batch_size']} lanes: {problem['member_gradients']} member "
            f"gradients. {report['rounds']} interleaved rounds; load average "
            f"{report['load_average'][0]:.1f}; CPU-time ratios "
            f"{report['flow_over_bare_median_cpu']:.2f}× / "
            f"{report['no_saves_over_bare_median_cpu']:.2f}×; at commit "
            f"{(env['commit'] or '?')[:7]}, {env['cpu_count']} cores, jax "
            f"{env['versions']['jax']}."]
    return "\n".join(rows)


FRESH_SAMPLES = ("mutation_sample_seed3.json", "mutation_sample_seed4.json",
                 "mutation_sample_seed5.json", "mutation_sample_seed6.json",
                 "mutation_sample_seed7.json", "mutation_sample_seed8.json",
                 "mutation_sample_seed9.json", "mutation_sample_seed10.json",
                 "mutation_sample_seed11.json", "mutation_sample_seed12.json",
                 "mutation_sample_seed13.json")


def mutation_fresh(t) -> str:
    """Each fresh sample on the code of its commit: the unbiased raw score, per module, with
    the survivors listed for judgment (`mutation_judgments.json`'s `fresh` entries:
    equivalent)."""
    judged = t._load("mutation_judgments.json").get("fresh", [])
    out = []
    for name in FRESH_SAMPLES:
        sample = t._load(name)
        if sample is None:
            continue
        by_file, left = {}, []
        for m in sample["mutants"]:
            row = by_file.setdefault(m["file"], [0, 0, 0])  # killed, equivalent, survived
            eq = any(m["file"] == j["file"] and m["code"].startswith(j["code_starts"])
                     and (m["old"], m["new"]) == (j["old"], j["new"]) for j in judged)
            row[0 if m["result"] == "killed" else 1 if eq else 2] += 1
            if m["result"] != "killed" and not eq:
                left.append(m)
        killed = sum(r[0] for r in by_file.values())
        counted = killed + len(left)
        out += [f"**Seed {sample['seed']}**: {len(sample['mutants'])} mutants sampled of "
                f"{sample['population']} at commit {sample['commit'][:7]}, run once on that "
                f"code" + (" with every default test file that executes the mutated line "
                           "(`--map`)" if sample.get("map") else " with `COVERING`'s files")
                + f": **{killed} of {counted} non-equivalent mutants killed "
                f"({killed / counted:.0%})**.", "",
                "| module | killed | equivalent | survived |", "|---|---|---|---|"]
        out += [f"| `{f}` | {a} | {b} | {c} |" for f, (a, b, c) in sorted(by_file.items())]
        if left:
            out += ["", "Surviving, not judged equivalent:", ""]
            out += [f"- `{m['file']}:{m['line']}` `{m['old']}` → `{m['new']}` in "
                    f"`{m['code'][:70]}`" for m in left]
        out += [""]
    return "\n".join(out).rstrip()


COUNT_SETS = {"linear": "linear, heavy-ball momentum", "relu_paths":
              "ReLU path fields, momentum", "nmf": "NMF, mirror flow", "nmf_momentum":
              "NMF, mirror flow with momentum", "icnn": "ICNN, mirror flow", "icnn_momentum":
              "ICNN, mirror flow with momentum"}


def count_flows(t) -> str:
    """Each measured set of "Keep the momentum"'s notebook: time against its Sage run, and the
    verdicts and law counts of its configurations."""
    report = t._load("count_flows_cpu.json")
    rows = ["| set (the notebook's draws) | configurations | ours [s] | Sage [s] (64 cores) | "
            "ours ÷ Sage | verdicts | laws | load average |", "|---|---|---|---|---|---|---|---|"]
    for name, label in COUNT_SETS.items():
        if name not in report:
            continue
        r = report[name]
        configs = r["configurations"]
        verdicts = {}
        for c in configs:
            verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
        laws = sorted({c["laws"] for c in configs})
        rows.append(f"| {label} | {len(configs)} | {r['seconds']:.0f} | {r['sage_seconds']} | "
                    f"{r['ratio']:.2f} | "
                    + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())) + " | "
                    + ", ".join(map(str, laws)) + " | "
                    + (f"{r['load_average'][0]:.1f}" if "load_average" in r else "not recorded")
                    + " |")
    machine = next(iter(report.values()))["machine"]
    rows += ["", f"Machine: {machine}."]
    return "\n".join(rows)


def central(t) -> str:
    """The central flow for an ensemble in one program against the anchor's loop one seed at a
    time (bench_central.py): throughput and error against the tight reference, per run."""
    r = t._load("central_cpu.json")
    pr, edge, env = r["problem"], r["edge_of_stability"], r["environment"]
    rows = ["| run | members/s | gradients/s | autodiff passes/s | error at t1, max (median) "
            "| gradients per member | compile [s] |", "|---|---|---|---|---|---|---|"]
    a = r["anchor"]
    rows.append(f"| anchor loop, one seed at a time (Euler, {pr['anchor_substeps']} substeps "
                f"per step, LOBPCG) | {a['members_per_s']:.1f} | {a['gradients_per_s']:.0f} | "
                f"{a['autodiff_passes_per_s']:.0f} | {a['error_max']:.1e} "
                f"({a['error_median']:.1e}) | {a['work']['gradients'] / pr['members']:.0f} | "
                f"{a['compile_s']:.1f} |")
    for name in (n for n in r if n.startswith("library_")):
        e = r[name]
        eig = (f"Lanczos {pr['library_lanczos_steps']}" if "lanczos" in name
               else f"dense Hessian ({pr['parameters']} HVPs)")
        rows.append(f"| library, {pr['members']} members in one program (Tsit5, rtol "
                    f"{e['rtol']:g}, {eig}) | {e['members_per_s']:.1f} | "
                    f"{e['gradients_per_s']:.0f} | {e['autodiff_passes_per_s']:.0f} | "
                    f"{e['error_max']:.1e} ({e['error_median']:.1e}) | "
                    f"{e['work']['gradients'] / pr['members']:.0f} | {e['compile_s']:.1f} |")
    matched = []
    for eig, m in r["matched_accuracy"].items():
        if m is not None:
            matched.append(f"{eig} eigensolver, rtol {r[m['library']]['rtol']:g}: "
                           f"{m['members_per_s_over_anchor']:.2f}× the anchor's members/s, "
                           f"{m['gradients_per_s_over_anchor']:.2f}× its gradients/s, at "
                           f"{m['error_max_over_anchor']:.2f}× its worst error")
    first, osc = edge["first_edge_step"], edge["steps_oscillating"]
    load = r["load_average"]
    rows += ["",
             f"Problem: {pr['model']} ({pr['parameters']} parameters, init "
             f"{pr['init_scale']:g}), η = {pr['lr']:g} (2/η = {pr['two_over_lr']:.2f}), "
             f"{pr['gd_steps']} GD steps (t1 = {pr['t1']:.2g}), {pr['members']} members, "
             f"k = {pr['k']}, relaxation {pr['relaxation']}. Along the reference (rtol "
             f"{r['reference']['rtol']:g}) ηS rises from {edge['eta_sharpness_start']['min']:.2f}–"
             f"{edge['eta_sharpness_start']['max']:.2f}; {edge['members_reaching_edge']} of "
             f"{pr['members']} members reach ηS ≥ 1.99 (GD step {first['min']:.0f}–"
             f"{first['max']:.0f}, median {first['median']:.0f}) and oscillate (σ² > 0) for "
             f"{osc['min']:.0f}–{osc['max']:.0f} of the {pr['gd_steps']} steps; at t1 |ηS − 2| ≤ "
             f"{max(abs(v - 2) for v in edge['eta_sharpness_end'].values()):.0e}.",
             "",
             "At matched accuracy (the loosest tolerance whose worst member is at least as "
             "close to the reference as the anchor's worst): " + "; ".join(matched) + ".",
             "",
             f"Best of {pr['repeats']} interleaved rounds, at commit "
             f"{(env['commit'] or '?')[:7]}; machine: {env['cpu_count']} cores shared with "
             f"other jobs (load average {load['start'][0]:.1f} at the start, "
             f"{load['end'][0]:.1f} at the end): the ratios within the run are meaningful, "
             f"the absolute rates are not; jax {env['versions']['jax']}, one thread."]
    return "\n".join(rows)


def generate(t=None) -> dict[str, str]:
    """Every fragment's name and text (each ends with one newline); `t` is benchmarks/tables.py
    (imported here when not given)."""
    t = tables_module() if t is None else t
    builders = {"core": t.core, "ensembles": t.ensembles, "lanes": t.lanes,
                "counting": t.counting, "solvers_attention": t.solvers_attention,
                "solvers_auto_probe": t.solvers_auto_probe, "solvers_large": t.solvers_large,
                "solvers_quick": t.solvers_quick, "memory": t.memory,
                "augmentation": lambda: augmentation(t),
                "latency": lambda: latency(t), "mutation": lambda: mutation(t),
                "train": lambda: train(t), "overhead": lambda: overhead(t),
                "count_flows": lambda: count_flows(t),
                "mutation_fresh": lambda: mutation_fresh(t), "central": lambda: central(t)}
    return {name: build().strip() + "\n" for name, build in builders.items()}


def stale() -> list[str]:
    """Fragments whose committed file differs from a fresh generation (or is missing)."""
    return [name for name, text in generate().items()
            if not (OUT / f"{name}.md").is_file() or (OUT / f"{name}.md").read_text() != text]


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        names = stale()
        print("stale: " + ", ".join(names) if names else "all tables are up to date")
        sys.exit(1 if names else 0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (OUT / f"{name}.md").write_text(text)
    print(f"wrote {len(generate())} tables to {OUT.relative_to(HERE.parent)}")
