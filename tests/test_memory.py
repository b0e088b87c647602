"""Memory estimate (issue 13 item 2, issue 23 item 3): counts checked against real models, refusal
before any allocation, with the number and the fix, in the API as in the CLI."""

import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conservation._experiments.config import ConfigError, parse_config
from conservation._experiments.memory import check_memory, estimate, law_entries, parameter_count
from conservation._experiments.runner import model_factory
from conservation._models.base import flat_parameters

MODELS = [
    {"kind": "deep_linear", "widths": [3, 5, 4, 2]},
    {"kind": "polynomial", "widths": [3, 4, 1]},
    {"kind": "mlp", "widths": [3, 5, 2]},
    {"kind": "neuron", "dim": 3},
    {"kind": "lightning_attention", "dim": 3, "key_dim": 2, "value_dim": 2, "heads": 2,
     "out_dim": 3},
]


def _config(model, **extra):
    data = {"n": 4, "tokens": 2} if model["kind"] == "lightning_attention" else {"n": 4}
    return parse_config({"model": model, "data": data,
                         "dynamics": [{"kind": "gd", "lr": 0.1, "steps": 2}], **extra})


@pytest.mark.parametrize("model", MODELS, ids=[m["kind"] for m in MODELS])
def test_parameter_and_law_counts_match_real_models(model):
    config = _config(model)
    real = model_factory(config.model)(jax.random.PRNGKey(0), 1.0)
    assert parameter_count(config.model) == flat_parameters(real).size
    if model["kind"] in ("deep_linear", "lightning_attention"):
        values = [np.size(law(real)) for law in real.laws()]
        assert law_entries(config.model) == (sum(values), len(values))


def test_estimate_scales_with_members_and_saves():
    config = _config(MODELS[0], ensemble={"size": 4})
    one, four = estimate(config, members=1), estimate(config)
    assert four.parts["parameters"] == 4 * one.parts["parameters"]
    assert four.parts["saved values"] == 4 * one.parts["saved values"]
    # saved values: members × (n_save × (loss + drift and condition per law) + final law
    # entries) × 8
    entries, laws = law_entries(config.model)
    # (a 2-step GD run saves every step by default: 3 saves; the laws' reference and final
    # values are both held)
    assert four.parts["saved values"] == 4 * (3 * (1 + 2 * laws) + 2 * entries) * 8


def test_refusal_names_the_number_and_the_fix_before_allocating():
    config = _config({"kind": "deep_linear", "widths": [3, 200000, 200000, 2]})
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        check_memory(config)
    assert time.perf_counter() - start < 1.0  # nothing allocated
    assert "needs ~" in str(error.value) and "GB" in str(error.value)
    assert "`model.widths`" in str(error.value)
    small = _config(MODELS[0])
    check_memory(small)  # fits
    with pytest.raises(ConfigError, match=r"the machine has 1e-06 GB available: reduce"):
        check_memory(small, available=1000)


# ------------------------------------------------------- default batch size on accelerators


def test_peak_live_bytes_of_a_known_program():
    import jax.numpy as jnp

    from conservation._dynamics.batching import peak_live_bytes

    n, d = 300, 50
    jaxpr = jax.make_jaxpr(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((n, d))).jaxpr
    # x xᵀ and its tanh are alive together (n² float64 each); a transpose of x at most beside.
    peak = peak_live_bytes(jaxpr)
    assert 2 * n * n * 8 <= peak <= 2 * n * n * 8 + 2 * n * d * 8
    # Closed-over data (shared by every member of a batch) are not a member's working set.
    shared = jnp.ones(10**6)
    jaxpr = jax.make_jaxpr(lambda y: jnp.sum(shared) * y)(jnp.ones(10)).jaxpr
    assert peak_live_bytes(jaxpr) < 1000


