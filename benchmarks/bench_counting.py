"""Law-counting benchmark: the 50 random architectures of Marcotte et al.'s reference run
(linear and ReLU nets, depth 2–4, every width in 2..5), counted by `count_laws`.

    python benchmarks/bench_counting.py [--configs 50]

Reference: their SageMath code took 34 min on 64 cores for 50 linear configurations (~41 s
each) and 1 h 53 min for 50 ReLU ones. Each count here is checked against the known answer
(linear: rank of the balance matrices' gradients; ReLU: the number of hidden neurons).
Compile time is part of each count (every architecture is a new program); reported apart as
the first-call minus a warm repeat for the first configuration. ReLU nets are drawn at
generic points (no dead or always-active neuron on Gaussian inputs). Writes
benchmarks/results/counting_<backend>.json.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    report = {"configs": []}
    total = {"linear": 0.0, "relu": 0.0}
    for kind in ("linear", "relu"):
        for i in range(args.configs):
            depth = int(rng.integers(2, 5))
            widths = tuple(int(w) for w in rng.integers(2, 6, size=depth + 1))
            key = jax.random.PRNGKey(i)
            if kind == "linear":
                model = cn.DeepLinear.random(widths, key=key)
                expected = expected_linear(model)
            else:
                model = generic_relu(widths, key)
                expected = sum(widths[1:-1])
            start = time.perf_counter()
            count = cn.count_laws(model, cn.MSE(), key=key)
            seconds = time.perf_counter() - start
            total[kind] += seconds
            row = {"kind": kind, "widths": widths, "parameters": count.parameters,
                   "laws": count.laws, "expected": expected, "seconds": seconds,
                   "rank_by_depth": count.rank_by_depth, "gap": count.gap}
            report["configs"].append(row)
            print(row)
    report["total_seconds"] = total
    report["all_correct"] = all(r["laws"] == r["expected"] for r in report["configs"])
    first = report["configs"][0]
    model = cn.DeepLinear.random(first["widths"], key=jax.random.PRNGKey(0))
    start = time.perf_counter()
    cn.count_laws(model, cn.MSE(), key=jax.random.PRNGKey(0))
    report["first_config_warm_seconds"] = time.perf_counter() - start
    report["first_config_compile_seconds"] = first["seconds"] - report[
        "first_config_warm_seconds"]
    print("total", total, "all correct", report["all_correct"])
    print("wrote", _harness.write("counting", report))


if __name__ == "__main__":
    main()
