"""Memory estimate (issue 13 item 2): counts checked against real models, refusal before any
allocation, with the number and the fix."""

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
    # (a 2-step GD run saves every step by default: 3 saves)
    assert four.parts["saved values"] == 4 * (3 * (1 + 2 * laws) + entries) * 8


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
    with pytest.raises(ConfigError, match=r"the machine has 1e-06 GB: reduce"):
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
    # The CPU: 2 lanes, 4 for an implicit solver (bench_lanes.py), never more than the members.
    assert default_batch_size(grad, y0, 7, dfx.Tsit5(), 101, 2, None) == 2
    assert default_batch_size(grad, y0, 7, cn.StabilizedRK(), 101, 2, None) == 2
    assert default_batch_size(grad, y0, 7, dfx.Kvaerno5(), 101, 2, None) == 4
    assert default_batch_size(grad, y0, 1, dfx.Kvaerno5(), 101, 2, None) == 1
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

    # On the CPU (no memory statistics); one model runs alone whatever the solver.
    monkeypatch.setattr(flow, "free_device_memory", lambda: None)
    for solver, model_or_ensemble in (("tsit5", ensemble), ("stabilized", ensemble),
                                      ("kvaerno5", ensemble), ("kvaerno5", model)):
        with pytest.raises(KeyboardInterrupt):
            cn.gradient_flow(objective, model_or_ensemble, 1.0, solver=solver, progress=False)
    assert seen == [3, 2, 2, 4, 1]
