"""Observables of (θ, data) monitored at every save (issue 25, item 1): the sharpness against
`numpy.linalg.eigvalsh` of the dense Hessian, the gradient norm, the held-out loss and the
NTK kernel distance against closed forms in numpy (a two-layer linear net), along a flow (in
lanes) and a discrete run, a 10⁵-parameter sharpness without any P² array, and no recompile
for new traced values."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._dynamics import train as train_module
from conservation._dynamics.observables import top_eigenvalues

WIDTHS = (3, 4, 2)


def flat_theta(model):
    """The law Q(θ) = θ: the flat parameters at every save (module-level: a static field)."""
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


THETA = cn.FunctionLaw(flat_theta, "theta")


def split(theta, widths=WIDTHS):
    """(W1, W2) of a two-layer DeepLinear of `widths` from its flat parameters, in numpy."""
    theta = np.asarray(theta)
    d, h, o = widths
    return theta[: h * d].reshape(h, d), theta[h * d:].reshape(o, h)


def numpy_loss(theta, x, y):
    w1, w2 = split(theta)
    r = x @ w1.T @ w2.T - y
    return np.mean(np.sum(r**2, axis=1))


def numpy_gradient_norm(theta, x, y):
    # L = mean_i ‖W2 W1 x_i − y_i‖²: ∇W1 = (2/N) W2ᵀ Rᵀ X, ∇W2 = (2/N) Rᵀ X W1ᵀ.
    w1, w2 = split(theta)
    r = x @ w1.T @ w2.T - y
    g1 = 2 / len(x) * w2.T @ r.T @ x
    g2 = 2 / len(x) * r.T @ x @ w1.T
    return np.sqrt(np.sum(g1**2) + np.sum(g2**2))


def numpy_ntk(theta, probe, widths):
    # f_a(x) = (W2 W1 x)_a: K((x, a), (x', b)) = (W2 W2ᵀ)_ab xᵀx' + δ_ab (W1 x)ᵀ(W1 x').
    w1, w2 = split(theta, widths)
    o = w2.shape[0]
    k = np.kron(probe @ probe.T, w2 @ w2.T)
    h = probe @ w1.T
    return k + np.kron(h @ h.T, np.eye(o))


def numpy_kernel_distance(theta0, theta, probe, widths=WIDTHS):
    k0, k = numpy_ntk(theta0, probe, widths), numpy_ntk(theta, probe, widths)
    return 1 - np.sum(k0 * k) / (np.linalg.norm(k0) * np.linalg.norm(k))


@eqx.filter_jit
def dense_hessian(objective, theta):
    """The dense Hessian of `objective` at the flat parameters of a DeepLinear WIDTHS."""
    model = cn.DeepLinear.random(WIDTHS, key=jax.random.PRNGKey(0))
    _, unravel = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    return jax.hessian(lambda z: objective(eqx.combine(unravel(z), static)))(theta)


def dense_top3(objective, theta):
    """Top-3 eigenvalues of the dense Hessian, by numpy.linalg.eigvalsh."""
    hessian = np.asarray(dense_hessian(objective, jnp.asarray(theta)))
    return np.linalg.eigvalsh(hessian)[::-1][:3]


@pytest.fixture(scope="module")
def problem():
    kx, kt, kh, ki = jax.random.split(jax.random.PRNGKey(7), 4)
    teacher = cn.DeepLinear.random((3, 2), key=kt)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 20, (3,)))
    held = cn.teacher_dataset(teacher, cn.gaussian_inputs(kh, 10, (3,)), noise=0.3, key=kh)
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random(WIDTHS, key=k), ki, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble, moments=False)
    held_out = cn.make_objective(cn.MSE(), held, ensemble, moments=False)
    probe = np.asarray(data.x[:4])
    observables = (cn.Sharpness(k=3), cn.GradientNorm(), cn.KernelDistance(probe),
                   cn.HeldOutLoss(held_out))
    return dict(data=data, held=held, ensemble=ensemble, objective=objective,
                held_out=held_out, probe=probe, observables=observables)


@pytest.fixture(scope="module")
def flow(problem):
    # Two lanes (the default CPU batch), three saves.
    return cn.gradient_flow(problem["objective"], problem["ensemble"], 0.4, n_save=3,
                            solver="tsit5", rtol=1e-10, laws=(THETA,), values=["theta"],
                            observables=problem["observables"], batch_size=2)


@pytest.fixture(scope="module")
def discrete(problem):
    return cn.train(problem["objective"], problem["ensemble"], cn.optimizer("gd", lr=0.05), 4,
                    n_save=3, laws=(THETA,), values=["theta"],
                    observables=problem["observables"])


def _check_against_numpy(result, problem):
    data, held, probe = problem["data"], problem["held"], problem["probe"]
    x, y = np.asarray(data.x), np.asarray(data.y)
    theta = np.asarray(result.values["theta"])  # (B, T, P)
    obs = {k: np.asarray(v) for k, v in result.observables.items()}
    assert obs["sharpness"].shape == theta.shape[:2] + (3,)
    assert all(obs[k].shape == theta.shape[:2]
               for k in ("gradient_norm", "kernel_distance", "held_out_loss"))
    for b in range(theta.shape[0]):
        for t in range(theta.shape[1]):
            top = dense_top3(problem["objective"], theta[b, t])
            # Two-sided: too large and too small both fail; all three are distinct.
            np.testing.assert_allclose(obs["sharpness"][b, t], top, rtol=1e-8, atol=0)
            np.testing.assert_allclose(obs["gradient_norm"][b, t],
                                       numpy_gradient_norm(theta[b, t], x, y), rtol=1e-10)
            np.testing.assert_allclose(
                obs["held_out_loss"][b, t],
                numpy_loss(theta[b, t], np.asarray(held.x), np.asarray(held.y)), rtol=1e-10)
            np.testing.assert_allclose(
                obs["kernel_distance"][b, t],
                numpy_kernel_distance(theta[b, 0], theta[b, t], probe), rtol=1e-6,
                atol=1e-15)
    # The kernel is that of θ₀ at the start: distance 0 (to the square of the kernels'
    # round-off); it moves afterwards.
    assert np.all(np.abs(obs["kernel_distance"][:, 0]) < 1e-28)
    assert np.all(obs["kernel_distance"][:, -1] > 1e-6)
    # The held-out loss is not the training loss (negative control of the wiring).
    assert np.all(np.abs(obs["held_out_loss"] - np.asarray(result.loss)) > 1e-3)


def test_flow_observables_match_dense_references(flow, problem):
    assert flow.status_names() == ["success"] * 2
    _check_against_numpy(flow, problem)
    # The sharpness changes along the flow (the saves are not the start repeated).
    s = np.asarray(flow.observables["sharpness"])[:, :, 0]
    assert np.all(np.abs(s[:, -1] - s[:, 0]) > 1e-3 * s[:, 0])


def test_train_observables_match_dense_references(discrete, problem):
    assert discrete.status_names() == ["success"] * 2
    _check_against_numpy(discrete, problem)
    summary = discrete.summary()["observables_final_median"]
    assert len(summary["sharpness"]) == 3
    np.testing.assert_allclose(summary["gradient_norm"],
                               np.median(np.asarray(discrete.observables["gradient_norm"])[:, -1]))


@pytest.mark.slow  # a second flow program (one member at a time): ~20 s
def test_one_member_at_a_time_saves_the_same(problem, flow):
    one = cn.gradient_flow(problem["objective"], problem["ensemble"], 0.4, n_save=3,
                           solver="tsit5", rtol=1e-10, laws=(THETA,), values=["theta"],
                           observables=problem["observables"][:2], batch_size=1)
    for name in ("sharpness", "gradient_norm"):
        np.testing.assert_allclose(one.observables[name], flow.observables[name], rtol=1e-8)


def test_new_traced_values_do_not_recompile(problem, discrete):
    """New tolerances, held-out data and probes, and new learning rates, reuse the programs."""
    compiles = [0]

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        data = problem["held"]
        other = cn.make_objective(cn.MSE(), cn.Dataset(data.x * 2, data.y), problem["ensemble"],
                                  moments=False)
        observables = (cn.Sharpness(k=3, tol=1e-9), cn.GradientNorm(),
                       cn.KernelDistance(problem["probe"] + 1.0), cn.HeldOutLoss(other))
        traces = train_module.TRACES
        compiles[0] = 0
        again = cn.train(problem["objective"], problem["ensemble"],
                         cn.optimizer("gd", lr=0.02), 4, n_save=3, laws=(THETA,),
                         values=["theta"], observables=observables)
        assert train_module.TRACES == traces
        assert compiles[0] == 0, compiles[0]
        # A flow with the new values and another final time: the same program.
        cn.gradient_flow(problem["objective"], problem["ensemble"], 0.3, n_save=3,
                         solver="tsit5", rtol=1e-10, laws=(THETA,), values=["theta"],
                         observables=observables, batch_size=2)
        assert compiles[0] == 0, compiles[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    # Other values gave other numbers (the values were used, not the compiled-in ones).
    assert not np.allclose(again.observables["held_out_loss"],
                           discrete.observables["held_out_loss"])


def test_top_eigenvalues_repeated_and_unconverged():
    n = 200
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    spectrum = np.concatenate([[5.0, 5.0, 3.0, -4.0, -3.5, -3.0], rng.uniform(-2, 2, n - 6)])
    a = jnp.asarray(q @ np.diag(spectrum) @ q.T)
    # 20 blocks of 5: a basis of half the directions (the values are not exact by exhaustion).
    top3 = jax.jit(lambda m, tol: top_eigenvalues(lambda v: m @ v, jnp.zeros(n), 3, 20, tol))
    # A double top eigenvalue is found twice (the block holds k + 2 vectors).
    np.testing.assert_allclose(top3(a, 1e-8), [5.0, 5.0, 3.0], rtol=1e-9)
    # All negative: the largest algebraic eigenvalues (−2, −2.5, −3), not 0 or the largest |λ|.
    np.testing.assert_allclose(top3(-a - 6 * jnp.eye(n), 1e-8), [-2.0, -2.5, -3.0],
                               rtol=1e-9)
    # Too few iterations for the tolerance: NaN, not an inaccurate number.
    rough = top_eigenvalues(lambda v: a @ v, jnp.zeros(n), 3, 2, 1e-12)
    assert np.all(np.isnan(rough))


N_BIG = 100_000


def test_sharpness_of_a_1e5_parameter_model_never_forms_the_hessian():
    """L(θ) = ‖√d ⊙ Qθ‖² with Q a product of three Householder reflections (O(P) each):
    Hessian 2QᵀDQ (not diagonal), eigenvalues 2d exactly. No array of the program comes
    within 100× of P² numbers (the largest is the Krylov basis, iterations · (k + 2) · P)."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.0, 1.0, N_BIG)
    d[:3] = [3.0, 2.5, 2.0]
    vs = [jnp.asarray(v / np.linalg.norm(v)) for v in rng.normal(size=(3, N_BIG))]
    scale = jnp.asarray(np.sqrt(d))

    def fn(params, x):
        z = params["theta"]
        for v in vs:
            z = z - 2 * v * (v @ z)
        return scale * z * x[0]

    model = cn.FunctionModel(fn, {"theta": jnp.asarray(rng.normal(size=N_BIG))})
    data = cn.Dataset(jnp.ones((1, 1)), jnp.zeros((1, N_BIG)))
    objective = cn.make_objective(cn.MSE(), data, model)
    sharpness = cn.Sharpness(k=2, iterations=30, tol=1e-8)
    jaxpr = jax.make_jaxpr(lambda m: sharpness(objective, m))(model)
    assert 0 < _largest_array(jaxpr.jaxpr) <= 30 * 4 * N_BIG < N_BIG**2 / 100
    top = jax.jit(lambda m: sharpness(objective, m))(model)
    np.testing.assert_allclose(top, [6.0, 5.0], rtol=1e-10)


