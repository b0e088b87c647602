"""Sweeps: one compile for a 64-point lr × seed sweep, resumable store, sharded = unsharded."""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from _stored import stored_arrays, write_config

import conservation._dynamics.train as train_module
import conservation._experiments.runner as runner
from conservation._experiments.cli import main
from conservation._experiments.config import ConfigError, parse_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = """
name = "s"
[model]
kind = "deep_linear"
widths = [3, 4, 2]
[data]
n = 16
[[dynamics]]
kind = "momentum"
lr = 0.05
momentum = 0.5
steps = 30
n_save = 4
[sweep]
lr = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
seed = [0, 1, 2, 3, 4, 5, 6, 7]
"""


def test_64_point_sweep_compiles_once_and_reports(tmp_path):
    before = train_module.TRACES
    assert main(["sweep", str(write_config(tmp_path, SWEEP)), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    assert train_module.TRACES - before == 1  # one trace of the training program, 64 points
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] == summary["points"] == 64
    rows = summary["rows"]
    # Per-member learning rates really differ: drift grows with lr for a fixed seed.
    seed0 = sorted((r for r in rows if r["seed"] == 0), key=lambda r: r["lr"])
    drifts = [r["max_drift[balance[0]]"] for r in seed0]
    assert drifts[-1] > 5 * drifts[0]  # identical lrs would give equal drifts
    assert (tmp_path / "out" / "summary.csv").read_text().startswith("point,lr,seed,")
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000


def test_an_interrupted_sweep_resumes_without_touching_finished_points(tmp_path, monkeypatch):
    config = write_config(tmp_path, SWEEP.replace("[sweep]", "[sweep]\nchunk = 16"))
    main(["sweep", str(config), "--out", str(tmp_path / "reference"), "--quiet"])
    real, calls = runner.execute_with, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute_with", crash_on_third)
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").iterdir()}
    assert len(finished) == 32  # two chunks of 16 were written before the crash
    monkeypatch.setattr(runner, "execute_with", real)
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "points").iterdir()}
    assert len(after) == 64 and all(after[n] == t for n, t in finished.items())
    resumed, reference = stored_arrays(tmp_path / "out"), stored_arrays(tmp_path / "reference")
    for name, arrays in reference.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(resumed[name][key], value)


