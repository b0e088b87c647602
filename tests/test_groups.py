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