def _largest_array(jaxpr) -> int:
    largest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_array(inner))
    return largest


def test_kernel_distance_lazy_and_rich():
    """≈ 0 for a wide net with a large init (lazy), O(1) for a small init (rich); against the
    closed-form NTK of a two-layer linear net in numpy."""
    kx, kt, ki = jax.random.split(jax.random.PRNGKey(3), 3)
    teacher = cn.DeepLinear.random((3, 2), key=kt)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(kx, 20, (3,)))
    probe = np.asarray(data.x[:3])
    out, widths = {}, (3, 64, 2)
    for label, scale in (("lazy", 1.0), ("rich", 0.01)):
        model = cn.DeepLinear.random(widths, key=ki, init_scale=scale)
        objective = cn.make_objective(cn.MSE(), data, model)
        r = cn.train(objective, model, cn.optimizer("gd", lr=0.01), 2000, n_save=2,
                     laws=(THETA,), values=["theta"], observables=(cn.KernelDistance(probe),))
        theta = np.asarray(r.values["theta"])[0]
        got = np.asarray(r.observables["kernel_distance"])[0]
        assert abs(got[0]) < 1e-28
        np.testing.assert_allclose(
            got[-1], numpy_kernel_distance(theta[0], theta[-1], probe, widths), rtol=1e-6)
        out[label] = got[-1], float(r.loss[0, -1] / r.loss[0, 0])
    # Both fitted the data (the loss fell by > 100×): the kernels moved by training.
    assert out["lazy"][1] < 1e-2 and out["rich"][1] < 1e-2, out
    # Measured: lazy 7.7e-7, rich 0.050.
    assert out["lazy"][0] < 1e-4, out
    assert out["rich"][0] > 0.02, out


