"""Two-sided checks of reported numbers against their definitions, recomputed in numpy.

A drift computed too small passes every upper bound (`drift <= 10 * rtol`); here each reported
number — loss, every law family's drift at the save times, `max_drift`, `t`, `num_steps` — is
recomputed independently and must agree within round-off, from above and from below.

- Deep linear: gradient descent is re-run in numpy (closed-form gradients of the MSE of a
  product of matrices), so the whole trajectory is independent of the library.
- Other families (rescale, scale, translation, attention Q/K, V/O, K/V): the parameters come
  from the library's run (`Result.final`, the initial ensemble), the laws' values and scales
  from numpy formulas written from the laws' definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

LR = 0.08  # large enough that the balance laws drift by ~1e-3: well above round-off


@pytest.fixture(scope="module")
def linear_problem():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    teacher = cn.DeepLinear.random([3, 4, 3, 2], key=k1)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k2, 16, (3,)))
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 4, 3, 2], key=k), k3, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    return objective, ensemble, np.asarray(data.x), np.asarray(data.y)


def numpy_gd(weights, x, y, lr, steps):
    """Every iterate of GD on mean_i ‖W3 W2 W1 x_i − y_i‖² (numpy, chain rule by hand)."""
    ws = [np.array(w) for w in weights]
    path = [[w.copy() for w in ws]]
    n = x.shape[0]
    for _ in range(steps):
        w1, w2, w3 = ws
        residual = x @ (w3 @ w2 @ w1).T - y  # (n, m)
        g = 2.0 / n * residual.T @ x  # dL/dP, P = W3 W2 W1
        grads = [(w3 @ w2).T @ g, w3.T @ g @ w1.T, g @ (w2 @ w1).T]
        ws = [w - lr * gw for w, gw in zip(ws, grads)]
        path.append([w.copy() for w in ws])
    return path


def numpy_loss(ws, x, y):
    w1, w2, w3 = ws
    return float(np.mean(np.sum((x @ (w3 @ w2 @ w1).T - y) ** 2, axis=1)))


def balance(ws, layer):
    a, b = ws[layer + 1], ws[layer]
    return a.T @ a - b @ b.T, np.linalg.norm(a.T @ a) + np.linalg.norm(b @ b.T)


@pytest.mark.parametrize("steps, saved", [(7, [0, 3, 6, 7]), (6, [0, 2, 4, 6])])
def test_gd_numbers_equal_a_numpy_rerun(linear_problem, steps, saved):
    """Steps that do and do not divide the save interval: exactly `steps` steps are taken, the
    save times are the steps listed, and loss, drift and max_drift equal numpy's."""
    objective, ensemble, x, y = linear_problem
    result = cn.train(objective, ensemble, cn.optimizer("gd", lr=LR), steps, n_save=4,
                      step_time=LR, progress=False)
    np.testing.assert_array_equal(np.asarray(result.num_steps), [steps, steps])
    np.testing.assert_allclose(np.asarray(result.t), LR * np.asarray(saved), rtol=1e-15)
    finals = []
    for member in range(2):
        weights = [np.asarray(w[member]) for w in ensemble.models.weights]
        path = numpy_gd(weights, x, y, LR, steps)
        for got, want in zip(result.final.models.weights, path[-1]):
            np.testing.assert_allclose(np.asarray(got[member]), want, rtol=1e-11, atol=1e-14)
        loss = [numpy_loss(path[k], x, y) for k in saved]
        finals.append(loss[-1])
        np.testing.assert_allclose(np.asarray(result.loss[member]), loss, rtol=1e-11)
        for layer in (0, 1):
            q0, scale = balance(path[0], layer)
            drift = [np.max(np.abs(balance(path[k], layer)[0] - q0)) / scale
                     for k in range(steps + 1)]
            name = f"balance[{layer}]"
            assert drift[-1] > 1e-4  # a real drift, resolved far above round-off
            np.testing.assert_allclose(np.asarray(result.drift[name][member]),
                                       [drift[k] for k in saved], rtol=1e-9)
            # max_drift is the worst over every step, not only the saved ones.
            np.testing.assert_allclose(float(result.max_drift[name][member]), max(drift),
                                       rtol=1e-9)
    summary = result.summary()
    assert summary["final_loss_median"] == pytest.approx(np.median(finals), rel=1e-11)
    assert summary["num_steps_max"] == steps
    assert summary["max_drift"]["balance[0]"] == pytest.approx(
        float(np.max(np.asarray(result.max_drift["balance[0]"]))), rel=1e-15)


