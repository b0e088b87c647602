"""find_generators: the Lie algebra of linear symmetries of a loss, found from sampled
gradients without templates, and its quadratic laws — checked against laws written out in
numpy from the known symmetries (rescale, balance, attention GL(k), normalisation), against
count_laws, along a flow, and on a tanh MLP that has none."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

KEY = jax.random.PRNGKey(0)


def _points(model, n, seed=0):
    """`n` random models of the same architecture (every leaf replaced by Gaussians)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    rng = np.random.default_rng(seed)
    return [eqx.combine(jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape)), params), static) for _ in range(n)]


def _rank(matrix):
    s = np.linalg.svd(np.asarray(matrix), compute_uv=False)
    return int(np.sum(s > 1e-9 * s[0]))


def _span_check(law, reference, model, expected, wrong=None):
    """The found law components and the numpy reference functions span the same space of
    functions (values at random θ), of dimension `expected`; a `wrong` candidate is not in
    it (the test can fail on a law too many as well as one too few)."""
    models = _points(model, 3 * expected + 6)
    found = np.stack([np.ravel(law(m)) for m in models])
    ref = np.stack([np.concatenate([np.ravel(r(m)) for r in reference]) for m in models])
    assert found.shape[1] == expected
    assert _rank(found) == _rank(ref) == _rank(np.concatenate([found, ref], 1)) == expected
    if wrong is not None:
        extra = np.stack([np.ravel(wrong(m)) for m in models])
        assert _rank(np.concatenate([found, extra], 1)) == expected + extra.shape[1]


def _sym_entries(m):
    """The independent entries (upper triangle) of a symmetric matrix, numpy."""
    m = np.asarray(m)
    return m[np.triu_indices(m.shape[0])]


def _evidence(found):
    # A clear null space: kept singular values at round-off, rejected ones far above, and
    # the kept generators hold on held-out (θ, data) pairs while the best rejected fails.
    for ns in (found.algebra, found.laws_space):
        if ns.dimension:
            assert ns.kept < 1e-12 and ns.gap > 1e8 and ns.residual < 1e-12
        assert ns.rejected > 1e-5 and ns.rejected_residual > 1e-4


@pytest.fixture(scope="module")
def relu():
    # Five hidden neurons: gl(5) on the bias needs ≥ 5 probe points to be seen as faithful.
    model = cn.MLP.random((2, 5, 1), key=KEY)
    return model, cn.find_generators(model, cn.MSE(), count=True)


def test_relu_mlp_gives_one_rescale_law_per_hidden_neuron(relu):
    model, found = relu
    assert (found.dimension, found.symmetric, found.antisymmetric) == (5, 5, 0)
    # Independent block coefficients, by hand: W0 (5×2) gl(5) + gl(2) less the identity they
    # share, b0 gl(5), W1 (1×5) gl(1) + gl(5) less one, b1 gl(1): 28 + 25 + 25 + 1.
    assert found.algebra.coordinates == 79
    _evidence(found)

    def rescale(m):  # |W0[j]|² + b0[j]² − |W1[:, j]|², in numpy
        w0, b0, w1 = (np.asarray(a) for a in (m.weights[0], m.biases[0], m.weights[1]))
        return np.sum(w0**2, 1) + b0**2 - np.sum(w1**2, 0)

    _span_check(found.laws[0], [rescale], model, 5,
                wrong=lambda m: np.sum(np.asarray(m.weights[1]) ** 2))
    assert set(found.supports) == {"weights[0] + weights[1] + biases[0]"}
    assert found.count.laws == found.independent == 5 and found.complete


@pytest.fixture(scope="module")
def linear():
    model = cn.DeepLinear.random((2, 3, 2, 2), key=KEY)
    return model, cn.find_generators(model, cn.MSE(), count=True)


def test_deep_linear_gives_the_full_gl_k_and_the_balance_matrices(linear):
    model, found = linear
    # gl(3) between layers 0/1 and gl(2) between layers 1/2: 9 + 4 generators, of which
    # the symmetric 6 + 3 give the entries of W_l W_lᵀ − W_{l+1}ᵀ W_{l+1}; 3 + 1 rotations.
    assert (found.dimension, found.symmetric, found.antisymmetric) == (13, 9, 4)
    _evidence(found)

    def balance(m, layer):
        a, b = np.asarray(m.weights[layer]), np.asarray(m.weights[layer + 1])
        return _sym_entries(a @ a.T - b.T @ b)

    _span_check(found.laws[0], [lambda m: balance(m, 0), lambda m: balance(m, 1)], model, 9,
                wrong=lambda m: np.sum(np.asarray(m.weights[0]) ** 2))
    assert found.count.laws == found.independent == 9 and found.complete