def test_bad_observables_are_refused(problem):
    with pytest.raises(cn.ArgumentError, match="`k`"):
        cn.Sharpness(k=0)
    with pytest.raises(cn.ArgumentError, match="`tol`"):
        cn.Sharpness(tol=1.5)
    with pytest.raises(cn.ArgumentError, match="`iterations`"):
        cn.Sharpness(iterations=2.0)
    with pytest.raises(cn.ArgumentError, match="`objective`"):
        cn.HeldOutLoss(problem["data"])
    with pytest.raises(cn.ArgumentError, match="`x_probe`"):
        cn.KernelDistance(np.zeros((0, 3)))
    with pytest.raises(cn.ArgumentError, match="`x_probe`"):
        cn.KernelDistance(np.full((2, 3), np.nan))
    objective, ensemble = problem["objective"], problem["ensemble"]
    with pytest.raises(cn.ArgumentError, match="repeat the names"):
        cn.gradient_flow(objective, ensemble, 1.0, observables=(cn.GradientNorm(),
                                                                cn.GradientNorm()))
    with pytest.raises(cn.ArgumentError, match="`observables`"):
        cn.train(objective, ensemble, cn.optimizer("gd", lr=0.1), 2, observables=("sharpness",))
    first = cn.train(objective, ensemble, cn.optimizer("gd", lr=0.1), 2, n_save=2,
                     resumable=True)
    with pytest.raises(cn.ArgumentError, match="differ from the resumed"):
        cn.train(objective, first.final, cn.optimizer("gd", lr=0.1), 4, n_save=2,
                 resume=first, observables=(cn.GradientNorm(),))


