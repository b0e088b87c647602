"""Paths of the symmetry code that no other default test executes, each checked against an
independent reference so that a planted bug on the line fails here:

- `FourierPhaseLaw`: value, condition and its mod-π drift against `numpy.fft` and a
  distance to the nearest multiple of π written out here; the frequency bound, both sides.
- `isotypic_components` of O(d) and of the trivial group (representation theory by hand).
- `augmentation_laws` past the exact-projection memory limit (a degree-7 neuron on R²: C_N
  reproduces the O(2) average of its degree-14 moments iff N > 14) and its `()` branches at
  their thresholds (S₂ has n² − 4 = 0 equivariant laws; range[QKV] needs k < d).
- `find_generators` on a model with a scalar leaf, data given as an (x, y) pair, the number
  of (θ, data) pairs, the `count_laws` verdict of `describe`, and its argument errors —
  against the generator algebra derived by hand.
- the groups: the (Z₂)^d size limit, O(d)'s name, when exact O(d) averaging is within the
  memory limit (closed forms), and the eigenvalue-gap guard of the Brauer basis.
- the blocks laws: `GateRescaleLaw`, `MeanReadLaw` and `SubmodelLaw` values, scales, drifts
  and conditions against numpy, and every mismatch error naming `laws`.
"""

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._data import groups as groups_module
from conservation._laws.blocks import GateRescaleLaw, MeanReadLaw, RotaryQKLaw, SubmodelLaw

KEY = jax.random.PRNGKey(30)


def _mod_pi_distance(delta):
    """Distance from `delta` to the nearest multiple of π (a line's angle has no sign),
    by brute force over the multiples — not the library's `mod` formula."""
    return min(abs(delta - k * math.pi) for k in range(-6, 7))


# --- symmetry.py: FourierPhaseLaw -----------------------------------------------------------


def test_fourier_phase_value_condition_and_mod_pi_drift_match_numpy():
    """arg Ŵ_j and |Ŵ_j|/‖w‖ against numpy's FFT (same sign convention e^{−2πijk/n}); the
    drift is the distance of the angle change to the nearest multiple of π, in every regime
    of the mod (small, just under π, negative, past π and 2π)."""
    w = np.array([0.7, -1.3, 0.4, 2.1, -0.5])
    model = cn.DeepLinear([jnp.asarray(w[None])])
    fft = np.fft.fft(w)
    for j in (1, 2):
        law = cn.FourierPhaseLaw(j)
        np.testing.assert_allclose(float(law(model)), np.angle(fft[j]), rtol=0, atol=1e-13)
        np.testing.assert_allclose(float(law.condition(model)),
                                   abs(fft[j]) / np.linalg.norm(w), rtol=1e-13)
        assert law.relative is False  # an absolute drift (angles are not rescaled)
    law = cn.FourierPhaseLaw(1)
    reference = 0.4
    for delta in (0.3, math.pi - 0.1, -0.2, 1.5 * math.pi, 2 * math.pi + 0.05, 1.2, -2.0):
        got = float(law.drift(jnp.asarray(reference + delta), jnp.asarray(reference),
                              jnp.asarray(7.0)))  # the scale is ignored: absolute drift
        np.testing.assert_allclose(got, _mod_pi_distance(delta), rtol=0, atol=1e-13)


def test_fourier_phase_frequency_bound_and_first_layer_errors():
    """1 ≤ j < n: j = n − 1 is evaluated, j = n is refused naming `laws` and the frequency;
    a model without a first layer, or with a non-matrix one, is refused by every first-layer
    law; the law arguments themselves are checked by name."""
    model = cn.DeepLinear([jnp.array([[0.7, -1.3, 0.4, 2.1, -0.5]])])
    assert np.isfinite(float(cn.FourierPhaseLaw(4)(model)))
    with pytest.raises(cn.ArgumentError, match=r"`laws`.*frequency 5 needs 1 ≤ j < n.* n = 5"):
        cn.FourierPhaseLaw(5)(model)
    attention = cn.SoftmaxAttention.random(3, key=KEY)
    with pytest.raises(cn.ArgumentError, match="`laws`.*no first weight layer"):
        cn.FourierPhaseLaw(1)(attention)

    class Cube(eqx.Module):
        weights: tuple

    with pytest.raises(cn.ArgumentError, match=r"`laws`.*shape \(2, 2, 2\), not a matrix"):
        cn.RowSpaceLaw(None).check(Cube((jnp.ones((2, 2, 2)),)))
    # `source_norm` reads the first layer without the check: its own error names `model`.
    with pytest.raises(cn.ArgumentError, match="`model` \\(SoftmaxAttention\\) has no first"):
        cn.RowSpaceLaw(None).source_norm(attention)
    with pytest.raises(cn.ArgumentError, match="`basis`"):
        cn.RowSpaceLaw(jnp.ones(3))
    with pytest.raises(cn.ArgumentError, match="`label`"):
        cn.RowSpaceLaw(None, label=3)


