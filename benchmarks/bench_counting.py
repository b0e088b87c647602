"""Law-counting benchmark: the 50 random architectures of Marcotte et al.'s reference run
(linear and ReLU nets, depth 2–4, every width in 2..5), counted by `count_laws`.

    python benchmarks/bench_counting.py [--quick] [--configs 50] [--only linear|relu]

Reference: their SageMath code took 34 min on 64 cores for 50 linear configurations (~41 s
each) and 1 h 53 min for 50 ReLU ones. Every count is checked against an independent answer:

- linear: the rank of the gradients of every balance-matrix entry (jacfwd + numpy rank);
  counted twice, as a proof (known laws given: stop when the rank reaches D − known) and as
  an estimate (`known_laws=False`: stop when depth and fresh data sets add no rank). Both run
  in one padded network (`pad_to=(4, 5)`), so all 50 architectures share one compiled
  program per bracket depth; the times include that compilation.
- ReLU: Σ hidden widths (rescale laws) + the weights between hidden neurons that are never
  active together, found by an independent numpy co-activation test on 10⁶ fresh inputs at
  scales 0.01…1000 (`--quick`: 10⁵); the library's `never_coactive` must name the same
  weights, and the sampled data sets must co-activate every pair the probe does.

Also timed: a repeated count of the same shapes (first call vs warm repeat, unpadded).
Writes benchmarks/results/counting_<backend>.json (`--quick`: counting_quick_<backend>.json).
"""

import argparse
import time

import _harness
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np

import conservation as cn


def expected_linear(model) -> int:
    """Independent balance laws: rank of the gradients of all balance-matrix entries."""
    flat, unravel = jfu.ravel_pytree(model)

    def balance(y):
        m = unravel(y)
        return jnp.concatenate([law(m).ravel() for law in m.laws()])

    return int(np.linalg.matrix_rank(np.asarray(jax.jacfwd(balance)(flat)), tol=1e-8))


def generic_relu(widths, key):
    """A random ReLU net at a generic point: every hidden neuron is active on 5–95% of
    Gaussian inputs. (A dead or always-active neuron adds genuine local laws — it makes the
    net locally linear — which the theorem's count for distinct hyperplanes excludes.)"""
    x = jax.random.normal(jax.random.PRNGKey(123), (4000, widths[0]))
    while True:
        key, sub = jax.random.split(key)
        model = cn.MLP.random(widths, key=sub)
        h, ok = x, True
        for w, b in zip(model.weights[:-1], model.biases[:-1]):
            z = h @ w.T + b
            active = np.asarray((z > 0).mean(axis=0))
            ok &= bool(np.all((active > 0.05) & (active < 0.95)))
            h = jax.nn.relu(z)
        if ok:
            return model


def never_coactive_numpy(model, n, seed=2024):
    """Pairs (l, j, k): hidden neuron j of layer l and k of layer l+1 never active together
    on n fresh numpy inputs spread over scales 0.01…1000 (independent of the library)."""
    rng = np.random.default_rng(seed)
    ws = [np.asarray(w) for w in model.weights[:-1]]
    bs = [np.asarray(b) for b in model.biases[:-1]]
    seen = [np.zeros((ws[l + 1].shape[0], ws[l].shape[0]), bool) for l in range(len(ws) - 1)]
    per_chunk = 50_000
    for start in range(0, n, per_chunk):
        m = min(per_chunk, n - start)
        scales = 10.0 ** rng.uniform(-2, 3, size=(m, 1))
        h = scales * rng.standard_normal((m, ws[0].shape[1]))
        acts = []
        for w, b in zip(ws, bs):
            z = h @ w.T + b
            acts.append(z > 0)
            h = np.maximum(z, 0.0)
        for l in range(len(ws) - 1):
            seen[l] |= (acts[l + 1].T.astype(np.int64) @ acts[l].astype(np.int64)) > 0
    return {(l, int(j), int(k)) for l, s in enumerate(seen) for k, j in np.argwhere(~s)}


