"""Law counting (Lie-algebra rank) and the polynomial law finder, against known counts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._experiments.cli import main

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("widths", [(3, 2, 2), (2, 3, 2), (4, 1, 3)])
def test_two_layer_linear_has_r_r_plus_1_over_2_laws(widths):
    r = widths[1]
    count = cn.count_laws(cn.DeepLinear.random(widths, key=KEY), cn.MSE())
    assert count.laws == r * (r + 1) // 2
    assert count.gap > 1e6  # an unambiguous rank decision


def test_relu_attention_and_target_rank():
    relu = cn.count_laws(cn.MLP.random((3, 2, 2), key=KEY), cn.MSE())
    assert relu.laws == 2  # one per hidden neuron
    attention = cn.LightningAttention.random(4, key=KEY, causal=False)
    assert cn.count_laws(attention, cn.MSE()).laws == 2  # |Q|²−|K|², |K|²−|V|²
    proved = cn.count_laws(attention, cn.MSE(), target_rank=12 - 2)
    assert proved.proved and proved.laws == 2 and len(proved.rank_by_depth) <= 2


@pytest.mark.parametrize("loss, group, expected", [
    (cn.MSE(), cn.CyclicShift(3), 1), (cn.LogCosh(), cn.CyclicShift(3), 0),
    (cn.MSE(), None, 0)])
def test_seed_paper_fig2_counts(loss, group, expected):
    model = cn.DeepLinear.random((3, 1), key=KEY)
    assert cn.count_laws(model, loss, augment=group).laws == expected


@pytest.mark.parametrize("widths, group", [((3, 2, 2), None), ((3, 1), cn.CyclicShift(3))])
def test_a_class_of_one_data_set_has_d_minus_one_laws(widths, group):
    # Every drawn data set is the whole 32-sample Dataset reordered, so the fields differ only
    # by summation order: the Lie algebra is span{∇L} and a single flow has D − 1 local first
    # integrals. Their brackets vanish identically but evaluate to round-off (bit-exact zero
    # only by luck of the backend's summation order, as for [F, F] on CPU vs an H100); that
    # round-off must not pass for rank.
    model = cn.DeepLinear.random(widths, key=KEY)
    rng = np.random.default_rng(1)
    data = cn.Dataset(jnp.asarray(rng.standard_normal((32, widths[0]))),
                      jnp.asarray(rng.standard_normal((32, widths[-1]))))
    count = cn.count_laws(model, cn.MSE(), data=data, augment=group, known_laws=False)
    dim = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    assert count.laws == dim - 1 and count.verdict == "converged"
    assert count.cancelled > 0


def test_cancelled_brackets_are_weighted_by_their_ratio_over_the_round_off_threshold(
        monkeypatch):
    """The rank decision's input, recomputed in numpy from the fields the count evaluated
    (captured; their values are checked against exact brackets in
    `test_deep_brackets_match_exact_polynomial_brackets`): a row with cancellation ratio
    r = ‖A − B‖/(‖A‖ + ‖B‖) carries round-off up to 100·ε/r once normalised, so it is
    weighted by min(1, r/threshold), threshold = 10·100·ε/tol (that round-off then stays
    below tol/10), and a healthy row (r ≥ threshold) keeps weight 1. The reported singular
    values are those of the stacked weighted rows (σ₁ = 1). Two-sided: a weight too large
    (rows unweighted) adds rank, one too small (or a healthy row's weight ≠ 1) moves the
    small singular values, which are those of the weighted round-off."""
    import conservation._laws.counting as counting

    captured = []
    evaluate = counting._evaluate

    def recording(*args, **kwargs):
        rows, ratio = evaluate(*args, **kwargs)
        captured.append((np.array(rows), np.array(ratio)))
        return rows, ratio

    monkeypatch.setattr(counting, "_evaluate", recording)
    # The class of one data set (as above): depth-0 rows are one gradient up to summation
    # order (r = 1), every bracket vanishes identically and evaluates to round-off (r ~ ε).
    widths, tol = (3, 2, 2), 1e-9
    model = cn.DeepLinear.random(widths, key=KEY)
    rng = np.random.default_rng(1)
    data = cn.Dataset(jnp.asarray(rng.standard_normal((32, widths[0]))),
                      jnp.asarray(rng.standard_normal((32, widths[-1]))))
    count = cn.count_laws(model, cn.MSE(), data=data, known_laws=False, tol=tol)
    rows = np.concatenate([r for r, _ in captured])
    ratio = np.concatenate([q for _, q in captured])
    threshold = 10 * 100 * np.finfo(float).eps / tol
    assert np.all((ratio == 1.0) | (ratio < 1e-12)), ratio  # healthy or cancelled, nothing else
    assert count.cancelled == int(np.sum(ratio < threshold)) > 0
    weighted = np.linalg.svd(rows * np.minimum(1.0, ratio / threshold)[:, None],
                             compute_uv=False)
    weighted = weighted / weighted[0]
    assert int(np.sum(weighted > tol)) == count.rank == 1 and count.laws == 10 - 1
    # Measured agreement ~1e-5 (the count compresses its rows incrementally); a weight off by
    # 10 % moves the round-off singular values (~1e-13 here) by as much.
    np.testing.assert_allclose(count.singular_values, weighted, rtol=1e-3, atol=1e-17)
    # The negative control: the same rows unweighted (normalised round-off, unit vectors in
    # random directions) would have full rank, 0 laws, so the weighting decides the count.
    unweighted = np.linalg.svd(rows, compute_uv=False)
    assert np.sum(unweighted / unweighted[0] > tol) == 10


def test_equivariant_layer_has_n_squared_minus_4_laws():
    augmentation = cn.Augmentation(cn.Permutations(3), equivariant=True)
    model = cn.DeepLinear.random((3, 3), key=KEY)
    assert cn.count_laws(model, cn.MSE(), augment=augmentation).laws == 3 * 3 - 4


@pytest.mark.parametrize("order, expected", [(18, 1), (12, 0)])
def test_seed_paper_fig1_counts(order, expected):
    neuron = cn.Neuron.random(2, key=KEY, init_scale=2.0)
    assert cn.count_laws(neuron, cn.MSE(), augment=cn.PlanarRotations(order)).laws == expected


def test_polynomial_finder_returns_the_balance_laws():
    model = cn.DeepLinear.random((2, 2, 2), key=KEY)
    found = cn.find_polynomial_laws(model, cn.MSE(), degree=2)
    assert len(found) == 3  # entries of the symmetric 2×2 balance matrix
    # Every balance-matrix entry lies in the span of what was found, and vice versa.
    names = found.names
    index = {m: i for i, m in enumerate(found.monomials)}

    def coefficient_vector(terms):
        v = np.zeros(len(found.monomials))
        for sign, (a, b) in terms:
            e = [0] * len(names)
            e[a] += 1
            e[b] += 1
            v[index[tuple(e)]] += sign
        return v

    w0 = lambda i, j: names.index(f"weights[0][{i},{j}]")  # noqa: E731
    w1 = lambda i, j: names.index(f"weights[1][{i},{j}]")  # noqa: E731
    balance = [coefficient_vector([(+1, (w0(i, k), w0(j, k))) for k in range(2)]
                                  + [(-1, (w1(k, i), w1(k, j))) for k in range(2)])
               for i, j in ((0, 0), (0, 1), (1, 1))]
    stacked = np.concatenate([found.coefficients, np.array(balance)])
    assert np.linalg.matrix_rank(stacked, tol=1e-8) == 3
    assert "weights[0][0,0]^2 + weights[0][0,1]^2 - weights[1][0,0]^2 - weights[1][1,0]^2" \
        in found.describe()
    # Negative control: a deep linear net has no linear law (no coordinate or sum of
    # coordinates is conserved): none is found, and no zero row stands in for one.
    none = cn.find_polynomial_laws(model, cn.MSE(), degree=1)
    assert len(none) == 0 and none.coefficients.shape == (0, len(none.monomials)) == (0, 8)


def test_polynomial_finder_quadratic_neuron_and_monitor_plug_in(getkey):
    model = cn.PolynomialNet.random((2, 1, 1), key=KEY)
    found = cn.find_polynomial_laws(model, cn.MSE())  # the default degree, 2
    assert sorted({sum(m) for m in found.monomials}) == [1, 2]  # 3 + 6 monomials in θ ∈ R³
    assert len(found.monomials) == 9
    assert found.describe() == ["weights[0][0,0]^2 + weights[0][0,1]^2 - 2·weights[1][0,0]^2"]
    data = cn.Dataset(jax.random.normal(getkey(), (8, 2)), jax.random.normal(getkey(), (8, 1)))
    objective = cn.make_objective(cn.MSE(), data, model)
    result = cn.gradient_flow(objective, model, 2.0, solver="tsit5", rtol=1e-10, laws=found.laws)
    assert float(jnp.max(result.max_drift["polynomial[0]"])) <= 1e-9


def test_count_cli_prints_the_extra_law(capsys):
    import pathlib

    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "fig2_linear_c3.toml"
    assert main(["count", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:5] == ["all", "data", "mse", "3", "0"]
    assert out[2].split()[:6] == ["augmented", "by", "C3-shift", "mse", "3", "1"]


# --- sampling that the data cannot fool, verdicts, never-co-active weights (issue 11) ---

def _generic_relu(widths, key):
    """The counting benchmark's ReLU point: every hidden neuron active on 5–95% of
    Gaussian inputs (redrawn until so)."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(123), (4000, widths[0])))
    while True:
        key, sub = jax.random.split(key)
        model = cn.MLP.random(widths, key=sub)
        h, ok = x, True
        for w, b in zip(model.weights[:-1], model.biases[:-1]):
            z = h @ np.asarray(w).T + np.asarray(b)
            active = (z > 0).mean(axis=0)
            ok &= bool(np.all((active > 0.05) & (active < 0.95)))
            h = np.maximum(z, 0.0)
        if ok:
            return model


def _never_coactive_numpy(model, n=200_000, seed=7):
    """Independent reference: pairs (l, j, k) never co-active on fresh numpy inputs at
    scales 0.01…1000 (a different sample from the library's probe)."""
    rng = np.random.default_rng(seed)
    d = model.weights[0].shape[1]
    scales = np.repeat(10.0 ** np.arange(-2, 4), n // 6)[:, None]
    h = scales * rng.standard_normal((scales.shape[0], d))
    acts = []
    for layer, w in enumerate(model.weights[:-1]):
        z = h @ np.asarray(w).T
        if model.biases is not None:
            z = z + np.asarray(model.biases[layer])
        acts.append(z > 0)
        h = np.maximum(z, 0.0)
    return {(l, j, k) for l in range(len(acts) - 1)
            for j in range(acts[l].shape[1]) for k in range(acts[l + 1].shape[1])
            if not np.any(acts[l][:, j] & acts[l + 1][:, k])}


@pytest.mark.slow
@pytest.mark.parametrize("widths, index", [((2, 2, 2, 3, 2), 9), ((5, 2, 3, 5, 3), 15)])
def test_relu_counts_do_not_depend_on_the_sample(widths, index):
    # Benchmark architectures whose old counts (9 and 17) were sampling artifacts.
    model = _generic_relu(widths, jax.random.PRNGKey(index))
    pairs = _never_coactive_numpy(model)
    expected = sum(widths[1:-1]) + len(pairs)  # rescale laws + conserved weights
    for seed in range(5):
        count = cn.count_laws(model, cn.MSE(), key=jax.random.PRNGKey(100 + seed))
        assert count.laws == expected
        assert set(count.never_coactive) == pairs
        assert count.verdict == "proved"


def test_never_coactive_weight_is_a_named_law():
    # Hidden neurons u⁺ = relu(u), u⁻ = relu(−2u); neuron k = relu(u⁻ − u⁺) of the next
    # layer is active iff u < 0, so never together with u⁺: weights[1][0,0] gets no gradient.
    key = jax.random.split(KEY, 3)
    a = jnp.array([0.7, -0.4])
    w0 = jnp.stack([a, -2.0 * a])
    w1 = jnp.array([[-1.0, 1.0], [0.8, 0.5]])
    w2 = jax.random.normal(key[1], (1, 2))
    model = cn.MLP((w0, w1, w2), None)
    assert _never_coactive_numpy(model) == {(0, 0, 0)}
    count = cn.count_laws(model, cn.MSE())
    assert count.laws == 2 + 2 + 1  # one rescale law per hidden neuron, plus the weight
    assert count.never_coactive == ((0, 0, 0),)
    assert count.weight_names() == ("weights[1][0,0]",)
    assert "weights[1][0,0] is conserved" in count.describe()


def test_depth_budget_verdicts_and_bad_depth():
    model = cn.DeepLinear.random((2, 2, 5), key=KEY)  # needs one bracket depth
    short = cn.count_laws(model, cn.MSE(), max_depth=0)
    assert short.verdict == "not converged" and not short.converged
    assert short.laws > 3 and "NOT CONVERGED" in short.describe()
    full = cn.count_laws(model, cn.MSE(), max_depth=2)
    assert full.laws == 3 and full.verdict == "proved"  # r(r+1)/2, r = 2
    unknown = cn.count_laws(model, cn.MSE(), known_laws=False, early_stop=False, max_depth=2,
                            max_rounds=2)
    assert unknown.laws == 3 and unknown.verdict == "converged"
    assert len(unknown.rank_by_depth) == 3 and len(unknown.rank_by_round) == 2
    with pytest.raises(ValueError, match="`max_depth`"):
        cn.count_laws(model, cn.MSE(), max_depth=-3)


@pytest.mark.parametrize("widths", [(3, 3, 2), (2, 4, 1)])
def test_bias_free_two_layer_relu_has_r_laws(widths):
    model = cn.MLP.random(widths, key=KEY, bias=False)
    assert model.biases is None
    count = cn.count_laws(model, cn.MSE())
    assert count.laws == widths[1]  # Marcotte et al.: one law per hidden neuron


def test_bias_free_mechanics_masks_match_numpy():
    model = cn.MLP.random((3, 4, 2), key=KEY, bias=False)
    w0, w1 = (np.asarray(w) for w in model.weights)
    rescale = np.asarray(cn.RescaleLaw(0)(model))
    assert np.allclose(rescale, (w0**2).sum(1) - (w1**2).sum(0), rtol=1e-13)
    translation = np.asarray(cn.TranslationLaw()(model))
    assert np.allclose(translation, w1.sum(0), rtol=1e-13)
    scale = np.asarray(cn.ScaleLaw(1)(model))
    assert np.allclose(scale, (w1**2).sum(), rtol=1e-13)


def test_padded_linear_count_matches_unpadded():
    model = cn.DeepLinear.random((2, 3, 2), key=KEY)
    padded = cn.count_laws(model, cn.MSE(), pad_to=(3, 4))
    assert padded.laws == 6 and padded.verdict == "proved"  # r(r+1)/2, r = 3


def test_count_cli_refuses_negative_depth(capsys):
    assert main(["count", "--depth", "-3"]) == 2
    assert "`--depth`" in capsys.readouterr().err


# Exact integer polynomials in the parameters, {exponents: coefficient}: an independent
# reference for the nested brackets (symbolic derivatives, no autodiff, no rounding).
def _poly_mul(p, q):
    out = {}
    for ep, cp in p.items():
        for eq, cq in q.items():
            e = tuple(a + b for a, b in zip(ep, eq))
            out[e] = out.get(e, 0) + cp * cq
    return out


def _poly_add(p, q, sign=1):
    out = dict(p)
    for e, c in q.items():
        out[e] = out.get(e, 0) + sign * c
    return out


def _poly_diff(p, i):
    out = {}
    for e, c in p.items():
        if e[i]:
            d = list(e)
            d[i] -= 1
            out[tuple(d)] = out.get(tuple(d), 0) + c * e[i]
    return out


def _poly_bracket(f, g):
    """[F, G] = DG·F − DF·G, componentwise."""
    out = []
    for i in range(len(f)):
        term = {}
        for j in range(len(f)):
            term = _poly_add(term, _poly_mul(f[j], _poly_diff(g[i], j)))
            term = _poly_add(term, _poly_mul(g[j], _poly_diff(f[i], j)), sign=-1)
        out.append(term)
    return out


def test_deep_brackets_match_exact_polynomial_brackets():
    # f(x) = b (a·x), θ = (a₀, a₁, b₀, b₁): L_Z is a degree-4 polynomial, its depth-3
    # brackets degree 9, so every order of derivative the nested jvps take is exercised.
    from conservation._laws.counting import _bracket_fields, _build_objectives

    theta = np.array([1, 2, -1, 3])
    model = cn.DeepLinear([jnp.asarray(theta[:2][None, :], float),
                           jnp.asarray(theta[2:][:, None], float)])
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(4, 3, 2))
    y = rng.integers(-3, 4, size=(4, 3, 2))
    variables = [{tuple(int(i == j) for j in range(4)): 1} for i in range(4)]
    fields = []
    for xs, ys in zip(x, y):
        loss = {}
        for xn, yn in zip(xs, ys):
            s = _poly_add(_poly_mul({(0,) * 4: int(xn[0])}, variables[0]),
                          _poly_mul({(0,) * 4: int(xn[1])}, variables[1]))
            for k in range(2):
                r = _poly_add(_poly_mul(variables[2 + k], s), {(0,) * 4: int(yn[k])}, sign=-1)
                loss = _poly_add(loss, _poly_mul(r, r))
        fields.append([_poly_diff(loss, i) for i in range(4)])  # ∇L_Z (a positive
        # multiple of the library's mean loss gradient: normalised rows do not see it)
    objectives = _build_objectives(cn.MSE(), model, None, jnp.asarray(x, float),
                                   jnp.asarray(y, float))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    brackets = [fields[3]]
    for i in (2, 1, 0):
        brackets.append(_poly_bracket(fields[i], brackets[-1]))
    for depth in (1, 3):  # depth 3 nests every lower depth (each compile costs ~1 s)
        bracket = brackets[depth]
        value = np.array([float(sum(c * int(np.prod(theta ** np.array(e)))
                                    for e, c in component.items()))
                          for component in bracket])
        picked = jax.tree_util.tree_map(lambda a: a[None, 3 - depth:], objectives)
        rows = np.asarray(_bracket_fields(params, static, picked, depth)[0])
        np.testing.assert_allclose(rows[0], value / np.linalg.norm(value), rtol=0, atol=1e-12)


def test_a_dead_neuron_conserves_its_weights_and_only_its_own():
    """Hidden neuron 2 of layer 0 has zero incoming weights and a negative bias: it is never
    active, so its incoming row (2), bias (1) and outgoing column of the next weight (2) get
    no gradient: 5 conserved coordinates, beside the live net's rescale laws (2 + 2 hidden
    neurons) = 9 laws over 20 parameters. The probe must name the dead neuron and mark its
    coordinates in the right weight leaves (three layers: the next layer's matrix is not the
    last one), so that every counted law is explained (`proved`)."""
    k = jax.random.split(jax.random.PRNGKey(11), 3)
    w0 = jax.random.normal(k[0], (3, 2)).at[2].set(0.0)
    model = cn.MLP((w0, jax.random.normal(k[1], (2, 3)), jax.random.normal(k[2], (1, 2))),
                   (jnp.array([0.3, -0.2, -1.0]), jnp.array([0.1, 0.2]), jnp.array([0.0])))
    count = cn.count_laws(model, cn.MSE())
    assert count.dead == ((0, 2),)
    assert count.laws == (2 + 2) + (2 + 1 + 2)
    assert count.verdict == "proved"
    assert "known laws: 9" in count.describe() and "unexplained: 0" in count.describe()



def test_a_dead_neuron_under_momentum_keeps_two_laws_per_frozen_weight():
    """Heavy-ball momentum without friction (τ = 0): a weight that never gets a gradient keeps
    v_w and θ_w − t·v_w, two laws per frozen coordinate. Hidden neuron 2 has zero incoming
    weights and a negative bias, so its row (2), bias (1) and outgoing weight (1) are frozen:
    8 laws, all explained (`proved`); the live 2-2-1 ReLU net keeps none under momentum."""
    k = jax.random.split(jax.random.PRNGKey(11), 2)
    w0 = jax.random.normal(k[0], (3, 2)).at[2].set(0.0)
    model = cn.MLP((w0, jax.random.normal(k[1], (1, 3))),
                   (jnp.array([0.3, -0.2, -1.0]), jnp.array([0.0])))
    count = cn.count_laws(model, cn.MSE(), flow=cn.MomentumFlow())
    assert count.dead == ((0, 2),)
    assert count.laws == 2 * (2 + 1 + 1)
    assert count.verdict == "proved"
    assert "known laws: 8" in count.describe() and "unexplained: 0" in count.describe()

def test_the_probe_draws_gaussian_inputs_at_the_stated_scales():
    """What `describe` reports ("Gaussian inputs at scales 0.01, …, 1000") is what the probe
    draws: per scale s, inputs of mean 0 and standard deviation s, with Gaussian tails (a
    kurtosis of 3; a ratio such as s / N(0, 1) would be heavy-tailed)."""
    from conservation._laws.counting import _Sampler

    model = cn.MLP.random((3, 4, 2), key=KEY)
    scales = (0.01, 1.0, 1000.0)
    sampler = _Sampler(model, cn.MSE(), None, scales, (3,), 8, np.random.default_rng(0))
    x, groups, text = sampler.probe(4000, KEY)
    assert text == "12000 Gaussian inputs at scales 0.01, 1, 1000"
    for g, s in enumerate(scales):
        z = x[groups == g].ravel() / s
        assert z.size == 12000
        assert abs(np.mean(z)) < 0.05 and abs(np.std(z) - 1.0) < 0.03
        assert abs(np.mean(z**4) / np.mean(z**2) ** 2 - 3.0) < 0.3


@pytest.mark.parametrize("widths", [(1, 2, 2), (2, 2, 1)])
def test_polynomial_laws_of_a_net_with_a_width_one_end_are_conserved(widths):
    """With a scalar input or output, the fields of all data sets at one point span only a
    few directions, so a fixed number of sample points left spurious solutions (13 "laws"
    of degree ≤ 2, none conserved). Expected: the 3 entries of the balance matrix
    W1ᵀW1 − W0W0ᵀ (2×2, symmetric), and each found law conserved: its gradient orthogonal to
    the loss gradient at random points and data (autodiff of the polynomial itself)."""
    import equinox as eqx
    import jax.flatten_util as jfu

    model = cn.DeepLinear.random(widths, key=KEY)
    found = cn.find_polynomial_laws(model, cn.MSE(), degree=2)
    assert len(found) == 3
    flat, unravel = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    powers, coefficients = np.array(found.monomials), np.asarray(found.coefficients)

    def laws(theta):
        return jnp.asarray(coefficients) @ jnp.prod(theta[None, :] ** powers, axis=1)

    rng = np.random.default_rng(0)
    for _ in range(4):
        theta = jnp.asarray(rng.standard_normal(flat.shape))
        x = jnp.asarray(rng.standard_normal((8, widths[0])))
        y = jnp.asarray(rng.standard_normal((8, widths[-1])))

        def loss(t):
            return jnp.mean(jnp.sum((jax.vmap(eqx.combine(unravel(t), static))(x) - y) ** 2, -1))

        g, jac = jax.grad(loss)(theta), jax.jacobian(laws)(theta)
        cosine = jac @ g / (np.linalg.norm(jac, axis=1) * np.linalg.norm(g))
        assert np.max(np.abs(cosine)) < 1e-10


def test_a_count_stops_at_the_round_that_reaches_its_target():
    """DeepLinear 2-2-1 (6 parameters, the 3 balance entries known): the first round's
    brackets reach rank 6 − 3 = 3, the most any data can give, so no further round of data
    sets is drawn (one entry in `rank_by_round`), and no deeper bracket is taken once the
    depth-1 brackets reach it (`rank_by_depth` ends there: the fields, rank 2, then 3)."""
    count = cn.count_laws(cn.DeepLinear.random((2, 2, 1), key=KEY), cn.MSE())
    assert (count.laws, count.verdict, count.known) == (3, "proved", 3)
    assert count.rank_by_round == (3,)
    assert count.rank_by_depth == (2, 3)
