"""Augmentation benchmark: the seed paper's Fig. 3 data set (Lightning Attention, d = 8, n = 5
tokens, 10 base sequences, O(8) augmentation).

    python benchmarks/bench_augmentation.py [--samples 4096] [--repeats 3]

Compares, with compile time reported apart: building the augmented MSE moments from the
orbit-expanded data (10 × samples sequences) vs symmetrising the base moments over the same
group samples (cost ∝ samples, independent of the number of base sequences) vs the exact
O(8) projection onto the Brauer invariants (independent of both), and the exact O(2) one of
the sextic neuron's 12-axis moments (Fig. 1); and one loss + gradient
evaluation on the moment path vs per sample over the 40 960 augmented sequences.
Writes benchmarks/results/augmentation_<backend>.json.
"""

import argparse

import _harness
import jax
import jax.numpy as jnp

import conservation as cn

D, TOKENS = 8, 5


def problem(n_base: int):
    k_teacher, k_x, k_model = jax.random.split(jax.random.PRNGKey(13), 3)
    teacher = cn.LightningAttention.random(D, key=k_teacher, causal=False, init_scale=4.24)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k_x, n_base, (TOKENS, D), 0.8))
    model = cn.LightningAttention.random(D, key=k_model, causal=False, init_scale=1.13)
    return data, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    group = cn.OrthogonalGroup(D, samples=args.samples)
    augmentation = cn.Augmentation(group)
    report = {"problem": {"d": D, "tokens": TOKENS, "base_sequences": 10,
                          "group_samples": args.samples,
                          "augmented_sequences": 10 * args.samples}}

    def record(label, fn, **extra):
        timing = _harness.timed(fn, repeats=args.repeats)
        report[label] = {k: v for k, v in timing.items() if k != "output"} | extra
        print(label, {k: round(v, 4) if isinstance(v, float) else v
                      for k, v in report[label].items()})
        return timing["output"]

    data, model = problem(10)
    expanded = augmentation.apply(data)
    orbit = record("moments_from_orbit_expansion",
                   lambda: cn.Moments.from_data(model, augmentation.apply(data)))
    sym = record("moments_symmetrised_over_samples",
                 lambda: augmentation.symmetrize(cn.Moments.from_data(model, data), model))
    exact = record("moments_exact_O8_projection",
                   lambda: cn.Augmentation(cn.OrthogonalGroup(D)).symmetrize(
                       cn.Moments.from_data(model, data), model))
    # Exact O(2) on the seed paper's Fig. 1 sextic neuron: moment blocks with up to 12 axes.
    k_neuron, k_x = jax.random.split(jax.random.PRNGKey(1))
    neuron = cn.Neuron.random(2, key=k_neuron, init_scale=2.0)
    neuron_data = cn.teacher_dataset(neuron, cn.gaussian_inputs(k_x, 10, (2,)))
    record("moments_exact_O2_sextic_projection",
           lambda: cn.Augmentation(cn.OrthogonalGroup(2)).symmetrize(
               cn.Moments.from_data(neuron, neuron_data), neuron).R)
    report["agreement"] = {
        "orbit_vs_symmetrised_relative": float(jnp.linalg.norm(orbit.M - sym.M)
                                               / jnp.linalg.norm(orbit.M)),
        "defect_sampled": float(augmentation.defect(sym, model)),
        "defect_exact": float(augmentation.defect(exact, model)),
    }
    print("agreement", report["agreement"])

    # Symmetrisation cost as the number of base sequences grows (orbit size 10×…1000× samples).
    # Cost as the number of base sequences grows: orbit expansion grows with it, the
    # symmetrisation of the moments does not (beyond accumulating the base moments).
    report["run_s_vs_base_sequences"] = {}
    for n_base in (10, 100, 1000):
        data_n, _ = problem(n_base)
        row = {"symmetrised": _harness.timed(
            lambda: augmentation.symmetrize(cn.Moments.from_data(model, data_n), model),
            repeats=args.repeats)["run_s"]}
        if n_base <= 100:
            row["orbit_expansion"] = _harness.timed(
                lambda: cn.Moments.from_data(model, augmentation.apply(data_n)),
                repeats=1)["run_s"]
        report["run_s_vs_base_sequences"][n_base] = row
        print("base sequences", n_base, row)

    fast = cn.make_objective(cn.MSE(), data, model, augment=group)
    slow = cn.make_objective(cn.MSE(), expanded, model, moments=False)
    value_and_grad = jax.jit(jax.value_and_grad(lambda m, o: o(m)))
    record("loss_and_gradient_moments", lambda: value_and_grad(model, fast))
    record("loss_and_gradient_per_sample", lambda: value_and_grad(model, slow))

    report["ratios"] = {
        "orbit_over_symmetrised": report["moments_from_orbit_expansion"]["run_s"]
        / report["moments_symmetrised_over_samples"]["run_s"],
        "orbit_over_exact": report["moments_from_orbit_expansion"]["run_s"]
        / report["moments_exact_O8_projection"]["run_s"],
        "per_sample_over_moments_gradient": report["loss_and_gradient_per_sample"]["run_s"]
        / report["loss_and_gradient_moments"]["run_s"],
    }
    print("ratios", report["ratios"])
    print("wrote", _harness.write("augmentation", report))


if __name__ == "__main__":
    main()
