"""Data augmentation by a group: orbit expansion, and exact symmetrisation of MSE moments.

Augmenting a data set by G replaces the risk by its average over the orbits,
L_G(θ) = avg_g L_{gD}(θ). For MSE on a tensorizable model, ψ(g·x) = ψ(x) τ(g)ᵀ with
τ(g) = ⊕_k g^{⊗k} over the feature blocks, so augmentation maps the moments to

    M ↦ avg_g τ(g) M τ(g)ᵀ,    B ↦ avg_g τ(g) B ρ(g)ᵀ,    c ↦ c

(ρ(g) = g on equivariant targets, identity on invariant ones): the projection onto the
commutant / fixed space of G (seed paper §2.4). Its cost is that of averaging the p×p moment
matrix over G — independent of the number of samples, hence of the orbit size.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array
from .._models.base import AbstractTensorizableModel, Ensemble
from .._validation import ArgumentError
from .dataset import Dataset
from .groups import AbstractFiniteGroup, AbstractGroup, OrthogonalGroup


class Augmentation(eqx.Module):
    """Augmentation of a data set by `group` (acting on the last input axis).

    - `group`: an `AbstractGroup` of dimension = the inputs' last axis.
    - `equivariant`: targets transform too, y ↦ g y (needs output dimension = group dim);
      default: invariant targets, y unchanged.
    """

    group: AbstractGroup
    equivariant: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.group, AbstractGroup):
            raise ArgumentError(f"`group` must be a conservation group, got {self.group!r}; "
                                "e.g. conservation.CyclicShift(3).")
        if not isinstance(self.equivariant, bool):
            raise ArgumentError(f"`equivariant` must be True or False, got "
                                f"{self.equivariant!r}.")

    @property
    def name(self) -> str:
        return self.group.name + (" (equivariant)" if self.equivariant else "")

    def apply(self, data: Dataset) -> Dataset:
        """The orbit-expanded data set {(g·x_i, ρ(g) y_i)}: |G| · N samples (g-major)."""
        if not isinstance(self.group, AbstractFiniteGroup):
            raise ArgumentError(f"{self.group.name} has no finite orbits to expand; use the exact "
                             "moment symmetrisation (MSE on a tensorizable model) or `samples=`.")
        g = self.group.matrices()  # exact O(d) raises here: it has no finite orbits
        _check_dims(self, data)
        x = jnp.einsum("gij,n...j->gn...i", g, data.x).reshape(-1, *data.x.shape[1:])
        if self.equivariant:
            y = jnp.einsum("gij,n...j->gn...i", g, data.y).reshape(-1, *data.y.shape[1:])
        else:
            y = jnp.broadcast_to(data.y, (g.shape[0], *data.y.shape)).reshape(-1,
                                                                                *data.y.shape[1:])
        return Dataset(x, y)

    def symmetrize(self, moments, model: AbstractTensorizableModel):
        """Moments of the augmented data from those of the base data (exact; see module doc)."""
        model = _tensorizable(model)
        d = self.group.dim
        degrees = model.feature_degrees
        sizes = [d**k for k in degrees]
        if sum(sizes) != moments.M.shape[0]:
            raise ArgumentError(f"{type(model).__name__}'s features have {moments.M.shape[0]} "
                             f"columns, not Σ_k {d}^k over degrees {degrees}: the group "
                             f"dimension {d} does not match the model's input.")
        m = moments.B.shape[1]
        if self.equivariant and m != d:
            raise ArgumentError(f"equivariant targets need output dimension {d} (the group's), "
                             f"got {m}.")
        design = _factor_design(self.group, max(degrees), m, self.equivariant,
                                moments.R.shape[0])
        return _symmetrize(self, moments, tuple(degrees), design)

    def defect(self, moments, model) -> Array:
        """Symmetry defect of `moments`: ‖(M, B) − P(M, B)‖ / ‖(M, B)‖ with P the exact
        projection for this group (for sampled O(d), the exact O(d) one). ~1e-16 after exact
        symmetrisation, O(S^{-1/2}) after Monte-Carlo augmentation with S samples."""
        exact = Augmentation(self.group.exact(), self.equivariant).symmetrize(moments, model)
        num = jnp.sqrt(jnp.sum((moments.M - exact.M) ** 2) + jnp.sum((moments.B - exact.B) ** 2))
        den = jnp.sqrt(jnp.sum(moments.M**2) + jnp.sum(moments.B**2))
        return num / den


@eqx.filter_jit
def _symmetrize(augmentation, moments, degrees, design):
    # One compiled program (the blocks' averages, the factor): eagerly it is ~100 small
    # dispatches, each compiled on first use.
    from .objective import Moments

    d = augmentation.group.dim
    m = moments.B.shape[1]
    sizes = [d**k for k in degrees]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    M_blocks, B_blocks = [], []
    for k1, o1, s1 in zip(degrees, offsets, sizes):
        row = []
        for k2, o2, s2 in zip(degrees, offsets, sizes):
            block = moments.M[o1:o1 + s1, o2:o2 + s2].reshape((d,) * (k1 + k2))
            row.append(augmentation.group.average(block, k1 + k2).reshape(s1, s2))
        M_blocks.append(row)
        block = moments.B[o1:o1 + s1].reshape((d,) * k1 + (m,))
        if augmentation.equivariant:  # the output axis rotates too: average it along with the rest
            block = jnp.moveaxis(augmentation.group.average(jnp.moveaxis(block, -1, 0), k1 + 1),
                                 0, -1)
        else:
            block = augmentation.group.average(block, k1)
        B_blocks.append(block.reshape(s1, m))
    M = jnp.block(M_blocks)
    B = jnp.concatenate(B_blocks)
    C = moments.C
    if augmentation.equivariant:  # Y ↦ Y gᵀ: C ↦ avg_g g C gᵀ
        C = augmentation.group.average(C, 2)
    if design is None:
        return Moments.from_gram(M, B, C, moments.n)
    # The augmented data's QR factor from the base one: [Ψ Y] ↦ [Ψ τ(g)ᵀ, Y ρ(g)ᵀ] for
    # every g of a finite group (or of an exact finite design of O(2)), stacked and
    # re-factored — backward stable, so the loss keeps its digits near a perfect fit.
    R = _stacked_factor(moments.R, design, degrees, d, augmentation.equivariant)
    M = 0.5 * (M + M.T)
    return Moments(M, B, 0.5 * (C + C.T), R, moments.n)


_MAX_STACKED_ENTRIES = 2**24  # 128 MiB of float64 for the stacked factors


def _factor_design(group, max_degree, m, equivariant, k):
    """Orthogonal matrices whose average reproduces `group`'s on the Gram matrix of [Ψ Y],
    when few enough to stack k × (p + m) factors; else None (eigen-factor the moments)."""
    import numpy as np

    if isinstance(group, AbstractFiniteGroup) and not (
            isinstance(group, OrthogonalGroup) and group.samples is None):
        matrices = group.matrices()
    elif isinstance(group, OrthogonalGroup) and group.dim == 2:
        # The Gram entries are trigonometric polynomials of degree ≤ 2·max_degree (+1, +2
        # for equivariant targets): the dihedral group D_N with N above that is exact.
        n = 2 * max_degree + 3
        angle = 2.0 * np.pi * np.arange(n) / n
        cos, sin = np.cos(angle), np.sin(angle)
        rotations = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
        matrices = jnp.asarray(np.concatenate([rotations, rotations @ np.diag([1.0, -1.0])]))
    else:
        return None
    q = sum(group.dim**deg for deg in range(max_degree + 1)) + m  # ≥ p + m
    if matrices.shape[0] * k * q > _MAX_STACKED_ENTRIES:
        return None
    return matrices


def _stacked_factor(r, matrices, degrees, d, equivariant):
    sizes = [d**deg for deg in degrees]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    k = r.shape[0]

    def act(g):
        blocks = []
        for deg, o, s in zip(degrees, offsets, sizes):
            block = r[:, o:o + s].reshape((k,) + (d,) * deg)
            for axis in range(1, deg + 1):  # ψ(gx) = ψ(x) τ(g)ᵀ: g on every feature axis
                block = jnp.moveaxis(jnp.tensordot(g, block, axes=([1], [axis])), 0, axis)
            blocks.append(block.reshape(k, s))
        targets = r[:, sum(sizes):]
        blocks.append(targets @ g.T if equivariant else targets)
        return jnp.concatenate(blocks, axis=1)

    stacked = jax.vmap(act)(matrices).reshape(-1, r.shape[1]) / jnp.sqrt(matrices.shape[0])
    return jnp.linalg.qr(stacked, mode="r")


def _tensorizable(model):
    model = model[0] if isinstance(model, Ensemble) else model
    if not isinstance(model, AbstractTensorizableModel):
        raise ArgumentError(f"`model` ({type(model).__name__}) is not tensorizable: moments "
                            "cannot be symmetrised; augment the data by orbit expansion "
                            "instead.")
    return model


def _check_dims(augmentation, data):
    d = augmentation.group.dim
    if data.x.shape[-1] != d:
        raise ArgumentError(f"{augmentation.group.name} acts on R^{d} but the inputs' last axis "
                         f"has size {data.x.shape[-1]}.")
    if augmentation.equivariant and data.y.shape[-1] != d:
        raise ArgumentError(f"equivariant targets need y's last axis of size {d}, got "
                         f"{data.y.shape[-1]}.")


def as_augmentation(augment) -> Augmentation | None:
    """None, a group, or an `Augmentation` → `Augmentation | None`."""
    if augment is None or isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, AbstractGroup):
        return Augmentation(augment)
    raise ArgumentError(f"`augment` must be a group or an `Augmentation`, got {augment!r}; "
                        "e.g. augment=conservation.CyclicShift(3).")