CONFIG = {"model": {"kind": "deep_linear", "widths": [3, 4, 2]}, "data": {"n": 20},
          "ensemble": {"size": 2}, "dynamics": [{"kind": "gd", "lr": 0.05, "steps": 4}]}


def test_observables_table_is_validated():
    config = cn.parse_config({**CONFIG, "observables": {"sharpness": 2, "gradient_norm": True}})
    assert (config.observables.sharpness, config.observables.gradient_norm,
            config.observables.kernel_distance) == (2, True, False)
    # Without the table, the resolved config is what it was before the table existed.
    assert "observables" not in cn.parse_config(CONFIG).to_dict()
    for table, message in (({"sharpness": -1}, "observables.sharpness"),
                           ({"sharpness": 2.0}, "observables.sharpness"),
                           ({"gradient_norm": 1}, "observables.gradient_norm"),
                           ({"kernel_probe": 0}, "observables.kernel_probe"),
                           ({"hessian": 3}, "observables.hessian")):
        with pytest.raises(cn.ConfigError, match=message):
            cn.parse_config({**CONFIG, "observables": table})
    with pytest.raises(cn.ConfigError, match="checkpoints"):
        cn.parse_config({**CONFIG, "observables": {"kernel_distance": True},
                         "dynamics": [{"kind": "gd", "lr": 0.05, "steps": 4,
                                       "checkpoints": 2}]})