def test_default_batch_fills_the_free_memory_and_no_more(monkeypatch):
    import diffrax as dfx
    import equinox as eqx
    import jax.flatten_util as jfu

    import conservation as cn
    import conservation._dynamics.flow as flow
    from conservation._dynamics.batching import default_batch_size, member_bytes

    widths, n = (3, 64, 2), 500
    model = cn.MLP.random(widths, key=jax.random.PRNGKey(0))
    x = np.random.default_rng(0).standard_normal((n, widths[0]))
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, np.tanh(x[:, :2])), model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y0, unravel = jfu.ravel_pytree(params)

    def grad(y):
        return jax.grad(lambda z: objective(eqx.combine(unravel(z), static)))(y)

    per = member_bytes(grad, y0, dfx.Tsit5(), 101, 2)
    # At least the solver state (12 parameter vectors) and the hidden activations of n inputs.
    assert per >= 12 * y0.size * 8 + n * widths[1] * 8
    implicit = member_bytes(grad, y0, dfx.Kvaerno5(), 101, 2)
    assert implicit - per == 2 * y0.size ** 2 * 8  # dense Jacobian and its factors
    # The stabilised solver's lane holds 17 vectors (its carries, listed in `_memory.py`;
    # 16.5 measured on an H200), 5 more than Tsit5's: the estimate 12 was 25 % under the peak.
    for stabilized in (cn.StabilizedRK(), cn.ROCK4(), "stabilized", "auto"):
        assert member_bytes(grad, y0, stabilized, 101, 2) - per == 5 * y0.size * 8, stabilized
    # The CPU: 4 lanes, 2 for a Chebyshev solver (bench_lanes.py), never more than the members.
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, None) == 4
    assert default_batch_size(grad, y0, 3, dfx.Tsit5(), 101, 2, None) == 3
    assert default_batch_size(grad, y0, 7, cn.StabilizedRK(), 101, 2, None) == 2
    assert default_batch_size(grad, y0, 7, cn.ROCK4(), 101, 2, None) == 2
    assert default_batch_size(grad, y0, 7, dfx.Kvaerno5(), 101, 2, None) == 4
    assert default_batch_size(grad, y0, 1, dfx.Kvaerno5(), 101, 2, None) == 1
    # Above 4096 parameters per member 2 lanes (a gradient of larger products shares little).
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, None, parameters=4096) == 4
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, None, parameters=4097) == 2
    for fit in (1, 3, 7):
        free = (fit + 0.5) * per / 0.75
        assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, free) == fit
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, 1e15) == 7
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, 1.0) == 1

    # gradient_flow takes it from the device's free memory (here a fake accelerator).
    seen = []

    def stop(*args, batch, **kwargs):
        seen.append(batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(flow, "free_device_memory", lambda: 3.5 * per / 0.75)
    monkeypatch.setattr(flow, "_flow", stop)
    ensemble = cn.Ensemble.stack([model] * 5)
    with pytest.raises(KeyboardInterrupt):
        cn.gradient_flow(objective, ensemble, 1.0, solver="tsit5", n_save=101,
                         laws=model.laws()[:2], progress=False)
    assert seen == [3]

    # On the CPU (no memory statistics): 4 lanes, 2 for the stabilised solver, at most the
    # members; one model runs alone whatever the solver.
    monkeypatch.setattr(flow, "free_device_memory", lambda: None)
    for solver, model_or_ensemble in (("tsit5", ensemble), ("stabilized", ensemble),
                                      ("kvaerno5", ensemble), ("kvaerno5", model)):
        with pytest.raises(KeyboardInterrupt):
            cn.gradient_flow(objective, model_or_ensemble, 1.0, solver=solver, progress=False)
    assert seen == [3, 4, 2, 4, 1]
    # Members of more than 4096 parameters: 2 lanes (counted per member, not per ensemble).
    big = cn.Ensemble.init(lambda k: cn.MLP.random((3, 683, 2), key=k),
                           jax.random.PRNGKey(1), 5)
    assert sum(a.size for a in jax.tree_util.tree_leaves(
        eqx.filter(big[0], eqx.is_inexact_array))) == 4100
    with pytest.raises(KeyboardInterrupt):
        cn.gradient_flow(cn.make_objective(cn.MSE(), cn.Dataset(x, np.tanh(x[:, :2])), big),
                         big, 1.0, solver="tsit5", progress=False)
    assert seen[-1] == 2


# ------------------------------------------------- issue 23: exact features, API, sweep, ulimit

import equinox as eqx  # noqa: E402

import conservation as cn  # noqa: E402
import conservation._memory as memory  # noqa: E402

FEATURE_MODELS = [
    {"kind": "deep_linear", "widths": [3, 5, 2]},
    {"kind": "polynomial", "widths": [5, 7, 7, 7, 3]},  # quadratic σ: degree 2³ = 8 only
    {"kind": "polynomial", "widths": [3, 4, 2], "activation": "sextic"},  # degrees 2, 4, 6
    {"kind": "polynomial", "widths": [2, 3, 3, 1], "activation": [0.0, 1.0, 0.5]},  # 1…4
    {"kind": "neuron", "dim": 3},  # sextic: degrees 2, 4, 6
    {"kind": "neuron", "dim": 4, "activation": [1.0, 0.0, 2.0]},  # degrees 0, 2
    {"kind": "lightning_attention", "dim": 3, "key_dim": 2, "value_dim": 2, "heads": 2},
    {"kind": "lightning_attention", "dim": 2, "out_dim": 3},
    {"kind": "mlp", "widths": [3, 5, 2]},
]


@pytest.mark.parametrize("model", FEATURE_MODELS,
                         ids=[f"{m['kind']}-{i}" for i, m in enumerate(FEATURE_MODELS)])
def test_feature_counts_are_the_models_own_shapes(model):
    from conservation._experiments.memory import feature_shape
    from conservation._models.base import AbstractTensorizableModel

    config = _config(model)
    real = jax.eval_shape(lambda: model_factory(config.model)(jax.random.PRNGKey(0), 1.0))
    tokens = config.data.tokens or 1
    if not isinstance(real, AbstractTensorizableModel):
        assert feature_shape(config.model, tokens) == (0, 0)
        return
    d = model["widths"][0] if "widths" in model else model["dim"]
    x = jax.ShapeDtypeStruct((tokens, d) if model["kind"] == "lightning_attention" else (d,),
                             np.float64)
    rows, p = jax.eval_shape(lambda m, x: m.features(x), real, x).shape
    assert feature_shape(config.model, tokens) == (rows, p)
    if p < 10 ** 4:  # (the degree-8 Taylor coefficients take minutes to trace)
        assert jax.eval_shape(lambda m: m.tensorize(), real).shape[0] == p  # Φ: row per feature
    if model.get("widths") == [5, 7, 7, 7, 3]:
        assert p == 5 ** 8  # independent: x^{⊗8} of a 5-vector
        # The moment path's M alone is p² float64: 1.2 TB; the estimate holds at least that
        # (the old estimate said 1.1e-5 GB).
        assert estimate(config).parts["moments"] >= (5 ** 8) ** 2 * 8
        with pytest.raises(ConfigError, match="`loss.moments` = false"):
            check_memory(config, available=1e11)


def test_make_objective_refuses_moments_that_do_not_fit(monkeypatch):
    net = cn.PolynomialNet.random([5, 7, 7, 7, 3], key=jax.random.PRNGKey(0))
    x = np.random.default_rng(0).standard_normal((4, 5))
    data = cn.Dataset(x, x[:, :3])
    _refuse(monkeypatch, 100e9)
    start = time.perf_counter()
    with pytest.raises(cn.InsufficientMemory, match="moments=False"):
        cn.make_objective(cn.MSE(), data, net)
    assert time.perf_counter() - start < 10.0  # refused, not built
    _refuse(monkeypatch, 1e18)
    api = memory.check_moments(net, data)
    assert api.total >= (5 ** 8) ** 2 * 8  # M alone: p² float64
    # The CLI sizes the same model's moments with the same function.
    assert estimate(_config({"kind": "polynomial", "widths": [5, 7, 7, 7, 3]})
                    ).parts["moments"] == api.parts["moments"]


@pytest.fixture(scope="module")
def small_problem():
    widths = (3, 30, 30, 2)
    model = cn.DeepLinear.random(widths, key=jax.random.PRNGKey(0))
    x = np.random.default_rng(0).standard_normal((20, 3))
    objective = cn.make_objective(cn.MSE(), cn.Dataset(x, x[:, :2]), model, moments=False)
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random(widths, key=k),
                                jax.random.PRNGKey(1), 4)
    return objective, ensemble, model


