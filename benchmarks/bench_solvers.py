"""Solver and ensemble benchmark: stiff late-time flows and ensemble throughput.

    python benchmarks/bench_solvers.py [--repeats 2]

1. Solvers on the stiff late-time flow of Lightning Attention (d = 4, r = m = 1, t ∈ [0, 50])
   and of a quadratic net (3-4-1, t ∈ [0, 200]): Tsit5, Dopri5, Dopri8 (explicit) and
   Kvaerno5 (implicit), rtol = atol = 1e-8 — run time and steps; peer:
   jax.experimental.ode.odeint (Dopri5) if this JAX still ships it.
2. Ensemble throughput: members per second of gradient flow vs ensemble size (deep linear
   8-16-16-4, t1 = 20), default `batch_size` and fully vmapped.
Compile time apart, block_until_ready, threads pinned. Writes
benchmarks/results/solvers_<backend>.json.
"""

import argparse
import time

import _harness
import jax
import jax.numpy as jnp

import conservation as cn


def problems():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    attention = cn.LightningAttention.random(4, key=k[0], causal=False)
    teacher = cn.LightningAttention.random(4, key=k[1], causal=False)
    att_data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k[2], 16, (5, 4)))
    quadratic = cn.PolynomialNet.random((3, 4, 1), key=k[3])
    quad_data = cn.teacher_dataset(cn.PolynomialNet.random((3, 2, 1), key=k[4]),
                                   cn.gaussian_inputs(k[5], 32, (3,)))
    return {"attention_d4": (attention, att_data, 50.0),
            "quadratic_3_4_1": (quadratic, quad_data, 200.0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    report = {"solvers": {}, "ensemble_throughput": {}}
    for name, (model, data, t1) in problems().items():
        objective = cn.make_objective(cn.MSE(), data, model)
        ensemble = cn.Ensemble.init(lambda k: type(model).random(
            *((4,) if name.startswith("attention") else ((3, 4, 1),)), key=k,
            **({"causal": False} if name.startswith("attention") else {})),
            jax.random.PRNGKey(1), 4)
        report["solvers"][name] = {}
        for solver in ("tsit5", "dopri5", "dopri8", "kvaerno5"):
            timing = _harness.timed(lambda: cn.gradient_flow(
                objective, ensemble, t1, rtol=1e-8, solver=solver, n_save=11),
                repeats=args.repeats)
            result = timing.pop("output")
            row = timing | {
                "steps_mean": float(jnp.mean(result.num_steps)),
                "status": result.summary()["status"]}
            report["solvers"][name][solver] = row
            print(name, solver, {k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in row.items()})
        try:
            from jax.experimental.ode import odeint
        except ImportError:
            report["solvers"][name]["jax_experimental_odeint"] = "not available in this JAX"
            continue
        import equinox as eqx
        import jax.flatten_util as jfu

        params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
        _, unravel = jfu.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], params))
        y0 = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)

        @jax.jit
        def peer(y0):
            rhs = lambda y, t: -jax.grad(lambda z: objective(eqx.combine(unravel(z), static)))(y)  # noqa: E731
            return jax.vmap(lambda y: odeint(rhs, y, jnp.linspace(0.0, t1, 11), rtol=1e-8,
                                             atol=1e-8))(y0)

        timing = _harness.timed(lambda: peer(y0), repeats=args.repeats)
        timing.pop("output")
        report["solvers"][name]["jax_experimental_odeint"] = timing
        print(name, "odeint", timing)

    teacher = cn.DeepLinear.random([8, 16, 16, 4], key=jax.random.PRNGKey(2))
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(jax.random.PRNGKey(3), 128, (8,)))
    objective = cn.make_objective(cn.MSE(), data, teacher)
    for size in (1, 4, 16, 64):
        ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random(
            [8, 16, 16, 4], key=k, init_scale=0.7), jax.random.PRNGKey(4), size)
        row = {}
        for label, batch in (("default", None), ("vmap_all", size)):
            timing = _harness.timed(lambda: cn.gradient_flow(
                objective, ensemble, 20.0, rtol=1e-9, n_save=11, batch_size=batch),
                repeats=args.repeats)
            timing.pop("output")
            row[label] = timing | {"members_per_second": size / timing["run_s"]}
        report["ensemble_throughput"][size] = row
        print("ensemble", size, {k: round(v["members_per_second"], 2) for k, v in row.items()})
    print("wrote", _harness.write("solvers", report))


if __name__ == "__main__":
    main()