@pytest.mark.slow  # a run of the runner (its own compiled program): ~20 s
def test_config_run_stores_observables(tmp_path):
    from conservation._experiments.runner import run_config
    from conservation._experiments.store import load_npz, read_json

    config = cn.parse_config({**CONFIG, "observables": {
        "sharpness": 2, "gradient_norm": True, "kernel_distance": True, "kernel_probe": 4}})
    run_config(config, out_dir=tmp_path, progress=False, log=lambda _: None)
    (npz,) = tmp_path.glob("0-*.npz")
    arrays = load_npz(npz)
    assert arrays["observables/sharpness"].shape == (2, 5, 2)
    assert arrays["observables/gradient_norm"].shape == (2, 5)
    assert np.all(np.abs(arrays["observables/kernel_distance"][:, 0]) < 1e-28)
    # The stored sharpness is the dense Hessian's at the stored final parameters.
    from conservation._experiments.runner import build, final_ensemble

    ensemble, objectives, _ = build(config)
    final = final_ensemble(arrays, ensemble)
    for b in range(2):
        member = final[b]
        y, unravel = jfu.ravel_pytree(eqx.filter(member, eqx.is_inexact_array))
        static = eqx.filter(member, eqx.is_inexact_array, inverse=True)
        hessian = jax.hessian(lambda z: objectives[""](eqx.combine(unravel(z), static)))(y)
        top = np.linalg.eigvalsh(np.asarray(hessian))[::-1][:2]
        np.testing.assert_allclose(arrays["observables/sharpness"][b, -1], top, rtol=1e-8)
    summary = read_json(tmp_path / "summary.json")
    assert set(summary["runs"][0]["observables_final_median"]) == {
        "sharpness", "gradient_norm", "kernel_distance"}


def test_plot_draws_observables_on_linear_axes():
    from conservation._experiments.plot import results_figure

    b, t = 2, 4
    common = dict(t=jnp.linspace(0, 1, t), loss=jnp.ones((b, t)), values={},
                  drift={"law": jnp.full((b, t), 1e-3)}, max_drift={"law": jnp.ones(b)},
                  condition={"law": jnp.ones((b, t))}, final=None,
                  status=jnp.zeros(b, int), num_steps=jnp.ones(b, int))
    sharp = jnp.stack([jnp.linspace(-1.0, 3.0, t)] * b)[:, :, None] * jnp.asarray([[[1.0, 0.5]]])
    fig = results_figure([("flow", cn.Result(**common, observables={"sharpness": sharp})),
                          ("gd", cn.Result(**common))])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("sharpness") == 2 and len(fig.axes) == 6
    ax = fig.axes[2]
    assert ax.get_yscale() == "linear"  # λ₁ < 0 at the start must show
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.linspace(-1.0, 3.0, t))
    assert fig.axes[1].get_yscale() == "log"
