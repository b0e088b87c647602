"""First-call latency: setup compiles few XLA programs, equal work compiles none, and the
compiled constructors give the parameters of the eager computation bit for bit."""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import conservation as cn

# The README's first example without its runs (gradient_flow and train), then the same setup
# again with other keys, scales and a fresh factory lambda: programs are counted with JAX's
# own event, which fires once per program handed to XLA (a persistent-cache hit included).
SCRIPT = r"""
import json, jax, jax.monitoring
count = [0]
def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        count[0] += 1
jax.monitoring.register_event_duration_secs_listener(listen)
import conservation as cn
cn.enable_compilation_cache()

def setup(seed, scale):
    key_teacher, key_x, key_init = jax.random.split(jax.random.PRNGKey(seed), 3)
    teacher = cn.DeepLinear.random([8, 16, 16, 4], key=key_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(key_x, 128, (8,)))
    ensemble = cn.Ensemble.init(
        lambda k: cn.DeepLinear.random([8, 16, 16, 4], key=k, init_scale=scale), key_init, 16)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    return float(cn.pointwise_check(cn.BalanceLaw(0), objective, ensemble[seed]))

start = count[0]
setup(0, 0.7)
first = count[0] - start
setup(3, 0.4)
print(json.dumps({"first": first, "again": count[0] - start - first}))
"""


def test_readme_setup_compiles_few_programs_and_equal_work_none():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True,
                         text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    # Measured 15 (a PRNG key and its split 4, DeepLinear.random 1, the data 5, Ensemble.init
    # 2, the objective 2, pointwise_check 1); 125 before.
    assert counts["first"] <= 20, counts
    # A second teacher, data set, ensemble (a new lambda), objective and check of the same
    # shapes reuse every program.
    assert counts["again"] == 0, counts


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def _assert_bit_equal(got, want):
    got, want = _leaves(got), _leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_compiled_constructors_equal_the_eager_computation_bit_for_bit():
    # The reference is each constructor's formula run eagerly, one operation at a time (the
    # implementation before the constructors were compiled).
    key = jax.random.PRNGKey(11)
    widths, scale = (3, 5, 4, 2), 0.7

    def eager_linear(k, widths, scale):
        keys = jax.random.split(k, len(widths) - 1)
        return [scale * jax.random.normal(kk, (o, i)) / jnp.sqrt(i)
                for kk, i, o in zip(keys, widths[:-1], widths[1:])]

    _assert_bit_equal(cn.DeepLinear.random(widths, key=key, init_scale=scale),
                      eager_linear(key, widths, scale))
    _assert_bit_equal(cn.PolynomialNet.random(widths, key=key, init_scale=scale),
                      eager_linear(key, widths, scale))

    keys = jax.random.split(key, 2 * (len(widths) - 1))
    weights, biases = [], []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        std = scale * jnp.sqrt(2.0 / n_in)
        weights.append(std * jax.random.normal(keys[2 * i], (n_out, n_in)))
        biases.append(0.1 * scale * jax.random.normal(keys[2 * i + 1], (n_out,)))
    _assert_bit_equal(cn.MLP.random(widths, key=key, init_scale=scale), [weights, biases])
    _assert_bit_equal(cn.MLP.random(widths, key=key, init_scale=scale, bias=False), weights)

    _assert_bit_equal(cn.Neuron.random(7, key=key, init_scale=0.3),
                      0.3 * jax.random.normal(key, (7,)) / np.sqrt(7))

    kq, kk, kv, ko = jax.random.split(key, 4)
    std = 0.3 / jnp.sqrt(6)
    attention = [std * jax.random.normal(kq, (2, 6, 1)), std * jax.random.normal(kk, (2, 6, 1)),
                 std * jax.random.normal(kv, (2, 6, 3)),
                 0.3 / jnp.sqrt(3) * jax.random.normal(ko, (2, 3, 2))]
    _assert_bit_equal(cn.LightningAttention.random(6, key=key, heads=2, value_dim=3, out_dim=2,
                                                   init_scale=0.3), attention)

    _assert_bit_equal(cn.gaussian_inputs(key, 7, (9, 4), scale=0.3),
                      0.3 * jax.random.normal(key, (7, 9, 4)))

    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random(widths, key=k, init_scale=scale),
                                key, 5)
    members = [eager_linear(k, widths, scale) for k in jax.random.split(key, 5)]
    _assert_bit_equal(ensemble, [np.stack(layer) for layer in zip(*members)])
    _assert_bit_equal(ensemble[-2], members[3])
    _assert_bit_equal(ensemble[1:3], [np.stack(layer) for layer in zip(*members[1:3])])