def run_final(model_fn, laws, objective_fn, steps=5, lr=0.05, weight_decay=0.0):
    """GD on a 2-member ensemble; returns (initial ensemble, result)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    ensemble = cn.Ensemble.init(model_fn, k1, 2)
    objective = objective_fn(k2, ensemble)
    optim = cn.optimizer("gd", lr=lr, weight_decay=weight_decay)
    result = cn.train(objective, ensemble, optim, steps, n_save=2,
                      laws=laws, progress=False)
    return ensemble, result


def member(tree, i):
    return jax.tree.map(lambda a: np.asarray(a[i]), tree)


def check_family(ensemble, result, name, law_np):
    """result.drift[name] at the end and at t = 0 against numpy's definition, per member:
    max_c |Q_c(θ_T) − Q_c(θ_0)| / scale_c(θ_0)."""
    for i in range(2):
        q0, scale = law_np(member(ensemble.models, i))
        q1, _ = law_np(member(result.final.models, i))
        want = np.max(np.abs(q1 - q0) / scale)
        assert want > 1e-6
        np.testing.assert_allclose(float(result.drift[name][i, -1]), want, rtol=1e-8)
        assert float(result.drift[name][i, 0]) == 0.0


def data_for(shape_in, out, classes=False):
    def make(key, ensemble):
        kx, ky = jax.random.split(key)
        x = cn.gaussian_inputs(kx, 12, shape_in)
        if classes:
            y = jax.nn.one_hot(jax.random.randint(ky, (12,), 0, out), out)
            return cn.make_objective(cn.CrossEntropy(), cn.Dataset(x, y), ensemble)
        y = jax.random.normal(ky, (12, *shape_in[:-1], out))  # attention: a row per token
        return cn.make_objective(cn.MSE(), cn.Dataset(x, y), ensemble)
    return make


def test_rescale_drift_is_per_neuron():
    """Rescale law of a biased ReLU MLP: Q_i = ‖W1[i]‖² + b1[i]² − ‖W2[:, i]‖², normalised by
    each neuron's own scale (a common scale would understate the drift of small neurons)."""
    def law_np(p):
        w1, b1, w2 = p.weights[0], p.biases[0], p.weights[1]
        incoming = np.sum(w1**2, axis=1) + b1**2
        outgoing = np.sum(w2**2, axis=0)
        return incoming - outgoing, incoming + outgoing

    ensemble, result = run_final(lambda k: cn.MLP.random([3, 5, 2], key=k),
                                 (cn.RescaleLaw(0),), data_for((3,), 2))
    check_family(ensemble, result, "rescale[0]", law_np)


def test_scale_and_translation_drifts():
    """Scale law of a normalised first layer (Q = ‖W1‖² + ‖b1‖², relative to itself) and the
    translation law of cross-entropy (column sums of the last [W b], each relative to that
    column's norm). GD keeps the translation law exactly; weight decay breaks both."""
    def scale_np(p):
        q = np.sum(p.weights[0] ** 2) + np.sum(p.biases[0] ** 2)
        return np.array([q]), np.array([q])

    def translation_np(p):
        wb = np.concatenate([p.weights[-1], p.biases[-1][:, None]], axis=1)
        return wb.sum(axis=0), np.sqrt(np.sum(wb**2, axis=0))

    ensemble, result = run_final(
        lambda k: cn.MLP.random([3, 4, 3], key=k, normalize=True),
        (cn.ScaleLaw(0), cn.TranslationLaw()), data_for((3,), 3, classes=True), lr=0.5,
        weight_decay=0.2)
    check_family(ensemble, result, "scale[0]", scale_np)
    check_family(ensemble, result, "translation", translation_np)