# --- symmetry.py: isotypic components and augmentation_laws ---------------------------------


def test_isotypic_components_of_orthogonal_and_trivial_groups():
    """O(d) acts irreducibly on R^d with commutant the scalars: one component, all of R^d,
    multiplicity one (for d = 1 as for its equal SignFlips(1)). The trivial group C₁ fixes
    every vector: no non-trivial component."""
    for d in (1, 2, 3):  # O(1) = {±1} = SignFlips(1): the sign line, not trivial
        (u, single), = cn.isotypic_components(cn.OrthogonalGroup(d))
        np.testing.assert_allclose(u @ u.T, np.eye(d), atol=1e-15)
        assert u.shape == (d, d) and single is True
    (u, single), = cn.isotypic_components(cn.SignFlips(1))
    assert u.shape == (1, 1) and single is True
    assert cn.isotypic_components(cn.PlanarRotations(1)) == []


@pytest.fixture(scope="module")
def septic_neuron():
    """σ(w·x) = (w·x)⁷ on R²: moments with 14 axes, past exact O(2) averaging's limit."""
    return cn.Neuron(jnp.array([0.8, -0.3]), activation=(0.0,) * 7 + (1.0,))


def test_planar_rotations_past_the_exact_limit_decide_at_n_equal_max_axes(septic_neuron):
    """With 14-axis moments the exact projection is out of reach, and C_N is compared with
    C₁₅ instead. C_N averages e^{ikφ} to 0 unless N | k, and the moments hold frequencies
    |k| ≤ 14: C₁₅ reproduces the O(2) average (the rowspace law holds), C₁₄ keeps the
    frequency-14 term (no law). The decision flips exactly between N = 14 and 15."""
    assert not groups_module._brauer_supported(14, 2)  # the branch this test is about
    assert cn.augmentation_laws(septic_neuron, cn.PlanarRotations(15)) == (cn.RowSpaceLaw(None),)
    assert cn.augmentation_laws(septic_neuron, cn.PlanarRotations(14)) == ()


def test_augmentation_laws_without_an_exact_reference_or_without_a_law():
    """The `()` branches, each beside the case that does give laws:
    - a degree-5 neuron on R³ (10-axis moments, past the memory limit, and no planar
      fallback in 3 dimensions): no law is derived even for icosahedral augmentation;
    - no augmentation; a linear net under a group that is neither finite nor O(d) (no
      isotypic decomposition). Under O(3) itself (a finite-group subclass here) the averaged
      moments are (s/3)I and 0, the loss (s/3)‖W‖² + const: W's direction is conserved, the
      rowspace law of all of R³;
    - equivariant S_n on one n × n layer has n² − 4 laws: none for n = 2, two families for
      n = 3; a non-permutation group or a deeper net gets none;
    - range[QKV] of Lightning Attention is a k-subspace of R^d: a law only when k < d (here
      k = 3 columns: d = 4 yes, d = 3 no);
    - a model of no known family (an MLP)."""
    quintic = cn.Neuron(jnp.array([0.8, -0.3, 0.5]), activation=(0.0,) * 5 + (1.0,))
    assert not groups_module._brauer_supported(10, 3)
    assert cn.augmentation_laws(quintic, cn.Icosahedral()) == ()
    linear = cn.DeepLinear.random((3, 1), key=KEY)
    assert cn.augmentation_laws(linear, None) == ()
    (law,) = cn.augmentation_laws(linear, cn.OrthogonalGroup(3))
    assert law.name == "rowspace[W1·U]"
    np.testing.assert_allclose(np.asarray(law.basis @ law.basis.T), np.eye(3), atol=1e-15)

    class Still(cn.AbstractGroup):  # a compact group given only by its (trivial) average
        dim: int = 3

        @property
        def name(self):
            return "still"

        def average(self, tensor, n_axes):
            return tensor

    assert cn.augmentation_laws(linear, Still()) == ()
    assert cn.augmentation_laws(linear, cn.CyclicShift(3)) != ()  # the positive control

    def equivariant(widths, group):
        return cn.augmentation_laws(cn.DeepLinear.random(widths, key=KEY),
                                    cn.Augmentation(group, equivariant=True))

    assert equivariant((2, 2), cn.Permutations(2)) == ()
    assert {law.name for law in equivariant((3, 3), cn.Permutations(3))} == {
        "equivariant[R]", "equivariant[r]"}
    assert equivariant((3, 3), cn.CyclicShift(3)) == ()
    assert equivariant((3, 3, 3), cn.Permutations(3)) == ()
    for d, expected in ((4, (cn.AttentionRangeLaw(),)), (3, ())):
        attention = cn.LightningAttention.random(d, key=KEY, causal=False)
        assert cn.augmentation_laws(attention, cn.OrthogonalGroup(d)) == expected
    assert cn.augmentation_laws(cn.MLP.random((3, 2, 1), key=KEY), cn.CyclicShift(3)) == ()