class _Programs:
    """Counts the programs handed to XLA (compiled, or loaded from the persistent cache) while
    active: JAX's own event, which fires once per program."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _teacher_problem(seed, widths, *, samples, members):
    """(objective, ensemble): a deep linear teacher's data and a student ensemble, built and
    ready before a count starts."""
    key_teacher, key_x, key_init = jax.random.split(jax.random.PRNGKey(seed), 3)
    teacher = cn.DeepLinear.random(widths, key=key_teacher)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(key_x, samples, (widths[0],)))
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random(widths, key=k), key_init,
                                members)
    jax.block_until_ready(ensemble[0])
    return cn.make_objective(cn.MSE(), data, ensemble), ensemble


def test_a_run_compiles_its_programs_not_one_per_operation():
    # Shapes no other test uses (7 members of a 3-5-2 net, 11 samples), so every program is
    # new to this process: a first call as in a fresh one. Before, a finished run assembled
    # its Result one eager operation at a time, each operation its own program (on a warm
    # persistent cache each still costs a trace, a lowering and a cache look-up): the flow
    # compiled 13 programs, train 27.
    objective, ensemble = _teacher_problem(5, [3, 5, 2], samples=11, members=7)
    with _Programs() as flow:
        result = cn.gradient_flow(objective, ensemble, t1=0.5, rtol=1e-6, n_save=3,
                                  solver="tsit5")
        status = result.status_names()
    # Measured 4: the solve and three conversions of arguments to arrays.
    assert flow.count <= 6, flow.count
    assert status == ["success"] * 7
    with _Programs() as gd:
        result = cn.train(objective, ensemble, cn.optimizer("gd", lr=0.05), steps=10,
                          n_save=4, step_time=0.05)
        status = result.status_names()
    # Measured 5: `_start`, the PRNG keys, `_run_chunk` (every save of the run: 3 < 10 saves
    # make one per call), the assembly of every monitor's saves and `final_status`. (9 when
    # each block shape was concatenated apart.)
    assert gd.count <= 6, gd.count
    assert status == ["success"] * 7
    # The save times, as numpy computes them: chunks of ⌈10/3⌉ = 4 steps, the last one short.
    np.testing.assert_array_equal(np.asarray(result.t), np.array([0, 4, 8, 10]) * 0.05)
    assert np.asarray(result.t).dtype == np.float64


def test_the_accelerator_default_batch_compiles_no_member_slice(monkeypatch):
    """On an accelerator the default batch is sized from one member's flat parameters. They
    came from slicing member 0 out and ravelling it eagerly: seven programs of their own on a
    GPU (two slices, two squeezes, two reshapes, a concatenation), where the flow compiled 9
    programs for the CPU's 2. Simulated here with free device memory on the CPU; the shapes
    (6 members of a 3-4-2 net, 13 samples) are new to this process."""
    from conservation._dynamics import flow as flow_module

    monkeypatch.setattr(flow_module, "free_device_memory", lambda: 64e9)
    objective, ensemble = _teacher_problem(6, [3, 4, 2], samples=13, members=6)
    with _Programs() as flow:
        result = cn.gradient_flow(objective, ensemble, t1=0.5, rtol=1e-6, n_save=3,
                                  solver="tsit5")
    assert result.batch_size == 6  # every member fits: the accelerator's default was taken
    assert flow.count <= 6, flow.count


def test_host_conversion_gives_the_array_of_jnp_asarray():
    # `as_float64` (the flow's numeric arguments) transfers host values instead of converting
    # them in a compiled program: the same value, dtype and weak type as jnp.asarray(v, float)
    # (a weakly typed float64 would promote differently against float32).
    from conservation._validation import as_float64

    for value in (2.0, 3, 10**8, float("inf"), 1e-300, np.float32(0.1),
                  np.arange(3, dtype=np.float32), np.array([0.1, 0.2]), jnp.asarray(1.5),
                  jnp.asarray(1.5, float), jnp.float32(0.3), jnp.arange(3)):
        got, want = as_float64(value), jnp.asarray(value, float)
        assert (got.dtype, got.shape, got.weak_type) == (want.dtype, want.shape, want.weak_type)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