def _refuse(monkeypatch, available):
    monkeypatch.setattr(memory, "available_memory", lambda: (available, "the test machine"))


def test_gradient_flow_and_train_refuse_before_allocating(monkeypatch, small_problem):
    import conservation._dynamics.flow as flow
    import conservation._dynamics.train as train

    objective, ensemble, model = small_problem

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(flow, "_flow", never)
    monkeypatch.setattr(flow, "_choose", never)  # not even the stiffness probe
    monkeypatch.setattr(train, "_start", never)
    _refuse(monkeypatch, 1e5)
    P = sum(np.size(w) for w in model.weights)
    laws = model.laws()
    sizes = [np.size(law(model)) for law in laws]  # the real law values: 30², 30²
    # Law values at 1000 saves dominate: the fix is values="final".
    with pytest.raises(cn.InsufficientMemory) as error:
        cn.gradient_flow(objective, ensemble, 1.0, values="all", n_save=1000, solver="tsit5",
                         progress=False)
    message = str(error.value)
    saved = 4 * (1000 * (1 + 2 * len(laws) + sum(sizes)) + sum(sizes)) * 8
    assert f"(saved values: {saved / 1e9:.3g} GB)" in message
    assert "the test machine has 0.0001 GB available" in message
    assert 'values="final"' in message
    assert isinstance(error.value, cn.ArgumentError) and isinstance(error.value, MemoryError)
    # With the default values the lanes dominate: the fix is batch_size.
    with pytest.raises(cn.InsufficientMemory, match="`batch_size`"):
        cn.gradient_flow(objective, ensemble, 1.0, batch_size=4, solver="tsit5", progress=False)
    with pytest.raises(cn.InsufficientMemory, match=rf"4 members of {P} parameters"):
        cn.train(objective, ensemble, cn.optimizer("gd", lr=0.1), 10, progress=False)
    # The saved values are what the flow keeps: members × (saves × (loss + drift and
    # condition per law + kept law values) + final law values) float64 numbers.
    from conservation._dynamics.batching import check_flow_memory

    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    _refuse(monkeypatch, 1e15)
    est = check_flow_memory(objective, params, static, laws, ("balance[0]",), True, "tsit5",
                            50, None, 4)
    assert est.parts["saved values"] == 4 * (50 * (1 + 2 * 2 + sizes[0]) + sum(sizes)) * 8
    # The gradient's working set holds at least the two hidden activations of the 20 samples.
    assert est.parts["gradient working set"] >= 2 * 20 * 30 * 8