# --- generators.py --------------------------------------------------------------------------


class ScaledSum(eqx.Module):
    """f(x) = c (a + b)·x: a scalar leaf c and two vectors a, b ∈ R². By hand, ⟨∇L, Aθ⟩ = 0
    for block-diagonal A = (X_c, X_a, X_b) iff X_a = X_b = −X_c I: one generator, symmetric,
    whose law is ½X_c(c² − ‖a‖² − ‖b‖²). The gradients (L'(a+b)·x, L'c x, L'c x) span 2 of
    D = 5 dimensions, so `count_laws` finds 3 laws (the linear a − b besides)."""

    c: jax.Array
    a: jax.Array
    b: jax.Array

    def __call__(self, x):
        return (self.c * jnp.dot(self.a + self.b, x))[None]


@pytest.fixture(scope="module")
def scaled_sum():
    model = ScaledSum(jnp.asarray(1.3), jnp.array([0.4, -0.7]), jnp.array([0.9, 0.2]))
    return model, cn.find_generators(model, cn.MSE(), input_shape=(2,), count=True)


def _points(n, seed):
    rng = np.random.default_rng(seed)
    return [ScaledSum(jnp.asarray(rng.standard_normal()), jnp.asarray(rng.standard_normal(2)),
                      jnp.asarray(rng.standard_normal(2))) for _ in range(n)]


def test_scalar_leaf_generator_and_its_law_match_the_hand_derivation(scaled_sum):
    """One generator (symmetric, independent at θ), no antisymmetric one; 1 + 4 + 4 = 9 gl
    coordinates (7 symmetric, 2 antisymmetric); 9 + 16 fitted pairs. The law's values at
    random θ are k(c² − ‖a‖² − ‖b‖²) with k = ½X_c = ½ (and not a multiple of c² − ‖a‖², the
    wrong candidate), and its scale ½ Σ_blocks ‖X‖_F ‖WWᵀ‖_F is |k|(c² + √2‖a‖² + √2‖b‖²)
    (‖X_a‖_F = √2|X_c|, ‖aaᵀ‖_F = ‖a‖²)."""
    _, found = scaled_sum
    assert (found.dimension, found.symmetric, found.antisymmetric, found.independent) == (
        1, 1, 0, 1)
    assert (found.algebra.coordinates, found.laws_space.coordinates,
            found.skew.coordinates) == (9, 7, 2)
    assert found.points == 25 and found.parameters == 5
    # The generator in reduced row-echelon form, natural coordinates (c | X_a | X_b, row-major):
    # X_c = 1 pivots, X_a = X_b = −I.
    np.testing.assert_allclose(found.generators, [[1, -1, 0, 0, -1, -1, 0, 0, -1]], atol=1e-9)
    law, = found.laws
    models = _points(6, 0)
    values = np.array([float(law(m)[0]) for m in models])
    reference = np.array([float(m.c**2 - m.a @ m.a - m.b @ m.b) for m in models])
    wrong = np.array([float(m.c**2 - m.a @ m.a) for m in models])
    k = values @ reference / (reference @ reference)
    np.testing.assert_allclose(k, 0.5, rtol=1e-9)  # ½X_c with the pivot X_c = 1
    np.testing.assert_allclose(values, k * reference, rtol=1e-10, atol=1e-12)
    kw = values @ wrong / (wrong @ wrong)
    assert np.max(np.abs(values - kw * wrong)) > 1e-2  # the near-miss is not it
    scales = np.array([float(law.scale(m)[0]) for m in models])
    np.testing.assert_allclose(
        scales, [abs(k) * float(m.c**2 + math.sqrt(2) * (m.a @ m.a + m.b @ m.b))
                 for m in models], rtol=1e-10)