def architectures(n):
    rng = np.random.default_rng(0)
    out = {"linear": [], "relu": []}
    for kind in ("linear", "relu"):
        for i in range(50):
            depth = int(rng.integers(2, 5))
            widths = tuple(int(w) for w in rng.integers(2, 6, size=depth + 1))
            if i < n:
                out[kind].append((i, widths))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 configs per kind")
    parser.add_argument("--only", choices=("linear", "relu"), default=None,
                        help="count one kind only (cold: its times include every compilation)")
    args = parser.parse_args()
    n = 6 if args.quick else args.configs
    probe = 100_000 if args.quick else 1_000_000
    archs = architectures(n)
    if args.only is not None:
        archs = {kind: a if kind == args.only else [] for kind, a in archs.items()}
    report = {"configs": [], "quick": args.quick, "only": args.only, "relu_probe_inputs": probe}
    total = {"linear_proof": 0.0, "linear_estimate": 0.0, "relu": 0.0}

    # A repeated count of the same shapes: the first call compiles, the repeat reuses it.
    # (Skipped with `--only`, whose totals then include every cold compilation.)
    if args.only is None:
        widths = archs["linear"][0][1]
        model = cn.DeepLinear.random(widths, key=jax.random.PRNGKey(0))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            cn.count_laws(model, cn.MSE(), key=jax.random.PRNGKey(0))
            times.append(time.perf_counter() - start)
        report["repeat"] = {"widths": widths, "first_s": times[0], "repeat_s": min(times[1:]),
                            "speedup": times[0] / min(times[1:])}
        print("repeat", report["repeat"])

    for i, widths in archs["linear"]:
        model = cn.DeepLinear.random(widths, key=jax.random.PRNGKey(i))
        expected = expected_linear(model)
        row = {"kind": "linear", "widths": widths, "expected": expected}
        for mode, options in (("proof", {}), ("estimate", {"known_laws": False})):
            start = time.perf_counter()
            count = cn.count_laws(model, cn.MSE(), key=jax.random.PRNGKey(i), pad_to=(4, 5),
                                  **options)
            seconds = time.perf_counter() - start
            total[f"linear_{mode}"] += seconds
            row[mode] = {"laws": count.laws, "verdict": count.verdict, "seconds": seconds,
                         "rank_by_depth": count.rank_by_depth,
                         "rank_by_round": count.rank_by_round, "gap": count.gap}
        row["parameters"] = count.parameters
        row["correct"] = row["proof"]["laws"] == row["estimate"]["laws"] == expected
        report["configs"].append(row)
        print(row, flush=True)

    for i, widths in archs["relu"]:
        model = generic_relu(widths, jax.random.PRNGKey(i))
        pairs = never_coactive_numpy(model, probe)
        expected = sum(widths[1:-1]) + len(pairs)
        start = time.perf_counter()
        count = cn.count_laws(model, cn.MSE(), key=jax.random.PRNGKey(i))
        seconds = time.perf_counter() - start
        total["relu"] += seconds
        row = {"kind": "relu", "widths": widths, "parameters": count.parameters,
               "laws": count.laws, "expected": expected, "rescale": sum(widths[1:-1]),
               "never_coactive_numpy": sorted(pairs),
               "never_coactive": [list(p) for p in count.never_coactive],
               "verdict": count.verdict, "seconds": seconds,
               "rank_by_depth": count.rank_by_depth, "rank_by_round": count.rank_by_round,
               "gap": count.gap, "probe": count.probe,
               "sample_covers_probe": "co-activate every pair" in count.probe}
        row["correct"] = (count.laws == expected and set(count.never_coactive) == pairs
                          and row["sample_covers_probe"])
        report["configs"].append(row)
        print({k: v for k, v in row.items() if k != "probe"}, flush=True)

    report["total_seconds"] = total
    report["all_correct"] = all(r["correct"] for r in report["configs"])
    report["verdicts"] = {
        kind: {v: sum(1 for r in report["configs"] if r["kind"] == kind and
                      (r["proof"]["verdict"] if kind == "linear" else r["verdict"]) == v)
               for v in ("proved", "converged", "not converged")}
        for kind in ("linear", "relu")}
    report["relu_with_never_coactive"] = sum(
        1 for r in report["configs"] if r["kind"] == "relu" and r["never_coactive_numpy"])
    print("total", total, "all correct", report["all_correct"])
    name = "counting" + ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "")
    print("wrote", _harness.write(name, report))


if __name__ == "__main__":
    main()
