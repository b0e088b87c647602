"""Augmentation: exact moment symmetrisation equals orbit expansion; symmetry defects."""

import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn

CASES = {
    "linear_C3": ("deep_linear", lambda: cn.CyclicShift(3), False),
    "linear_S3_equivariant": ("linear_square", lambda: cn.Permutations(3), True),
    "quadratic_icosahedral": ("quadratic", lambda: cn.Icosahedral(), False),
    "cubic_signs": ("cubic", lambda: cn.SignFlips(3), False),
    "neuron_C18": ("neuron", lambda: cn.PlanarRotations(18), False),
    "attention_signs": ("attention_heads_out", lambda: cn.SignFlips(4), False),
    "attention_O4_sampled": ("attention_decay", lambda: cn.OrthogonalGroup(4, 64), False),
}


def _case(zoo, getkey, name):
    model_name, make_group, equivariant = CASES[name]
    if model_name == "linear_square":
        model = cn.DeepLinear.random((3, 4, 3), key=getkey())
        xs = cn.gaussian_inputs(getkey(), 7, (3,))
    else:
        model, xs = zoo[model_name]
    out = jax.eval_shape(jax.vmap(model), xs).shape
    data = cn.Dataset(xs, jax.random.normal(getkey(), out))
    return model, data, cn.Augmentation(make_group(), equivariant)


def _gradient(objective, model):
    return jfu.ravel_pytree(jax.grad(objective)(model))[0]


# attention_signs (~13 s) is slow, to keep the default suite under 10 min on 2 cores; the
# sign-flip path is covered by cubic_signs, attention models by attention_O4_sampled.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n == "attention_signs" else n for n in CASES])
def test_symmetrised_moments_equal_the_orbit_expanded_data(zoo, getkey, name):
    model, data, augmentation = _case(zoo, getkey, name)
    fast = cn.make_objective(cn.MSE(), data, model, augment=augmentation)
    expanded = augmentation.apply(data)
    assert len(expanded) == len(data) * augmentation.group.order
    reference = cn.make_objective(cn.MSE(), expanded, model, moments=False)
    per_sample = cn.make_objective(cn.MSE(), data, model, augment=augmentation, moments=False)
    assert fast.moments is not None and reference.moments is None
    for objective in (fast, per_sample):
        np.testing.assert_allclose(objective(model), reference(model), rtol=1e-12)
        g, g_ref = _gradient(objective, model), _gradient(reference, model)
        assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) <= 1e-12


def test_symmetry_defect_exact_versus_monte_carlo(getkey):
    model = cn.LightningAttention.random(4, key=getkey(), causal=False)
    xs = cn.gaussian_inputs(getkey(), 6, (5, 4))
    data = cn.teacher_dataset(cn.LightningAttention.random(4, key=getkey(), causal=False), xs)
    base = cn.make_objective(cn.MSE(), data, model).moments
    exact = cn.Augmentation(cn.OrthogonalGroup(4))
    assert float(exact.defect(base, model)) > 0.3  # plain data: far from O(4)-invariant
    symmetrised = cn.make_objective(cn.MSE(), data, model, augment=exact.group).moments
    assert float(exact.defect(symmetrised, model)) < 1e-14
    defects = []
    for samples in (256, 4096):
        sampled = cn.Augmentation(cn.OrthogonalGroup(4, samples))
        moments = cn.make_objective(cn.MSE(), data, model, augment=sampled).moments
        defects.append(float(sampled.defect(moments, model)))
    assert 1e-3 < defects[1] < defects[0] < 0.3, defects


def test_augmentation_errors(zoo, getkey):
    model, xs = zoo["deep_linear"]  # inputs in R³
    data = cn.Dataset(xs, jax.vmap(model)(xs))
    with pytest.raises(ValueError, match="R\\^4"):
        cn.make_objective(cn.MSE(), data, model, augment=cn.CyclicShift(4))
    with pytest.raises(ValueError, match="no finite orbits"):
        cn.make_objective(cn.LogCosh(), data, model, augment=cn.OrthogonalGroup(3))
    with pytest.raises(ValueError, match="equivariant"):
        cn.make_objective(cn.MSE(), data, model,
                          augment=cn.Augmentation(cn.CyclicShift(3), equivariant=True))
    with pytest.raises(TypeError, match="group"):
        cn.make_objective(cn.MSE(), data, model, augment="C3")


def test_exact_o2_symmetrisation_of_the_sextic_neuron(zoo, getkey):
    """The sextic neuron's moments have up to 12 axes in d = 2 (exact O(2), formerly
    refused): equal to expanding the data by the dihedral group D₁₃ (built here in numpy),
    an exact O(2) design for trigonometric polynomials of degree ≤ 12."""
    model, xs = zoo["neuron"]
    assert 2 * max(model.feature_degrees) == 12
    y = jax.random.normal(getkey(), (len(xs), 1))
    fast = cn.make_objective(cn.MSE(), cn.Dataset(xs, y), model, augment=cn.OrthogonalGroup(2))
    angle = 2.0 * np.pi * np.arange(13) / 13
    c, s = np.cos(angle), np.sin(angle)
    rotations = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    dihedral = np.concatenate([rotations, rotations @ np.diag([1.0, -1.0])])
    x_orbit = np.einsum("gij,nj->gni", dihedral, np.asarray(xs)).reshape(-1, 2)
    y_orbit = np.broadcast_to(np.asarray(y), (26, *y.shape)).reshape(-1, 1)
    reference = cn.make_objective(cn.MSE(), cn.Dataset(jnp.asarray(x_orbit), jnp.asarray(y_orbit)),
                                  model, moments=False)
    np.testing.assert_allclose(fast(model), reference(model), rtol=1e-12)
    g, g_ref = _gradient(fast, model), _gradient(reference, model)
    assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) <= 1e-12