def test_train_estimate_covers_what_the_run_returns(small_problem):
    objective, ensemble, _ = small_problem
    from conservation._dynamics.batching import check_train_memory

    optim = cn.optimizer("momentum", lr=0.01, momentum=0.5)
    result = cn.train(objective, ensemble, optim, 8, n_save=5, values="all", progress=False)
    laws = ensemble[0].laws()
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    est = check_train_memory(objective, params, static, laws, tuple(law.name for law in laws),
                             True, optim, 8, 5, None, 4)
    returned = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
        (result.loss, result.values, result.drift, result.condition, result.final_values)))
    assert est.parts["saved values"] >= returned
    # The final law values (`values="final"`, or "all") are one more copy of the laws' values
    # than the references every run keeps: the bytes of `final_values` as returned.
    without, with_final = (check_train_memory(objective, params, static, laws, (), flag, optim,
                                              8, 5, None, 4) for flag in (False, True))
    assert with_final.parts["saved values"] - without.parts["saved values"] == sum(
        np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(result.final_values)) > 0
    final = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
        eqx.filter(result.final.models, eqx.is_inexact_array)))
    assert est.parts["parameters"] >= 2 * final  # parameters and a momentum buffer


def test_ensemble_init_refuses_the_issue_reproduction(monkeypatch):
    _refuse(monkeypatch, 100e9)  # a 100 GB machine
    start = time.perf_counter()
    with pytest.raises(cn.InsufficientMemory) as error:
        cn.Ensemble.init(lambda k: cn.DeepLinear.random([4096, 4096, 4096], key=k),
                         jax.random.PRNGKey(0), 1024)
    assert time.perf_counter() - start < 5.0  # nothing was built
    parameters = 1024 * 2 * 4096 ** 2 * 8  # 275 GB
    assert f"(parameters: {parameters / 1e9:.3g} GB)" in str(error.value)
    assert "fewer members" in str(error.value)
    assert cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 2], key=k),
                            jax.random.PRNGKey(0), 3).size == 3