def test_attention_drifts():
    """Per head: Q/K law QᵀQ − KᵀK and V/O law VᵀV − W_O W_Oᵀ (relative to the sum of the
    two Gram matrices' Frobenius norms), K/V law ‖K‖² − ‖V‖² (relative to ‖K‖² + ‖V‖²)."""
    def gram(a, b):
        return a.T @ a - b @ b.T, np.linalg.norm(a.T @ a) + np.linalg.norm(b @ b.T)

    def qk(p, h=1):
        return gram(p.query[h], p.key[h].T)

    def vo(p, h=1):
        return gram(p.value[h], p.out[h])

    def kv(p, h=1):
        k2, v2 = np.sum(p.key[h] ** 2), np.sum(p.value[h] ** 2)
        return np.array([k2 - v2]), np.array([k2 + v2])

    ensemble, result = run_final(
        lambda k: cn.LightningAttention.random(3, key=k, heads=2, key_dim=2, value_dim=2,
                                               out_dim=2),
        (cn.AttentionQKLaw(1), cn.AttentionVOLaw(1), cn.AttentionKVLaw(1)),
        data_for((4, 3), 2), lr=0.05)
    check_family(ensemble, result, "qk[1]", qk)
    check_family(ensemble, result, "vo[1]", vo)
    check_family(ensemble, result, "kv[1]", kv)


def test_flow_drift_is_measured_from_the_start():
    """A flow's reported final drift equals numpy's from its final parameters (modified flow
    at a large lr, so the balance law drifts far above the tolerance)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    teacher = cn.DeepLinear.random([3, 4, 3, 2], key=k1)
    data = cn.teacher_dataset(teacher, cn.gaussian_inputs(k2, 16, (3,)))
    ensemble = cn.Ensemble.init(lambda k: cn.DeepLinear.random([3, 4, 3, 2], key=k), k3, 2)
    objective = cn.make_objective(cn.MSE(), data, ensemble)
    result = cn.gradient_flow(objective, ensemble, 2.0, n_save=3, solver="tsit5",
                              rtol=jnp.asarray(1e-10),
                              field=cn.ModifiedGradientField(lr=0.1), progress=False)
    for i in range(2):
        w0 = [np.asarray(w[i]) for w in ensemble.models.weights]
        w1 = [np.asarray(w[i]) for w in result.final.models.weights]
        for layer in (0, 1):
            q0, scale = balance(w0, layer)
            want = np.max(np.abs(balance(w1, layer)[0] - q0)) / scale
            assert want > 1e-5
            np.testing.assert_allclose(float(result.drift[f"balance[{layer}]"][i, -1]), want,
                                       rtol=1e-7)


def test_below_accuracy_flag_at_its_threshold():
    """A final loss just under 1e-14 × the initial one is flagged, just over it is not, in the
    summary and in the CLI's table (a star and a note)."""
    from conservation._dynamics.monitor import below_accuracy
    from conservation._experiments.runner import format_summary

    loss = np.array([[2.0, 1.0, 0.99e-14 * 2.0], [2.0, 1.0, 1.01e-14 * 2.0],
                     [0.0, 0.0, 0.0], [np.nan, 1.0, 1e-40]])
    np.testing.assert_array_equal(below_accuracy(loss), [True, False, False, False])
    runs = [{"label": label, "status": {"success": 1}, "final_loss_median": value,
             "num_steps_max": 3, "max_drift": {}, "final_loss_below_accuracy": flagged}
            for label, value, flagged in (("noisy", 1e-31, 1), ("fine", 1e-3, 0))]
    table = format_summary({"runs": runs}).splitlines()
    assert "1.000e-31*" in table[1] and "*" not in table[2]
    assert "round-off noise" in table[-1]