def test_found_laws_are_conserved_by_a_flow_and_a_near_miss_drifts(linear):
    model, found = linear
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    data = cn.Dataset(x, jax.random.normal(jax.random.PRNGKey(2), (16, 2)))
    objective = cn.make_objective(cn.MSE(), data, model)
    law = found.laws[0]
    # Near miss: the same Gram entries with the second layer's sign flipped.
    near = cn.FunctionLaw(lambda m: m.weights[0] @ m.weights[0].T
                          + m.weights[1].T @ m.weights[1], "near_miss",
                          lambda m: jnp.linalg.norm(m.weights[0] @ m.weights[0].T)
                          + jnp.linalg.norm(m.weights[1].T @ m.weights[1]))
    rtol = 1e-8
    result = cn.gradient_flow(objective, model, 2.0, rtol=rtol, laws=[law, near], n_save=3)
    assert result.status_names() == ["success"]
    assert float(result.loss[0, -1]) < 0.9 * float(result.loss[0, 0])
    assert float(result.max_drift[law.name][0]) <= 10 * rtol
    assert float(result.max_drift["near_miss"][0]) > 1e-3


def test_lightning_attention_gives_the_query_key_and_value_out_gl_laws():
    model = cn.LightningAttention.random(3, key=KEY, key_dim=2, value_dim=2, out_dim=2)
    found = cn.find_generators(model, cn.MSE(), count=False)
    # Per head: gl(2) on (Q, K), gl(2) on (V, W_O), and (K, V) ↦ (cK, V/c): 4 + 4 + 1,
    # symmetric 3 + 3 + 1 (the laws QᵀQ − KᵀK, VᵀV − W_O W_Oᵀ, |K|² − |V|²).
    assert (found.dimension, found.symmetric, found.antisymmetric) == (9, 7, 2)
    _evidence(found)

    def laws(m):
        q, k, v, o = (np.asarray(a[0]) for a in (m.query, m.key, m.value, m.out))
        return np.concatenate([_sym_entries(q.T @ q - k.T @ k),
                               _sym_entries(v.T @ v - o @ o.T), [np.sum(k**2) - np.sum(v**2)]])

    _span_check(found.laws[0], [laws], model, 7,
                wrong=lambda m: np.sum(np.asarray(m.query) ** 2))
    assert found.independent == 7


def _softmax_attention(p, x):
    """Two-head causal softmax attention with output projection: Σ_h A_h X V_h W_O^h."""
    n = x.shape[0]
    logits = jnp.einsum("td,hdr,her,se->hts", x, p["query"], p["key"], x)
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("hts,sd,hdv,hvm->tm", weights, x, p["value"], p["out"])


def test_softmax_attention_gives_per_head_gl_laws_and_no_key_value_law():
    if hasattr(cn, "SoftmaxAttention"):
        model = cn.SoftmaxAttention.random(3, key=KEY, key_dim=2, value_dim=2, heads=2,
                                           out_dim=2, causal=True)
    else:
        keys = jax.random.split(KEY, 4)
        shapes = {"query": (2, 3, 2), "key": (2, 3, 2), "value": (2, 3, 2), "out": (2, 2, 2)}
        model = cn.FunctionModel(_softmax_attention, {
            name: 0.7 * jax.random.normal(k, shape) for k, (name, shape)
            in zip(keys, shapes.items())})
    found = cn.find_generators(model, cn.MSE(), input_shape=(3, 3), count=False)
    # Per head h: gl(2) on (Q_h, K_h) and gl(2) on (V_h, W_O^h); no (K, V) scaling (the
    # softmax is not homogeneous) and no mixing of heads.
    assert (found.dimension, found.symmetric, found.antisymmetric) == (16, 12, 4)
    _evidence(found)

    def leaves(m):
        p = eqx.filter(m, eqx.is_inexact_array)
        get = (lambda n: getattr(p, n)) if hasattr(cn, "SoftmaxAttention") else \
            (lambda n: p.params[n])
        return [np.asarray(get(n)) for n in ("query", "key", "value", "out")]

    def laws(m):
        q, k, v, o = leaves(m)
        return np.concatenate([np.concatenate([_sym_entries(q[h].T @ q[h] - k[h].T @ k[h]),
                                               _sym_entries(v[h].T @ v[h] - o[h] @ o[h].T)])
                               for h in range(2)])

    _span_check(found.laws[0], [laws], model, 12,
                wrong=lambda m: np.sum(leaves(m)[1][0] ** 2) - np.sum(leaves(m)[2][0] ** 2))