def test_ensemble_estimate_is_what_init_builds():
    """`check_members`' parts against the arrays themselves: the parameters of the built
    ensemble and the PRNG keys `Ensemble.init` splits (one per member)."""
    key, size = jax.random.PRNGKey(3), 5

    def factory(k):
        return cn.DeepLinear.random([3, 4, 2], key=k)

    est = memory.check_members(factory, key, size)
    ensemble = cn.Ensemble.init(factory, key, size)
    built = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(
        eqx.filter(ensemble.models, eqx.is_array)))
    assert est.parts["parameters"] == built == size * (3 * 4 + 4 * 2) * 8
    assert est.parts["keys"] == np.asarray(jax.random.split(key, size)).nbytes
    assert est.parts["factory temporaries"] == size * 3 * 4 * 8  # the largest weight again


@pytest.mark.parametrize("widths, n, features", [((4, 5, 5, 2), 64, 4 ** 4),
                                                 ((4, 5, 5, 2), 3000, 4 ** 4),
                                                 ((6, 4, 3), 200, 6 ** 2),
                                                 ((6, 4, 3), 3000, 6 ** 2)])
def test_moment_estimate_bounds_what_xla_allocates(widths, n, features):
    """The moment path's estimate against XLA's own memory analysis of the compiled TSQR
    build (its temporaries and outputs): at least that, and within 3× of it (measured
    1.1–2.5× on the CPU; n < 1024 samples make chunks of n rows, not 1024). Without the
    chunk's feature block the estimate was 0.77× of XLA's at p = 36, n = 3000."""
    from conservation._data.objective import _accumulate_moments

    net = cn.PolynomialNet.random(list(widths), key=jax.random.PRNGKey(0))
    x = np.random.default_rng(0).standard_normal((n, widths[0]))
    data = cn.Dataset(x, x[:, :widths[-1]])
    rows, p = jax.eval_shape(net.features, jax.ShapeDtypeStruct((widths[0],), x.dtype)).shape
    assert (rows, p) == (1, features)  # x^{⊗2^(layers−1)} (quadratic activations)
    params, static = eqx.partition(net, eqx.is_array)
    compiled = jax.jit(lambda q, d: _accumulate_moments(eqx.combine(q, static), d, min(n, 1024))
                       ).lower(params, data).compile()
    analysis = compiled.memory_analysis()
    held = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    # On a GPU, XLA adds the QR's cuSOLVER workspace, a fixed cost beside the matrices
    # (on an H200: 1.0 MB over the matrices at p = 256, whatever n ≤ 256).
    workspace = 0 if jax.default_backend() == "cpu" else 2 * 2 ** 20
    est = memory.moments_bytes(p, widths[-1], rows, n)
    assert held <= est + workspace and est <= 3 * held, (est, held)


