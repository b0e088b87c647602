"""Groups: their elements, and exact / Monte-Carlo averages over tensor representations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

FINITE = [
    (cn.CyclicShift(5), 5), (cn.Permutations(4), 24), (cn.PlanarRotations(18), 18),
    (cn.SignFlips(3), 8), (cn.Octahedral(), 24), (cn.Icosahedral(), 60),
]


@pytest.mark.parametrize("group, order", FINITE, ids=lambda g: getattr(g, "name", ""))
def test_finite_groups_are_closed_orthogonal_and_of_the_right_order(group, order):
    g = np.asarray(group.matrices())
    assert g.shape == (order, group.dim, group.dim)
    np.testing.assert_allclose(np.einsum("gij,gkj->gik", g, g),
                               np.broadcast_to(np.eye(group.dim), g.shape), atol=1e-14)
    keys = {tuple(np.round(a, 8).ravel() + 0.0) for a in g}
    assert len(keys) == order  # distinct elements
    for a, b in itertools.islice(itertools.product(g, g), 200):
        assert tuple(np.round(a @ b, 8).ravel() + 0.0) in keys  # closed under products


def _random_symmetric_tensor(d, n_axes, seed=0):
    """Σ_i v_i^{⊗n}: symmetric in all axes, like the moment tensors of vector inputs."""
    v = np.random.default_rng(seed).standard_normal((9, d))
    out = 0.0
    for x in v:
        t = x
        for _ in range(n_axes - 1):
            t = np.multiply.outer(t, x)
        out = out + t
    return jnp.asarray(out)


def _orthogonal_average_error(group, n_axes):
    tensor = _random_symmetric_tensor(group.dim, n_axes)
    exact = cn.OrthogonalGroup(group.dim).average(tensor, n_axes)
    return float(jnp.linalg.norm(group.average(tensor, n_axes) - exact)
                 / jnp.linalg.norm(tensor))


def test_design_properties_the_seed_paper_uses():
    # Icosahedral rotations reproduce SO(3) on 4th moments; octahedral ones do not.
    assert _orthogonal_average_error(cn.Icosahedral(), 4) < 1e-14
    assert _orthogonal_average_error(cn.Octahedral(), 4) > 1e-2
    assert _orthogonal_average_error(cn.Octahedral(), 2) < 1e-14
    # C_n ⊂ SO(2) averages symmetric degree-k tensors exactly iff none of the frequencies
    # 2, 4, …, k is a multiple of n.
    assert _orthogonal_average_error(cn.PlanarRotations(18), 8) < 1e-14
    assert _orthogonal_average_error(cn.PlanarRotations(5), 8) < 1e-14
    assert _orthogonal_average_error(cn.PlanarRotations(4), 8) > 1e-3


def test_exact_orthogonal_average_is_an_invariant_projection(getkey):
    group = cn.OrthogonalGroup(4)
    tensor = jax.random.normal(getkey(), (4, 4, 4, 4, 3))  # trailing axis left alone
    projected = group.average(tensor, 4)
    np.testing.assert_allclose(group.average(projected, 4), projected, atol=1e-14)
    q, _ = jnp.linalg.qr(jax.random.normal(getkey(), (4, 4)))
    rotated = projected
    for axis in range(4):
        rotated = jnp.moveaxis(jnp.tensordot(q, rotated, axes=([1], [axis])), 0, axis)
    np.testing.assert_allclose(rotated, projected, atol=1e-13)
    assert float(jnp.max(jnp.abs(group.average(tensor[..., 0], 3)))) == 0.0  # odd: −I kills


def _numpy_act(g, tensor, n_axes):
    for axis in range(n_axes):
        tensor = np.moveaxis(np.tensordot(g, tensor, axes=([1], [axis])), 0, axis)
    return tensor


def _dihedral(n):
    """D_n ⊂ O(2), 2n elements: an exact O(2) design for tensors with < n axes (their
    components are trigonometric polynomials of degree < n)."""
    angle = 2.0 * np.pi * np.arange(n) / n
    c, s = np.cos(angle), np.sin(angle)
    rotations = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    return np.concatenate([rotations, rotations @ np.diag([1.0, -1.0])])


def _reference_projection(tensor, n_axes, d):
    """Least-squares projection onto the span of independently built pairing tensors
    (SVD-based `lstsq`; never forms their singular Gram matrix)."""
    def pairings(items):
        if not items:
            yield ()
            return
        for i in range(1, len(items)):
            for tail in pairings(items[1:i] + items[i + 1:]):
                yield ((items[0], items[i]),) + tail

    columns = []
    for pairing in pairings(tuple(range(n_axes))):
        index = np.indices((d,) * n_axes).reshape(n_axes, -1)
        columns.append(np.all([index[a] == index[b] for a, b in pairing], axis=0) * 1.0)
    basis = np.stack(columns, axis=1)
    flat = np.asarray(tensor).reshape(d**n_axes, -1)
    coefficients = np.linalg.lstsq(basis, flat, rcond=1e-10)[0]
    return (basis @ coefficients).reshape(tensor.shape)


EXACT_CASES = [(2, 4), (2, 6), (2, 8), (2, 12), (3, 4), (3, 6), (3, 8), (8, 4)]


@pytest.mark.parametrize("d, n_axes", EXACT_CASES)
def test_exact_orthogonal_average_equals_independent_references(d, n_axes):
    rng = np.random.default_rng(d * 100 + n_axes)
    tensor = rng.standard_normal((d,) * n_axes)  # general, not symmetric: O(d) ≠ SO(d) here
    exact = np.asarray(cn.OrthogonalGroup(d).average(jnp.asarray(tensor), n_axes))
    scale = np.linalg.norm(tensor)
    references = []
    if d == 2:  # a finite design, averaged in numpy
        g = _dihedral(n_axes + 1)
        references.append(np.mean([_numpy_act(a, tensor, n_axes) for a in g], axis=0))
    if d == 3 and n_axes == 4:  # icosahedral rotations are a 5-design of SO(3); even n: O(3)
        g = np.asarray(cn.Icosahedral().matrices())
        references.append(np.mean([_numpy_act(a, tensor, n_axes) for a in g], axis=0))
    if n_axes <= 8:
        references.append(_reference_projection(tensor, n_axes, d))
    for reference in references:
        assert np.max(np.abs(exact - reference)) <= 1e-12 * scale
    # Summation order: permuting the axes (every sum runs in another order) commutes with
    # the O(d) average, so it must give the same numbers to round-off.
    perm = rng.permutation(n_axes)
    permuted = np.asarray(cn.OrthogonalGroup(d).average(jnp.asarray(tensor.transpose(perm)),
                                                        n_axes))
    assert np.max(np.abs(permuted - exact.transpose(perm))) <= 1e-12 * scale


@pytest.mark.parametrize("d, n_axes", [(3, 6), (3, 8)])
def test_exact_orthogonal_basis_does_not_depend_on_the_pairing_order(d, n_axes):
    from conservation._data.groups import _brauer_basis

    rng = np.random.default_rng(0)
    count = len(_brauer_basis(n_axes, d)[0])
    n_pairings = int(np.prod(np.arange(n_axes - 1, 0, -2)))
    permuted_basis, _ = _brauer_basis(n_axes, d, tuple(rng.permutation(n_pairings).tolist()))
    basis, _ = _brauer_basis(n_axes, d)
    assert count == len(permuted_basis)  # the dependent pairings (d < n/2) ruled out alike
    tensor = rng.standard_normal(d**n_axes)
    reference = _reference_projection(tensor, n_axes, d)
    for b in (basis, permuted_basis):
        np.testing.assert_allclose(b.T @ (b @ tensor), reference,
                                   atol=1e-12 * np.linalg.norm(tensor))


def test_invariant_dimensions_match_known_counts():
    from conservation._data.groups import _invariant_dimension

    # O(2): half the balanced ± strings, C(n, n/2)/2; d ≥ n/2: (n − 1)!! pairings.
    assert [_invariant_dimension(n, 2) for n in (2, 4, 6, 8, 12)] == [1, 3, 10, 35, 462]
    assert [_invariant_dimension(n, 8) for n in (2, 4, 6, 8)] == [1, 3, 15, 105]
    assert _invariant_dimension(8, 3) == 91 and _invariant_dimension(5, 3) == 0


def test_monte_carlo_defect_decays_like_inverse_square_root_of_samples():
    tensor = _random_symmetric_tensor(4, 4, seed=3)
    exact = cn.OrthogonalGroup(4).average(tensor, 4)
    errors = []
    for samples in (256, 4096):
        trials = [float(jnp.linalg.norm(cn.OrthogonalGroup(4, samples, seed=s).average(
            tensor, 4) - exact)) for s in range(4)]
        errors.append(np.mean(trials))
    ratio = errors[0] / errors[1]  # 16× the samples: 4× smaller
    assert 2.0 < ratio < 8.0, errors


def test_group_argument_errors():
    with pytest.raises(ValueError, match="`n`"):
        cn.CyclicShift(1)
    with pytest.raises(ValueError, match="samples"):
        cn.OrthogonalGroup(3, samples=3)
    with pytest.raises(ValueError, match="no finite list"):
        cn.OrthogonalGroup(3).matrices()
    with pytest.raises(ValueError, match="n ≤ 8"):
        cn.Permutations(9)
    with pytest.raises(ValueError, match="samples="):
        cn.OrthogonalGroup(2).average(jnp.zeros((2,) * 14), 14)
    with pytest.raises(ValueError, match="samples="):
        cn.OrthogonalGroup(5).average(jnp.zeros((5,) * 8), 8)


@pytest.mark.parametrize("group", [cn.OrthogonalGroup(3), cn.OrthogonalGroup(1),
                                   cn.CyclicShift(4), cn.SignFlips(2)], ids=str)
def test_averaging_over_no_axis_is_the_identity(group, getkey):
    """avg_g of the empty tensor product is the identity: a tensor averaged over 0 axes (a
    moment of degree 0, e.g. E[y] or a constant feature) is returned as it is, trailing axes
    and all, for the exact O(d) projection as for finite groups."""
    tensor = jax.random.normal(getkey(), (5, 2))
    np.testing.assert_array_equal(group.average(tensor, 0), tensor)


def test_the_largest_exact_orthogonal_average_within_the_memory_limit():
    """O(4) on 8 axes needs 7!! = 105 Brauer tensors of 4⁸ entries (52.5 MiB), under the
    limit; 9!! of them would not be. It must be computed exactly, not refused: the result is
    invariant under a random rotation, the projection is orthogonal and idempotent, and an
    invariant tensor (a product of Kronecker deltas) is its own average."""
    d, n_axes = 4, 8
    rng = np.random.default_rng(5)
    tensor = rng.standard_normal((d,) * n_axes)
    group = cn.OrthogonalGroup(d)
    avg = np.asarray(group.average(jnp.asarray(tensor), n_axes))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = avg
    for axis in range(n_axes):
        rotated = np.moveaxis(np.tensordot(q, rotated, axes=([1], [axis])), 0, axis)
    scale = np.abs(avg).max()
    assert scale > 0.1
    np.testing.assert_allclose(rotated, avg, atol=1e-13 * scale)
    assert abs(np.vdot(tensor - avg, avg)) < 1e-12 * np.vdot(avg, avg)
    np.testing.assert_allclose(np.asarray(group.average(jnp.asarray(avg), n_axes)), avg,
                               atol=1e-13 * scale)
    eye = np.eye(d)
    deltas = np.einsum("ab,cd,ef,gh->acbdegfh", eye, eye, eye, eye)
    np.testing.assert_allclose(np.asarray(group.average(jnp.asarray(deltas), n_axes)), deltas,
                               atol=1e-13)