def test_describe_reports_the_laws_beyond_the_quadratic_ones(scaled_sum):
    """`count_laws` counts 3 laws, the generators give 1 independent quadratic one: the
    verdict is 3 − 1 = 2 laws beyond, and the search is not complete."""
    _, found = scaled_sum
    assert found.count.laws == 3 and found.complete is False
    text = found.describe()
    assert "count_laws: 3 independent laws" in text
    assert "-> 2 law(s) beyond the quadratic ones" in text


def test_data_pair_and_points_argument(scaled_sum):
    """Data given as an (x, y) pair is a data class like a `Dataset`: the same algebra. A
    `points` below the 9 + 16 pairs the fit needs is raised to 25; one above is kept."""
    model, _ = scaled_sum
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 2))
    y = jax.random.normal(jax.random.PRNGKey(2), (12, 1))
    few = cn.find_generators(model, cn.MSE(), data=(x, y), points=2, count=False)
    assert (few.dimension, few.symmetric, few.antisymmetric, few.points) == (1, 1, 0, 25)
    more = cn.find_generators(model, cn.MSE(), data=(x, y), points=27, count=False)
    assert (more.dimension, more.symmetric, more.points) == (1, 1, 27)


def test_find_generators_argument_errors_name_the_argument(scaled_sum):
    """Each bad argument is refused by name (and `points` = 2, the least, is accepted above)."""
    model, _ = scaled_sum
    x, y = jnp.ones((4, 2)), jnp.ones((4, 1))
    cases = [({"data": (x,)}, "`data`"), ({"data": (x, y, y)}, "`data`"),
             ({"points": 1}, "`points`"), ({"scales": ()}, "`scales`"),
             ({"scales": "big"}, "`scales`"), ({"scales": (1.0, -1.0)}, "`scales`"),
             ({"count": "yes"}, "`count`")]
    for kwargs, name in cases:
        with pytest.raises(cn.ArgumentError, match=name):
            cn.find_generators(model, cn.MSE(), input_shape=(2,), **kwargs)


def test_all_scalar_blocks_give_the_scalar_balance_law():
    """f(x) = w₂w₁x: by hand, A = diag(α, β) is a symmetry iff α + β = 0 — one generator,
    symmetric (w₁² − w₂²), no antisymmetric one (1 × 1 blocks have none). It used to raise:
    no leaf had a skew coefficient, and an empty list was concatenated."""
    found = cn.find_generators(cn.DeepLinear([jnp.array([[0.7]]), jnp.array([[1.2]])]),
                               cn.MSE(), count=False)
    assert (found.dimension, found.symmetric, found.antisymmetric) == (1, 1, 0)


# --- groups.py ------------------------------------------------------------------------------


def test_sign_flips_size_limit_and_orthogonal_names():
    """(Z₂)^d is accepted up to d = 12 (2¹² = 4096 elements) and refused at 13, naming `d`;
    O(d)'s name says whether it is sampled."""
    assert cn.SignFlips(12).order == 4096
    with pytest.raises(cn.ArgumentError, match="`d` = 13"):
        cn.SignFlips(13)
    assert cn.OrthogonalGroup(3).name == "O(3)"
    assert cn.OrthogonalGroup(4, samples=10).name == "O(4)~10"


def _double_factorial(n):
    return math.prod(range(n, 0, -2))


