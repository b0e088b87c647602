"""Law counts beyond Euclidean gradient flow (`count_laws(..., flow=...)`): momentum and
Nesterov in phase space (s, θ, v), mirror (entropy: NMF, input-convex nets), preconditioned and
sign flows, against "Keep the momentum" (Marcotte, Gribonval & Peyré, ICML 2024; the
configurations of its notebooks `sibyllema/Conservation_laws_ICML`), "Transformative or
conservative?" (arXiv 2506.06194: sign-GD keeps no law except n = m = r = 1) and an independent
sympy implementation of the paper's algorithm (fields drift + (0, 0, M∇φ_i), brackets symbolic,
exact rank over the rationals)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

import conservation as cn

KEY = jax.random.PRNGKey(0)


# ---------------------------------------------------------------- the independent reference
def _product_entries(dims, xs):
    """Entries of U_1 ⋯ U_q with U_i ∈ R^{dims[i] × dims[i+1]} (the notebooks' `list_dim`)."""
    mats, k = [], 0
    for a, b in zip(dims[:-1], dims[1:]):
        mats.append(sp.Matrix(a, b, xs[k:k + a * b]))
        k += a * b
    prod = mats[0]
    for m in mats[1:]:
        prod = prod * m
    return list(prod)


def reference_laws(dims, order, friction=0, mirror=False, seed=0):
    """State dimension − dim Lie(fields)(point) for φ = entries of the product: order 1 fields
    M∇φ_i (M = diag(θ) for the entropy mirror, else 1); order 2 the drift (ṡ, v, −τv) and
    (0, 0, M∇φ_i) with the notebooks' mirror momentum factor M = diag(τθ + v)."""
    dim = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    th = sp.symbols(f"t0:{dim}")
    grads = [[sp.diff(phi, x) for x in th] for phi in _product_entries(dims, th)]
    rng = np.random.default_rng(seed)
    if order == 1:
        state = list(th)
        fields = [[(th[i] if mirror else 1) * g[i] for i in range(dim)] for g in grads]
    else:
        s, v = sp.Symbol("s"), sp.symbols(f"v0:{dim}")
        state = [s, *th, *v]
        fields = [[friction * s if friction else sp.Integer(1), *v, *[-friction * x for x in v]]]
        fields += [[0] * (dim + 1) + [((friction * th[i] + v[i]) if mirror else 1) * g[i]
                                      for i in range(dim)] for g in grads]
    point = {x: sp.Integer(int(rng.integers(1, 9)) * (1 if mirror else int(rng.choice([-1, 1]))))
             for x in state}
    fields = [sp.Matrix(f) for f in fields]
    at = lambda f: [sp.sympify(e).subs(point) for e in f]  # noqa: E731
    rows = [at(f) for f in fields]
    rank = sp.Matrix(rows).rank()
    base = new = fields
    while rank < len(state) and new:
        added = []
        for a, b in itertools.product(base, new):
            bracket = b.jacobian(state) * a - a.jacobian(state) * b
            if sp.Matrix(rows + [at(bracket)]).rank() > rank:
                rows.append(at(bracket))
                rank += 1
                added.append(bracket)
        new = added
    return len(state) - rank


def linear(dims, positive=False):
    """The notebooks' `list_dim` as a DeepLinear (U_1 ⋯ U_q x: widths reversed)."""
    model = cn.DeepLinear.random(tuple(reversed(dims)), key=KEY)
    return jax.tree.map(jnp.abs, model) if positive else model


# ---------------------------------------------------------------- fast checks
@pytest.mark.parametrize("dims, momentum, gradient", [
    ([2, 1, 2], 0, 1),  # notebook linear-momentum config 1 (and 16): momentum loses the law
    pytest.param([1, 2, 1], 2, 3, marks=pytest.mark.slow),  # scalar map: one law unexplained
])
def test_linear_momentum_counts_equal_the_sympy_reference(dims, momentum, gradient):
    assert reference_laws(dims, 2) == momentum and reference_laws(dims, 1) == gradient
    model = linear(dims)
    count = cn.count_laws(model, cn.MSE(), flow="momentum")
    assert count.laws == momentum and count.dimension == 2 * count.parameters + 1
    assert count.gap > 1e6
    # The angular momenta are the known laws: [1, 2, 1]'s extra law is reported unexplained.
    assert count.known == 1 - (dims == [2, 1, 2]) and count.unexplained == momentum - count.known
    # Negative control: the gradient-flow count differs.
    assert cn.count_laws(model, cn.MSE()).laws == gradient != momentum


def test_relu_momentum_keeps_no_law():
    model = cn.MLP.random((2, 2, 1), key=KEY, bias=False)
    count = cn.count_laws(model, cn.MSE(), flow="momentum")
    # Under gradient flow it has 2 (tests/test_counting.py::test_bias_free_two_layer_relu...).
    assert count.laws == 0 and count.rank == 2 * 6 + 1 and count.verdict == "proved"


@pytest.mark.slow
def test_nmf_mirror_counts_r_laws_and_mirror_momentum_none():
    dims = [2, 2, 1]  # U ∈ R^{2×2}, V ∈ R^{2×1}: the NMF of a 2×1 matrix, r = 2
    assert reference_laws(dims, 1, mirror=True) == 2
    model = linear(dims, positive=True)
    count = cn.count_laws(model, cn.MSE(), flow="mirror")
    # r laws Σ_i U_ik − Σ_j V_kj, declared: the count is proved.
    assert count.laws == 2 and count.known == 2 and count.verdict == "proved"
    momentum = cn.count_laws(model, cn.MSE(), flow=cn.MomentumFlow(potential="entropy"))
    assert momentum.laws == 0 and momentum.verdict == "proved"


@pytest.mark.parametrize("dims, expected", [([1, 1, 1], 1), ([2, 1, 2], 0)])
def test_sign_flow_keeps_a_law_only_for_n_m_r_1(dims, expected):
    count = cn.count_laws(linear(dims), cn.MSE(), flow="sign")
    # The span of sign(∇L_Z) over data sets; n = m = r = 1 keeps |u| − |v|.
    # Locally constant fields: brackets add no rank, only more data sets do.
    assert count.laws == expected and count.rank_by_depth[-1] == count.rank_by_depth[0]


def test_preconditioned_flow_counts_like_gradient_flow_with_lr_weighted_laws():
    model = cn.DeepLinear.random((2, 1, 2), key=KEY)
    rates = (1.0, 0.25)
    lr = cn.DeepLinear([jnp.full_like(w, r) for w, r in zip(model.weights, rates)])
    count = cn.count_laws(model, cn.MSE(), flow=cn.PreconditionedFlow(lr))
    assert count.laws == 1 == cn.count_laws(model, cn.MSE()).laws
    # The laws differ: η₁⁻¹W₁W₁ᵀ − η₂⁻¹W₂ᵀW₂ is conserved by −P∇L, the plain balance is not
    # (numpy: the time derivative ⟨∇h, −P g⟩ for g = ∇L of a random MSE data set).
    rng = np.random.default_rng(0)
    w1, w2 = (np.asarray(w) for w in model.weights)
    x, y = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    r = (x @ w1.T @ w2.T - y) / 5  # dL/d(output) for L = Σ|W₂W₁x − y|²/(2·5)
    g1, g2 = w2.T @ r.T @ x, r.T @ x @ w1.T
    d1, d2 = -rates[0] * g1, -rates[1] * g2

    def derivative(a, b):  # d/dt of a⁻¹W₁W₁ᵀ − b⁻¹W₂ᵀW₂ along (Ẇ₁, Ẇ₂) = (d1, d2)
        return (d1 @ w1.T + w1 @ d1.T) / a - (d2.T @ w2 + w2.T @ d2) / b

    assert np.abs(derivative(*rates)).max() < 1e-12
    assert np.abs(derivative(1.0, 1.0)).max() > 1e-3


def test_bad_flows_are_named_errors():
    model = cn.DeepLinear.random((2, 1, 2), key=KEY)
    with pytest.raises(cn.ArgumentError, match="`flow`"):
        cn.count_laws(model, cn.MSE(), flow="adam")
    with pytest.raises(cn.ArgumentError, match="friction"):
        cn.MomentumFlow(friction=-1.0)
    with pytest.raises(cn.ArgumentError, match="positive parameters"):
        cn.count_laws(model, cn.MSE(), flow="mirror")  # a Gaussian θ has negative entries
    with pytest.raises(cn.ArgumentError, match="learning rates"):
        cn.count_laws(model, cn.MSE(), flow="preconditioned")
    with pytest.raises(cn.ArgumentError, match="pad_to"):
        cn.count_laws(jax.tree.map(jnp.abs, model), cn.MSE(), flow="mirror", pad_to=(2, 2))


# ---------------------------------------------------------------- the notebooks' sets (slow)
def _notebook_linear_momentum():
    """main_ICML.ipynb Part A: np.random.seed(0); depth ∈ {2, 3}, widths in 1..3, τ = 0."""
    np.random.seed(0)
    out = []
    for _ in range(20):
        depth = np.random.randint(2, 4)
        out.append([int(np.random.randint(1, 4)) for _ in range(depth + 1)])
        np.random.randint(0, 1)  # tau_value: always 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("index", [1, 2, 5, 10])
def test_notebook_linear_momentum_configurations(index):
    dims = _notebook_linear_momentum()[index]
    count = cn.count_laws(linear(dims), cn.MSE(), flow="momentum", pad_to=(3, 3))
    assert count.laws == reference_laws(dims, 2)


@pytest.mark.slow
def test_momentum_count_with_padding_equals_unpadded_and_friction_does_not_change_it():
    model = linear([2, 2, 1])
    plain = cn.count_laws(model, cn.MSE(), flow="momentum")
    assert plain.laws == reference_laws([2, 2, 1], 2, friction=1)
    assert cn.count_laws(model, cn.MSE(), flow="momentum", pad_to=(3, 3)).laws == plain.laws
    assert cn.count_laws(model, cn.MSE(), flow=cn.MomentumFlow(friction=1.0)).laws == plain.laws
    assert cn.count_laws(model, cn.MSE(), flow="nesterov").laws == plain.laws


def _icnn(params, x):
    return params["U"] @ jax.nn.relu(params["V"] @ x + params["b"])


@pytest.mark.slow
def test_icnn_mirror_counts_one_law_per_neuron_and_mirror_momentum_none():
    # main_ICML.ipynb Part C: U σ(Vx + b), entropy on U, Euclidean on V and b; n2 = 2.
    k1, k2, k3 = jax.random.split(KEY, 3)
    model = cn.FunctionModel(_icnn, {"U": jnp.abs(jax.random.normal(k1, (2, 2))),
                                     "V": jax.random.normal(k2, (2, 3)),
                                     "b": 0.1 * jax.random.normal(k3, (2,))})
    where = lambda m: m.params["U"]  # noqa: E731
    first = cn.count_laws(model, cn.MSE(), flow=cn.MirrorFlow(where=where), input_shape=(3,))
    assert first.laws == 2  # Σ_i U_ik − (|V_k|² + b_k²)/2 per hidden neuron k
    second = cn.count_laws(model, cn.MSE(), input_shape=(3,),
                           flow=cn.MomentumFlow(potential="entropy", where=where))
    assert second.laws == 0
