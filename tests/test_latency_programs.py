"""A warm first call pays for little besides its own work: `import conservation` leaves out
what a first flow or training run does not need (every public name still importable, from the
module that defines it), and the auto solver probe hands XLA one program, not one more for
its scalar arguments."""

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.flatten_util
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._dynamics import solvers
from conservation._dynamics.flow import GradientField

# Modules a README-style run (models, data, objective, gradient_flow, train, pointwise_check)
# never touches: pydantic and the config tables, the sweep runner, law discovery and counting,
# the central-flow analysis, the other model families.
UNNEEDED = ("pydantic", "conservation._experiments.config", "conservation._experiments.sweep",
            "conservation._laws.counting", "conservation._laws.discovery",
            "conservation._laws.generators", "conservation._dynamics.central",
            "conservation._models.transformer")


# In a fresh process: the modules `import conservation` loads, then the programs compiled
# by making optimizers (their hyperparameters go to the device as they are: no program).
SCRIPT = r"""
import gc, json, sys, jax, jax.monitoring
import conservation as cn
frozen = gc.get_freeze_count()
loaded = sorted(sys.modules)
programs = []
def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        programs.append(kwargs.get("fun_name"))
jax.monitoring.register_event_duration_secs_listener(listen)
cn.optimizer("gd", lr=0.05)
cn.optimizer("momentum", lr=0.1, momentum=0.9, weight_decay=1e-4)
cn.optimizer("adam", lr=1e-3, lr_scales=[1.0, 0.5])
print(json.dumps({"loaded": loaded, "programs": programs, "frozen": frozen}))
"""


def test_import_leaves_out_what_a_first_run_does_not_need_and_freezes_what_it_made():
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True,
                         text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = set(found["loaded"])
    assert "conservation._dynamics.flow" in loaded  # control: the core is imported eagerly
    assert "conservation._dynamics.train" in loaded
    assert {m for m in UNNEEDED if m in loaded} == set()
    assert found["programs"] == []
    # What the import made is out of the cyclic collector's sight (JAX's modules alone are
    # ~100 000 objects): full collections during a run and at exit skip it.
    assert found["frozen"] > 50_000


def test_every_lazy_name_is_the_object_its_module_defines():
    lazy = cn._LAZY
    assert len(lazy) > 40 and set(lazy) <= set(cn.__all__)
    for name, module in lazy.items():
        # The reference is the defining module's own attribute, imported directly.
        want = getattr(importlib.import_module(f"conservation{module}"), name)
        assert getattr(cn, name) is want, name
    assert set(cn.__all__) <= set(dir(cn))
    namespace = {}
    exec("from conservation import *", namespace)
    assert set(cn.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        cn.NotAName  # noqa: B018  (a name that is neither eager nor lazy)


@pytest.fixture
def programs():
    """The names of the XLA programs handed to the compiler inside the `with` block."""
    names = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield names
    jax.monitoring.unregister_event_duration_listener(listen)


def test_the_probe_is_one_program_and_its_scalar_transfers_change_nothing(programs):
    # Shapes no other test uses, so that nothing is compiled already in this process.
    key = jax.random.PRNGKey(5)
    net = cn.DeepLinear.random([3, 7, 2], key=key)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (23, 3)))
    data = cn.Dataset(x, x @ np.full((3, 2), 0.5))
    objective = cn.make_objective(cn.MSE(), data, net)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    field = GradientField()  # (its weight decay is put on the device once, here)
    # As in a fresh process: no program of an earlier test (one-operation programs, such as
    # a conversion of a constant, are shared by every shape) is found compiled.
    jax.clear_caches()
    del programs[:]
    choice = solvers._choose(params, static, objective, field, 3.0, 1000)
    assert programs == ["jit(_probe)"]
    # The same program as with jnp scalars: the call below compiles only the two
    # scalars' transfers, and its numbers equal the answer's bit for bit.
    del programs[:]
    rho0, rho_max, probe_t = (float(v) for v in solvers._probe(
        params, static, objective, field, jnp.asarray(3.0, float),
        jnp.asarray(1e-4, float), 2_000))
    assert "jit(_probe)" not in programs
    assert (choice.rho0, choice.rho_max, choice.probe_t) == (rho0, rho_max, probe_t)
    # And ρ is the Hessian's: ρ₀ (a few power iterations: a lower bound) is within 2 % below
    # the largest eigenvalue of the dense Hessian at θ₀ (numpy on jax.hessian of the loss).
    y0, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = jax.hessian(lambda y: objective(eqx.combine(unravel(y), static)))(y0)
    top = np.linalg.eigvalsh(np.asarray(hessian))[-1]
    assert 0.98 * top <= choice.rho0 <= top * (1 + 1e-12)
    assert choice.rho_max >= choice.rho0 and choice.name == "tsit5"


def test_auto_compiles_the_tsit5_solve_while_it_probes_and_the_call_reuses_it(monkeypatch):
    """`solver="auto"` compiles the Tsit5 solve in a second thread while its probe runs; when
    the probe chooses Tsit5 the call runs that very program: one `_flow` compile, not two,
    and the numbers of an explicit `solver="tsit5"` run bit for bit (which compiles nothing
    more). A shape no other test uses, so that every program here is new to the process."""
    from conservation._dynamics import flow as flow_module

    started = []
    real = flow_module._compile_ahead

    def spy(args, kwargs):
        started.append(args[5])  # the solver it compiles for
        return real(args, kwargs)

    monkeypatch.setattr(flow_module, "_can_compile_ahead", lambda: True)
    monkeypatch.setattr(flow_module, "_compile_ahead", spy)
    key_t, key_x, key_i = jax.random.split(jax.random.PRNGKey(7), 3)
    teacher = cn.DeepLinear.random([3, 7, 2], key=key_t)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(key_x, 11, (3,)))
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 7, 2], key=k), key_i, 3)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    programs = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            programs.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        auto = cn.gradient_flow(objective, ensemble, 2.0, rtol=1e-9, n_save=5)
        solves = programs.count("jit(_flow)")
        explicit = cn.gradient_flow(objective, ensemble, 2.0, rtol=1e-9, n_save=5,
                                    solver="tsit5")
        again = programs.count("jit(_flow)")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert auto.solver == "tsit5" and len(started) == 1
    assert isinstance(started[0], type(flow_module._resolve_solver("tsit5")))
    assert solves == 1 and again == 1, programs
    for a, b in [(auto.loss, explicit.loss), (auto.num_steps, explicit.num_steps),
                 *[(auto.drift[k], explicit.drift[k]) for k in auto.drift]]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ml_dtypes_is_a_release_that_imports_fast():
    """JAX imports ml_dtypes in every process; its 0.7.0 release takes ~0.57 s of that (its
    ufunc loops registered in quadratic time), 0.6.0 ~0.004 s with the same dtypes.
    `pyproject.toml` caps it below 0.7, so a fresh install resolves to a fast one."""
    version = importlib.metadata.version("ml_dtypes")
    assert tuple(int(x) for x in version.split(".")[:2]) < (0, 7), version
    # The declaration itself, not the installed metadata: the package may run from a source
    # tree on PYTHONPATH (as on the GPU machine), with no metadata at all.
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    requirement = [r for r in dependencies if r.replace("-", "_").startswith("ml_dtypes")]
    assert requirement and "<0.7" in requirement[0].replace(" ", ""), requirement