def test_subspace_drift_is_absolute_and_flagged_so():
    """RowSpaceLaw of a deep linear net's first layer (rows: hidden neurons): the value is the
    projector Π = P(PᵀP)⁻¹Pᵀ onto the row space of W₁ (P = W₁ᵀ), the drift ‖Π(t) − Π(0)‖_F,
    not divided by any scale — and the law says so (`relative` False, "abs" in the tables),
    while the balance law's drift is relative."""
    def rowspace(p):
        w = np.asarray(p.weights[0]).T  # (d, hidden): hidden < d
        return w @ np.linalg.solve(w.T @ w, w.T), np.ones(())

    law = cn.RowSpaceLaw(None)
    ensemble, result = run_final(lambda k: cn.DeepLinear.random([4, 2, 1], key=k),
                                 (law, cn.BalanceLaw(0)), data_for((4,), 1), lr=0.1)
    for i in range(2):
        p0, p1 = rowspace(member(ensemble.models, i))[0], rowspace(member(result.final.models,
                                                                           i))[0]
        want = np.linalg.norm(p1 - p0)
        assert want > 1e-6
        np.testing.assert_allclose(float(result.drift[law.name][i, -1]), want, rtol=1e-8)
    assert law.relative is False and cn.BalanceLaw(0).relative is True
    assert {type(x).__name__: x.relative for x in (cn.FourierPhaseLaw(1), cn.CyclicRatioLaw())
            } == {"FourierPhaseLaw": False, "CyclicRatioLaw": False}


def test_mirror_and_lr_balance_drifts():
    """The laws of the mirror and per-layer-lr flows, broken by plain GD: the mirror balance
    Q_i = Σ_j W1[i, j] − Σ_k W2[k, i] relative to each unit's Σ|W1[i, :]| + Σ|W2[:, i]|, and the
    lr-weighted balance W2ᵀW2/η₂ − W1W1ᵀ/η₁ relative to ‖W2ᵀW2/η₂‖ + ‖W1W1ᵀ/η₁‖ (one
    component: the matrix, its scale the sum of the two norms)."""
    lrs = (1.0, 0.25)

    def mirror_np(p):
        w1, w2 = p.weights
        return (w1.sum(axis=1) - w2.sum(axis=0),
                np.abs(w1).sum(axis=1) + np.abs(w2).sum(axis=0))

    def lr_balance_np(p):
        w1, w2 = p.weights
        high, low = w2.T @ w2 / lrs[1], w1 @ w1.T / lrs[0]
        return high - low, np.linalg.norm(high) + np.linalg.norm(low)

    ensemble, result = run_final(lambda k: cn.DeepLinear.random([3, 4, 2], key=k),
                                 (cn.MirrorBalanceLaw(0), cn.LrBalanceLaw(0, lrs)),
                                 data_for((3,), 2), lr=0.1)
    check_family(ensemble, result, "mirror_balance[0]", mirror_np)
    check_family(ensemble, result, "lr_balance[0]", lr_balance_np)


def test_modified_flow_effective_start_against_its_formula():
    """Heavy ball's modified flow starts at θ̃₀ = θ₀ + ηβ/(1 − β)²·(∇L(θ₀) + λθ₀) (its slow
    manifold), written out in numpy with a hand-given gradient; without `effective_start` it
    starts at θ₀."""
    theta = jnp.asarray([0.4, -1.2, 2.0])
    g = np.array([1.0, 0.5, -3.0])

    def grad(z):
        return jnp.asarray(g) + 0.0 * z

    lr, beta, lam = 0.1, 0.6, 0.05
    field = cn.ModifiedGradientField(lr, beta, lam)
    want = np.asarray(theta) + lr * beta / (1 - beta) ** 2 * (g + lam * np.asarray(theta))
    np.testing.assert_allclose(field.start(grad, theta), want, rtol=1e-15)
    plain = cn.ModifiedGradientField(lr, beta, lam, effective_start=False)
    np.testing.assert_array_equal(plain.start(grad, theta), theta)