def test_exact_orthogonal_support_matches_the_memory_closed_forms():
    """Exact O(d) averaging of n-axis tensors is always possible when the answer is trivial
    (n odd: zero; n = 0 or d = 1: the identity); otherwise within the memory limits: d = 2,
    a (2ⁿ × C(n, n/2)/2) basis ≤ 2²¹ entries (the O(2) invariants are the balanced sign
    strings up to a global flip); d ≥ 3, (n − 1)!! pairing tensors of dⁿ entries ≤ 2²⁵."""
    for n, d in itertools.product(range(0, 17), range(1, 13)):
        if n % 2 or n == 0 or d == 1:
            expected = True
        elif d == 2:
            expected = 2**n * (math.comb(n, n // 2) // 2) <= 2**21
        else:
            expected = _double_factorial(n - 1) * d**n <= 2**25
        assert groups_module._brauer_supported(n, d) == expected, (n, d)
    # The boundaries the docstring states: 12 axes for d = 2, 8 for d ≤ 4, 6 for d ≤ 8.
    assert groups_module._brauer_supported(12, 2) and not groups_module._brauer_supported(14, 2)
    assert groups_module._brauer_supported(8, 4) and not groups_module._brauer_supported(8, 5)
    assert groups_module._brauer_supported(6, 8) and not groups_module._brauer_supported(10, 3)


def test_brauer_basis_refuses_a_wrong_invariant_dimension(monkeypatch):
    """O(3) on 8 axes: 105 pairing tensors span the 91-dimensional invariants (the Riordan
    number R₈). With the true dimension the basis is orthonormal; told 90 or 92, the
    eigenvalue-gap guard raises instead of returning a wrong projection."""
    build = groups_module._brauer_basis.__wrapped__  # bypass the cache: fresh each time
    basis, scale = build(8, 3)
    assert basis.shape == (91, 3**8) and scale == 1.0
    np.testing.assert_allclose(basis @ basis.T, np.eye(91), atol=1e-12)
    true_dimension = groups_module._invariant_dimension
    for offset in (-1, 1):
        monkeypatch.setattr(groups_module, "_invariant_dimension",
                            lambda n, d, o=offset: true_dimension(n, d) + o)
        with pytest.raises(RuntimeError, match="no clean eigenvalue gap"):
            build(8, 3)


# --- blocks.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blocks():
    """Two random gated (SwiGLU) transformer blocks of width 4 with two heads."""
    k1, k2 = jax.random.split(KEY)
    make = lambda k: cn.TransformerBlock.random(4, key=k, heads=2, hidden=3,  # noqa: E731
                                                activation="silu", gated=True)
    return make(k1), make(k2)


def test_gate_rescale_through_a_submodel_matches_numpy(blocks):
    """‖W₃[i,:]‖² − ‖W₂[:,i]‖², its scale ‖W₃[i,:]‖² + ‖W₂[:,i]‖² and the relative drift
    max_i |ΔQ_i| / scale_i between two blocks, recomputed in numpy from the matrices; the
    sub-model law is relative like its inner law and never ill-conditioned (∞)."""
    first, second = blocks
    law = SubmodelLaw(GateRescaleLaw(), ("ffn",))

    def terms(block):
        gate, w2 = np.asarray(block.ffn.gate), np.asarray(block.ffn.weights[1])
        return np.sum(gate**2, axis=1), np.sum(w2**2, axis=0)

    g1, o1 = terms(first)
    g2, o2 = terms(second)
    np.testing.assert_allclose(np.asarray(law(first)), g1 - o1, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(law.scale(first)), g1 + o1, rtol=1e-13)
    drift = float(law.drift(law(second), law(first), law.scale(first)))
    np.testing.assert_allclose(drift, np.max(np.abs((g2 - o2) - (g1 - o1)) / (g1 + o1)),
                               rtol=1e-13)
    assert law.relative is True and float(law.condition(first)) == np.inf


def test_mean_read_value_scale_and_axis_bounds(blocks):
    """1ᵀQ_h along axis d (shape (heads, r)) and its scale √(Σ_j Q_{hjr}²), the norm of the
    entries summed, against numpy; the axis must satisfy −ndim ≤ axis < ndim (−3 and 2
    accepted, −4 and 3 refused naming `laws`)."""
    first, second = blocks
    law = MeanReadLaw(("attention", "query"), -2)
    q1, q2 = np.asarray(first.attention.query), np.asarray(second.attention.query)
    np.testing.assert_allclose(np.asarray(law(first)), q1.sum(axis=1), rtol=1e-13)
    scale = np.sqrt(np.sum(q1**2, axis=1))
    np.testing.assert_allclose(np.asarray(law.scale(first)), scale, rtol=1e-13)
    drift = float(law.drift(law(second), law(first), law.scale(first)))
    np.testing.assert_allclose(drift, np.max(np.abs(q2.sum(1) - q1.sum(1)) / scale),
                               rtol=1e-13)
    for axis in (-3, 2):
        MeanReadLaw(("attention", "query"), axis).check(first)
    for axis in (-4, 3):
        with pytest.raises(cn.ArgumentError, match=f"`laws`.*has no axis {axis}"):
            MeanReadLaw(("attention", "query"), axis).check(first)
    with pytest.raises(cn.ArgumentError, match=r"`laws`.*it has no ffn\.nothing"):
        MeanReadLaw(("ffn", "nothing"), -1).check(first)
    with pytest.raises(cn.ArgumentError, match="`path`"):
        MeanReadLaw((), -1)


def test_submodel_of_an_absolute_law_delegates_drift_and_condition():
    """`SubmodelLaw(FourierPhaseLaw(1), ("inner",))` on a residual block around a one-row
    layer: absolute like its inner law, value arg Ŵ₁ and condition |Ŵ₁|/‖w‖ (numpy FFT), and
    the mod-π drift (a change of π − 0.1 is a drift of 0.1)."""
    w = np.array([0.3, -1.1, 0.8, 0.5])
    block = cn.ResidualBlock(cn.DeepLinear([jnp.asarray(w[None])]))
    law = SubmodelLaw(cn.FourierPhaseLaw(1), ("inner",))
    fft = np.fft.fft(w)
    assert law.relative is False
    np.testing.assert_allclose(float(law(block)), np.angle(fft[1]), atol=1e-13)
    np.testing.assert_allclose(float(law.condition(block)), abs(fft[1]) / np.linalg.norm(w),
                               rtol=1e-13)
    drift = float(law.drift(jnp.asarray(1.0 + math.pi - 0.1), jnp.asarray(1.0),
                            law.scale(block)))
    np.testing.assert_allclose(drift, 0.1, atol=1e-13)


def test_block_law_mismatches_name_laws_and_the_reason(blocks):
    """Every refusal names `laws`: rotary laws need a query and a key, an existing head, an
    even key dimension; the gate law a (W₁, W₂) pair; a sub-model law an inner law that fits
    the sub-module (the message says where); and the constructors check their arguments."""
    first, _ = blocks
    with pytest.raises(cn.ArgumentError, match="`laws`.*no `query` projection"):
        RotaryQKLaw(0)(first.ffn)
    RotaryQKLaw(1).check(first.attention)  # head 1 of 2 exists
    with pytest.raises(cn.ArgumentError, match="`laws`.*reads head 2 but the model has 2"):
        RotaryQKLaw(2)(first.attention)
    odd = cn.SoftmaxAttention.random(4, key=KEY, key_dim=3)
    with pytest.raises(cn.ArgumentError, match="`laws`.*key dimension 3 is odd"):
        RotaryQKLaw(0)(odd)

    class ThreeLayerGate(eqx.Module):
        gate: jax.Array
        weights: tuple

    with pytest.raises(cn.ArgumentError, match="`laws`.*no `weights` pair"):
        GateRescaleLaw()(ThreeLayerGate(jnp.ones((2, 2)), (jnp.ones((2, 2)),) * 3))
    with pytest.raises(cn.ArgumentError, match="`laws`.*on attention: .*no `gate`"):
        SubmodelLaw(GateRescaleLaw(), ("attention",)).check(first)
    SubmodelLaw(GateRescaleLaw(), ("ffn",)).check(first)  # the fitting one passes
    with pytest.raises(cn.ArgumentError, match="`law`"):
        SubmodelLaw("gate_rescale", ("ffn",))
    for path in ((), ("ffn", -1), ("ffn", True), ("",), ["ffn"]):
        with pytest.raises(cn.ArgumentError, match="`path`"):
            SubmodelLaw(GateRescaleLaw(), path)
