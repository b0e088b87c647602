"""`train` against a hand-written `lax.scan` of the same optax update, the same objective and the
same per-step drift: the floor a discrete run can reach (issue 24: ≤ 1.1×).

The problem is bench_core's (deep linear 16-32-32-8 on a teacher, N = 128), 64 members,
gradient descent at lr 0.05 for 2 000 steps, the balance laws' drift taken at every step.

- `train`: `conservation.train(objective, ensemble, optimizer("gd", lr), steps, n_save=11)`.
- `scan`: `vmap` over members of `lax.scan` over steps of: value_and_grad, `optax.sgd`'s update,
  apply, the laws' values and their relative drift from θ₀, a running max; the loss at the
  11 save points. No statuses, no divergence check, no step counts: what the per-step work
  costs with nothing else.

Both run interleaved (`_harness.timed_interleaved`): compile time apart, best of `--repeats`
rounds. The final parameters and the worst drifts are compared (they must agree to round-off:
the same computation). Writes benchmarks/results/train_<backend>.json.
"""

import argparse

import _harness  # noqa: F401  (pins threads before numpy/jax load)
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from bench_core import build

import conservation as cn
from conservation._dynamics.monitor import LawMonitor

LR, STEPS, N_SAVE = 0.05, 2000, 11


def scan_program(objective, ensemble, steps: int, n_save: int):
    """The hand-written run: (final params, worst drift per law, saved losses)."""
    laws = tuple(cn.default_laws(ensemble[0]))
    monitor = LawMonitor(laws)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    optim = optax.sgd(LR)
    chunk = steps // (n_save - 1)

    def member(p):
        model = eqx.combine(p, static)
        reference = monitor.reference(model)
        state = optim.init(p)
        worst = {law.name: jnp.zeros(()) for law in laws}

        def step(carry, _):
            p, state, worst = carry
            loss, grad = jax.value_and_grad(lambda q: objective(eqx.combine(q, static)))(p)
            updates, state = optim.update(grad, state, p)
            p = optax.apply_updates(p, updates)
            drift = monitor.drifts(monitor.values(eqx.combine(p, static)), reference)
            worst = {k: jnp.maximum(worst[k], drift[k]) for k in worst}
            return (p, state, worst), None

        def save(carry, _):
            carry, _ = jax.lax.scan(step, carry, None, length=chunk)
            return carry, objective(eqx.combine(carry[0], static))

        (p, _, worst), losses = jax.lax.scan(save, (p, state, worst), None, length=n_save - 1)
        return p, worst, jnp.concatenate([objective(model)[None], losses])

    return jax.jit(lambda params: jax.vmap(member)(params)), params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    data, ensemble = build(args.members)
    objective = cn.make_objective(cn.MSE(), data, ensemble[0])
    optim = cn.optimizer("gd", lr=LR)
    scan, params = scan_program(objective, ensemble, args.steps, N_SAVE)

    timings = _harness.timed_interleaved({
        "train": lambda: cn.train(objective, ensemble, optim, args.steps, n_save=N_SAVE,
                                  progress=False),
        "scan": lambda: scan(params),
    }, repeats=args.repeats)
    result = timings["train"].pop("output")
    final, worst, losses = timings["scan"].pop("output")
    trained = jax.tree_util.tree_leaves(eqx.filter(result.final.models, eqx.is_inexact_array))
    agree = {
        "final_params_max_abs_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            trained, jax.tree_util.tree_leaves(final))),
        "max_drift_max_rel_diff": max(
            float(jnp.max(jnp.abs(result.max_drift[k] - worst[k])
                          / jnp.maximum(jnp.abs(worst[k]), 1e-300))) for k in worst),
        "saved_loss_max_rel_diff": float(jnp.max(jnp.abs(result.loss - losses) / losses)),
    }
    ratio = timings["train"]["run_s"] / timings["scan"]["run_s"]
    path = _harness.write("train", {
        "problem": {"widths": [16, 32, 32, 8], "members": args.members, "steps": args.steps,
                    "lr": LR, "n_save": N_SAVE, "laws": sorted(worst)},
        "timings": timings, "train_over_scan": ratio, "agreement": agree,
        "status": result.summary()["status"],
    })
    print(f"train {timings['train']['run_s']:.3f} s, scan {timings['scan']['run_s']:.3f} s: "
          f"{ratio:.2f}x (compile {timings['train']['compile_s']:.1f} / "
          f"{timings['scan']['compile_s']:.1f} s); agreement {agree}; {path}")


if __name__ == "__main__":
    main()