@pytest.mark.slow  # end-to-end; keeps the default suite under 10 min on 2 cores
def test_sharded_sweep_over_four_cpu_devices_matches_unsharded(tmp_path):
    config = write_config(tmp_path, SWEEP)
    sharded = write_config(tmp_path, SWEEP.replace("[sweep]", "[sweep]\ndevices = 4"),
                           "sharded.toml")
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                        "JAX_PLATFORMS": "cpu"}
    script = (
        "import sys, jax; from conservation._experiments.cli import main; "
        "assert len(jax.devices()) == 4; "
        "sys.exit(main(['sweep', sys.argv[1], '--out', sys.argv[2], '--quiet']))")
    for path, out in ((config, "plain"), (sharded, "sharded")):
        subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / out)],
                       check=True, env=env, cwd=ROOT)
    plain, split = stored_arrays(tmp_path / "plain"), stored_arrays(tmp_path / "sharded")
    assert len(plain) == len(split) == 64
    for name, arrays in plain.items():
        for key, value in arrays.items():
            if key == "identity":  # the point's fingerprint names its config, which differs
                continue
            np.testing.assert_allclose(split[name][key], value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("change, message", [
    ("[sweep]\nlr = []", "axis `sweep.lr` must be a non-empty list"),
    ("[sweep]\nlearning_rate = [0.1]", "unknown field `sweep.learning_rate`"),
    ("[sweep]\nseed = [0.5]", "axis `sweep.seed` must list an integer values"),
    ("[sweep]\nwidths = [[3, 5]]", "must keep the depth and input width"),
    ("[sweep]\nchunk = -1\nlr = [0.1]", "field `sweep.chunk` must be an integer ≥ 0"),
])
def test_sweep_config_errors_name_the_field(change, message):
    raw = tomllib.loads(SWEEP.split("[sweep]")[0] + change)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert message in str(error.value)


def test_shipped_sweep_config_is_valid():
    from conservation._experiments.config import load_config

    config = load_config(ROOT / "configs" / "sweep_lr_seed.toml")
    assert len(config.sweep["axes"]["lr"]) * len(config.sweep["axes"]["seed"]) == 64


# ----------------------------------------------------------------------------- issue 13 axes

FLOW_SWEEP = """
name = "f"
[model]
kind = "deep_linear"
widths = [2, 3, 1]
[data]
n = 6
[[dynamics]]
kind = "flow"
solver = "tsit5"  # "auto" would add its probe's solve to the trace count
t1 = 2.0
n_save = 3
[sweep]
rtol = [1e-3, 1e-6, 1e-9]
seed = [0, 1]
"""


def test_flow_sweep_over_rtol_and_seed_compiles_once(tmp_path, monkeypatch):
    import diffrax

    import conservation._dynamics.flow as flow
    from conservation._experiments.config import load_config
    from conservation._experiments.sweep import _groups, sweep_points

    traces = []

    def counting(real):
        def call(*args, **kwargs):  # runs once per trace of the compiled solve
            traces.append(1)
            return real(*args, **kwargs)
        return call

    # One member at a time runs diffrax's solve, lanes (the CPU default) their own loop.
    monkeypatch.setattr(diffrax, "diffeqsolve", counting(diffrax.diffeqsolve))
    monkeypatch.setattr(flow, "solve_lanes", counting(flow.solve_lanes))
    path = write_config(tmp_path, FLOW_SWEEP)
    config = load_config(path)
    groups = _groups(sweep_points(config), config.dynamics[0])
    assert len(groups) == 1 and [len(b) for b in groups[0].batches] == [2, 2, 2]
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert len(traces) == 1  # 6 points, 3 tolerances: one compiled solve
    points = stored_arrays(tmp_path / "out")
    steps = {r: int(points[f"{2 * k}.npz"]["num_steps"]) for k, r in enumerate([1e-3, 1e-6,
                                                                                1e-9])}
    assert steps[1e-3] < steps[1e-6] < steps[1e-9]  # each point ran at its own tolerance
    # The stored points equal a direct gradient_flow call with that rtol and those seeds.
    import jax

    import conservation as cn

    point = config.at({"rtol": 1e-6, "seed": 0})
    _, objectives, laws = runner.build(point)
    make = runner.model_factory(point.model)
    ensemble = cn.Ensemble.stack([make(jax.random.PRNGKey(s), 1.0) for s in (0, 1)])
    direct = cn.gradient_flow(objectives[""], ensemble, 2.0, n_save=3, rtol=1e-6, atol=1e-6,
                              laws=laws)
    for j, index in enumerate((2, 3)):
        np.testing.assert_array_equal(points[f"{index}.npz"]["loss"], direct.loss[j])


def test_auto_solver_is_resolved_once_per_solve_and_recorded(tmp_path, monkeypatch):
    # Three chunks of one point each: a per-chunk probe could give points of one sweep
    # different solvers depending on chunking, dealing and resumption.
    import conservation._dynamics.flow as flow
    import conservation._dynamics.solvers as solvers

    probes = []
    real = solvers.choose_solver

    def counting(*args, **kwargs):
        probes.append(1)
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("gradient_flow probed a solver inside a sweep chunk")

    monkeypatch.setattr(solvers, "choose_solver", counting)
    monkeypatch.setattr(flow, "_choose", refuse)
    text = FLOW_SWEEP.replace('solver = "tsit5"', 'solver = "auto"').replace(
        "rtol = [1e-3, 1e-6, 1e-9]", "chunk = 1")
    path = write_config(tmp_path, text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert len(probes) == 1
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    # A non-stiff deep linear flow: the explicit solver, recorded for every point.
    assert [r["solver"] for r in rows] == ["tsit5", "tsit5"]


GROUP_SWEEP = """
name = "g"
[model]
kind = "deep_linear"
widths = [3, 2, 1]
init_scale = 0.5
[data]
n = 5
[augmentation]
group = "cyclic_shift"
compare = false
[[dynamics]]
kind = "gd"
lr = 0.02
steps = 20
n_save = 3
[sweep]
loss = ["mse", "log_cosh"]
group = ["cyclic_shift", "sign_flips"]
seed = [0, 1, 2]
"""


@pytest.mark.slow  # ~30 s on a loaded 2-core machine: four builds and compiles
def test_loss_and_group_sweep_compiles_once_per_static_group(tmp_path):
    from conservation._experiments.config import load_config

    path = write_config(tmp_path, GROUP_SWEEP)
    before = train_module.TRACES
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert train_module.TRACES - before == 4  # 2 losses × 2 groups; seeds are members
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] == 12
    # Each group really ran its own loss: the stored final loss of a point equals the loss
    # of its own config evaluated at the stored... initial loss, checked against numpy.
    config = load_config(path)
    points = stored_arrays(tmp_path / "out")
    for index, point in enumerate(summary["rows"]):
        if point["seed"] != 0:
            continue
        cfg = config.at({"loss": point["loss"], "group": point["group"], "seed": 0})
        ensemble, objectives, _ = runner.build(cfg)
        model = runner.model_factory(cfg.model)(
            __import__("jax").random.PRNGKey(0), cfg.model.init_scale)
        initial = float(objectives["augmented"](model))
        np.testing.assert_allclose(points[f"{index}.npz"]["loss"][0], initial, rtol=1e-12)
    losses = {(r["loss"], r["group"]): r["final_loss"] for r in summary["rows"]
              if r["seed"] == 0}
    assert len(set(losses.values())) == 4  # four different objectives


def test_data_axes_group_points_and_each_point_is_its_own_config():
    from conservation._experiments.sweep import _groups, axis_role, sweep_points

    raw = tomllib.loads(SWEEP.split("[sweep]")[0] + "[sweep]\nn = [8, 16]\nnoise = [0.0, 0.1]\n"
                        "lr = [0.01, 0.02]\nseed = [0, 1]")
    config = parse_config(raw)
    run = config.dynamics[0]
    assert [axis_role(a, run) for a in config.sweep.axes] == ["static", "static", "member",
                                                              "member"]
    groups = _groups(sweep_points(config), run)
    assert [g.static for g in groups] == [{"n": 8, "noise": 0.0}, {"n": 8, "noise": 0.1},
                                          {"n": 16, "noise": 0.0}, {"n": 16, "noise": 0.1}]
    assert all(len(g.batches) == 1 and len(g.indices) == 4 for g in groups)
    point = config.at(groups[3].static)
    assert point.data.n == 16 and point.data.noise == 0.1 and point.dynamics[0].lr == 0.05
    # flows: lr-like axes become per-call scalars, one batch per value
    flow = parse_config(tomllib.loads(FLOW_SWEEP.replace("rtol = [1e-3, 1e-6, 1e-9]",
                                                         "t1 = [1.0, 2.0]\nsolver = "
                                                         "[\"tsit5\", \"heun\"]")))
    groups = _groups(sweep_points(flow), flow.dynamics[0])
    assert [g.static for g in groups] == [{"solver": "tsit5"}, {"solver": "heun"}]
    assert [[len(b) for b in g.batches] for g in groups] == [[2, 2], [2, 2]]


_SHARDED_FLOW = """
import jax, numpy as np
import conservation as cn
assert len(jax.devices()) == 4
teacher = cn.DeepLinear.random((4, 6, 3), key=jax.random.PRNGKey(0))
data = cn.teacher_dataset(teacher, cn.gaussian_inputs(jax.random.PRNGKey(1), 32, (4,)))
ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random((4, 6, 3), key=k, init_scale=0.6),
                            jax.random.PRNGKey(2), 8)
objective = cn.make_objective(cn.MSE(), data, ensemble)
split = cn.shard_ensemble(ensemble, 4)
for batch in (1, 4):
    whole = cn.gradient_flow(objective, ensemble, 5.0, rtol=1e-9, solver="tsit5", n_save=11,
                             batch_size=batch)
    parts = cn.gradient_flow(objective, split, 5.0, rtol=1e-9, solver="tsit5", n_save=11,
                             batch_size=batch)
    # Each device integrated its own two members: the results stay split the same way.
    for out in (parts.loss, parts.status, *jax.tree_util.tree_leaves(parts.final.models)):
        assert out.sharding.spec == jax.sharding.PartitionSpec("ensemble"), out.sharding
        assert len(out.sharding.device_set) == 4
    np.testing.assert_array_equal(parts.num_steps, whole.num_steps)
    # The result records the lanes each device ran (it holds 2 members), not the request.
    assert (whole.batch_size, parts.batch_size) == (batch, min(batch, 2)), (
        whole.batch_size, parts.batch_size)
    np.testing.assert_allclose(parts.loss, whole.loss, rtol=1e-12, atol=1e-15)
    for name in whole.drift:
        np.testing.assert_allclose(parts.drift[name], whole.drift[name], rtol=1e-9,
                                   atol=1e-15)
print("ok")
"""


def test_a_sharded_flow_runs_each_devices_members_there():
    """An ensemble split over 4 (forced CPU) devices: every device runs its members in its own
    map (batch_size=1) or lanes (batch_size=4: 2 per device); the same numbers as unsplit, and
    the results stay split (left to GSPMD, the loop ran whole, replicated, on every device)."""
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                        "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _SHARDED_FLOW], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