def test_cli_and_api_share_one_estimate():
    from conservation._dynamics.batching import check_flow_memory, check_train_memory
    from conservation._experiments.runner import build, default_n_save

    for dynamics in ({"kind": "adam", "lr": 0.1, "steps": 7},
                     {"kind": "flow", "t1": 1.0, "solver": "tsit5"}):
        config = parse_config({"model": {"kind": "deep_linear", "widths": [3, 5, 4, 2]},
                               "data": {"n": 8}, "ensemble": {"size": 3},
                               "loss": {"kind": "mse", "moments": False},
                               "dynamics": [dynamics]})
        ensemble, objectives, laws = build(config)
        params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
        run = config.dynamics[0]
        if run.kind == "flow":
            api = check_flow_memory(objectives[""], params, static, laws, (), True, "tsit5",
                                    default_n_save(run), None, 3)
        else:
            api = check_train_memory(objectives[""], params, static, laws, (), True,
                                     cn.optimizer(run.kind, lr=0.1), 7, default_n_save(run),
                                     None, 3)
        cli = estimate(config)
        for part in ("parameters", "solver state", "saved values"):
            assert cli.parts[part] == api.parts[part], (run.kind, part)


def test_sweep_never_builds_the_ensemble_it_ignores(tmp_path, monkeypatch):
    import conservation._experiments.runner as runner
    from conservation._experiments.sweep import run_sweep
    from conservation._models.base import Ensemble

    config = parse_config({"model": {"kind": "deep_linear", "widths": [3, 4, 2]},
                           "data": {"n": 8}, "ensemble": {"size": 10 ** 9},
                           "dynamics": [{"kind": "gd", "lr": 0.1, "steps": 2}],
                           "sweep": {"lr": [0.1, 0.2, 0.3], "chunk": 2}})
    assert config.ignored("sweep")  # the sweep says it ignores [ensemble]
    sizes, init = [], Ensemble.init.__func__

    def spy(cls, factory, key, size):
        sizes.append(size)
        if size > 2:  # never allocate what the test is about
            raise AssertionError(f"the sweep built an ensemble of {size} members")
        return init(cls, factory, key, size)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(Ensemble, "init", classmethod(spy))
    monkeypatch.setattr(runner, "execute_with", stop)
    with pytest.raises(Stop):
        run_sweep(config, out_dir=tmp_path / "out", progress=False, log=lambda _: None)
    assert sizes and max(sizes) <= 2


def test_ulimit_v_gives_a_named_refusal_in_the_api_and_the_cli(tmp_path):
    # The address space JAX's start takes grows with the cores (a thread stack each, malloc
    # arenas): 1.5 GB on 2 cores, 6.7 GB on 16, where a fixed 4 GiB limit killed the child in
    # XLA's thread creation. So the limit is what a started JAX holds plus 2 GiB, in which
    # 256 members of 16 MB (6.1 GB with the factory's temporaries) do not fit.
    env = os.environ | {"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "2"}
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import jax, conservation
        jax.numpy.ones(3).block_until_ready()
        print(next(line.split()[1] for line in open("/proc/self/status")
                   if line.startswith("VmSize:")))
        """)], capture_output=True, text=True, timeout=120, env=env)
    limit = (int(probe.stdout.split()[-1]) * 1024 // 2 ** 28 + 9) * 2 ** 28  # ≥ 2 GiB more
    (tmp_path / "big.toml").write_text(textwrap.dedent("""
        [model]
        kind = "deep_linear"
        widths = [1000, 1000, 1000]
        [ensemble]
        size = 256
        [data]
        n = 4
        [[dynamics]]
        kind = "gd"
        lr = 0.1
        steps = 2
        """))
    # The limit is set first thing in the child, as `ulimit -v` before `python` would.
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
        import sys, jax, conservation as cn
        from conservation._experiments.cli import main
        try:
            cn.Ensemble.init(lambda k: cn.DeepLinear.random([1000, 1000, 1000], key=k),
                             jax.random.PRNGKey(0), 256)
        except cn.InsufficientMemory as e:
            print("API:", e)
        print("CLI:", main(["run", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
        """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.toml"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, env=env)
    out = done.stdout
    assert "API: an ensemble of 256 members needs" in out, done.stdout + done.stderr
    assert f"`ulimit -v` ({limit / 1e9:.3g} GB" in out, out
    assert "CLI: 2" in out, done.stdout + done.stderr
    assert "`ulimit -v`" in done.stderr and "Traceback" not in done.stderr