@pytest.mark.skipif(not hasattr(cn, "SoftmaxAttention"), reason="no SoftmaxAttention yet")
def test_rotary_attention_keeps_only_the_generators_commuting_with_the_rotation():
    # RoPE rotates the (Q, K) coordinate pair by a token-dependent angle: of gl(2) only the
    # matrices commuting with rotations, a·I + b·J, stay symmetries (one scaling law
    # |Q|² − |K|², one rotation); gl(2) on (V, W_O) is untouched.
    model = cn.SoftmaxAttention.random(3, key=KEY, key_dim=2, value_dim=2, out_dim=2,
                                       causal=True, rotary=True)
    found = cn.find_generators(model, cn.MSE(), input_shape=(3, 3), count=False)
    assert (found.dimension, found.symmetric, found.antisymmetric) == (6, 4, 2)
    _evidence(found)


def test_normalised_layer_gives_its_scale_law():
    model = cn.MLP.random((2, 3, 1), key=KEY, normalize=True)
    found = cn.find_generators(model, cn.MSE(), count=True)
    assert (found.dimension, found.symmetric, found.antisymmetric) == (1, 1, 0)
    _evidence(found)
    _span_check(found.laws[0], [lambda m: np.sum(np.asarray(m.weights[0]) ** 2)
                                + np.sum(np.asarray(m.biases[0]) ** 2)], model, 1,
                wrong=lambda m: np.sum(np.asarray(m.weights[0][0]) ** 2))
    assert found.count.laws == found.independent == 1 and found.complete


def test_tanh_mlp_has_no_continuous_linear_symmetry():
    model = eqx.nn.MLP(2, 1, 3, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))
    found = cn.find_generators(model, cn.MSE(), input_shape=(2,), count=False)
    assert (found.dimension, found.symmetric, found.antisymmetric) == (0, 0, 0)
    assert found.laws == ()
    _evidence(found)
    assert "0 generators" in found.describe()


def test_find_symmetries_reports_the_generators_and_bad_arguments_are_named():
    model = cn.MLP.random((2, 3, 1), key=KEY)
    x = jax.random.normal(jax.random.PRNGKey(5), (32, 2))
    data = cn.Dataset(x, jax.random.normal(jax.random.PRNGKey(6), (32, 1)))
    search = cn.find_symmetries(model, cn.MSE(), data, count=False, generators=True)
    assert search.generators.symmetric == search.independent == 3
    assert "Generators (find_generators)" in search.describe()
    assert cn.find_symmetries(model, cn.MSE(), data, count=False).generators is None
    with pytest.raises(cn.ArgumentError, match="max_coefficients"):
        cn.find_generators(model, cn.MSE(), max_coefficients=10)
    with pytest.raises(cn.ArgumentError, match="`generators`"):
        cn.find_symmetries(model, cn.MSE(), data, generators="yes")
    with pytest.raises(cn.ArgumentError, match="`data`"):
        cn.find_generators(model, cn.MSE(), data=[1, 2])
    with pytest.raises(cn.ArgumentError, match="generator_laws"):
        cn.gradient_flow(cn.make_objective(cn.MSE(), data, model),
                         cn.MLP.random((2, 4, 1), key=KEY), 1.0,
                         laws=search.generators.laws)


def test_blocks_are_named_by_the_axis_they_act_on():
    """A matrix leaf has a row block (GL acting on its rows: 3² = 9 coefficients for the 3 × 4
    first layer) and a column block (4² = 16); the names say which, and the size error names
    the largest block."""
    model = cn.DeepLinear.random((4, 3, 2), key=jax.random.PRNGKey(0))
    found = cn.find_generators(model, cn.MSE(), count=False)
    assert found.blocks == ("weights[0]·rows", "weights[0]·cols", "weights[1]·rows",
                            "weights[1]·cols")
    with pytest.raises(cn.ArgumentError, match=r"38 coefficients \(largest block: "
                                                r"weights\[0\]·cols, 16\)"):
        cn.find_generators(model, cn.MSE(), max_coefficients=37)
