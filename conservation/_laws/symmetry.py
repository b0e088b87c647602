"""Conservation laws induced by data augmentation (seed paper §3.2, §5), and their generator.

With MSE, augmentation by G projects the data moments onto the commutant / fixed space of G,
which gives the loss a hidden continuous symmetry. When that symmetry rotates one parameter
block P (P ↦ gP), ∇_P L = P·Sym and the subspace range(P) is conserved — under gradient flow
and even under gradient descent. These laws compare subspaces as orthogonal projectors and
angles mod π (a line has no sign), and report their `condition`: the relative size of the
component they measure. Once it decays to round-off, their drift is noise (seed paper §6.4).
"""

import abc

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float, Scalar
from .._data.augmentation import Augmentation, as_augmentation
from .._data.groups import (
    AbstractFiniteGroup,
    CyclicShift,
    OrthogonalGroup,
    Permutations,
    PlanarRotations,
    _brauer_supported,
)
from .._validation import ArgumentError, fail, integer
from .base import AbstractLaw, law_mismatch


def _first_layer(model) -> Float[Array, "h d"]:
    weights = getattr(model, "weights", None)
    if isinstance(weights, tuple | list) and weights:
        return weights[0]
    if getattr(model, "weight", None) is not None:
        return model.weight[None, :]
    raise ArgumentError(f"`model` ({type(model).__name__}) has no first weight layer "
                        "(`weights[0]` or `weight`).")


def _check_first_layer(law, model, rows: int | None = None, columns: int | None = None):
    """The first layer exists, is a matrix, and has `rows` rows / `columns` columns."""
    # Shapes only: `model`'s leaves may be abstract (`check_laws`).
    weights, weight = getattr(model, "weights", None), getattr(model, "weight", None)
    if isinstance(weights, tuple | list) and weights:
        shape = tuple(weights[0].shape)
    elif weight is not None and len(weight.shape) == 1:
        shape = (1, weight.shape[0])
    else:
        raise law_mismatch(law, model, "it has no first weight layer (`weights[0]` or "
                                       "`weight`)")
    if len(shape) != 2:
        raise law_mismatch(law, model, f"its first layer has shape {shape}, not a matrix")
    if rows is not None and shape[0] != rows:
        raise law_mismatch(law, model, f"the law needs a first layer of {rows} row(s), the "
                                       f"model's has shape {shape}")
    if columns is not None and shape[1] != columns:
        raise law_mismatch(law, model, f"the law needs a first layer of {columns} columns, the "
                                       f"model's has shape {shape}")
    return shape


class AbstractSubspaceLaw(AbstractLaw):
    """The column space of a parameter block P(θ) ∈ R^{p×k} (rank k < p), a point of
    Gr(k, p): value = the orthogonal projector P(PᵀP)⁻¹Pᵀ, drift = ‖Π(t) − Π(0)‖_F."""

    relative = False  # an absolute drift

    @abc.abstractmethod
    def block(self, model) -> Float[Array, "p k"]:
        """P(θ), whose column space is the conserved subspace."""

    @abc.abstractmethod
    def source_norm(self, model) -> Scalar:
        """Norm of the parameters P is cut from (what round-off is relative to)."""

    def __call__(self, model) -> Float[Array, "p p"]:
        self.check(model)
        p = self.block(model)
        return p @ jnp.linalg.solve(p.T @ p, p.T)

    def drift(self, value, reference, scale) -> Scalar:
        del scale
        return jnp.linalg.norm(value - reference)

    def condition(self, model) -> Scalar:
        self.check(model)
        singular = jnp.linalg.svd(self.block(model), compute_uv=False)
        return singular[-1] / self.source_norm(model)


class RowSpaceLaw(AbstractSubspaceLaw):
    """rowspace(W₁ U) for the first layer W₁ (rows: hidden neurons) restricted to the
    subspace with orthonormal basis U (d × d_λ): e.g. an isotypic component of the input
    representation (linear nets), or all of R^d (U = None; polynomial nets under an O(d)-design
    augmentation). For a one-row W₁ this is the direction of W₁U, mod sign."""

    basis: Float[Array, "d q"] | None
    label: str = eqx.field(static=True, default="")

    def __check_init__(self):
        if self.basis is not None and getattr(self.basis, "ndim", None) != 2:
            raise fail("basis", self.basis, "must be None or a matrix (d × q)")
        if not isinstance(self.label, str):
            raise fail("label", self.label, "must be a string")

    @property
    def name(self) -> str:
        return f"rowspace[W1{'·' + self.label if self.label else ''}]"

    def check(self, model) -> None:
        _check_first_layer(self, model,
                           columns=None if self.basis is None else self.basis.shape[0])

    def block(self, model):
        w = _first_layer(model)
        return (w if self.basis is None else w @ self.basis).T

    def source_norm(self, model):
        return jnp.linalg.norm(_first_layer(model))


class AttentionRangeLaw(AbstractSubspaceLaw):
    """range([Q_1 … Q_H K_1 … K_H V_1 … V_H]) ⊂ R^d of Lightning Attention: conserved under
    O(d)-augmentation, which lifts to (Q, K, V) ↦ (gQ, gK, gV) (seed paper Fig. 3)."""

    @property
    def name(self) -> str:
        return "range[QKV]"

    def check(self, model) -> None:
        for name in ("query", "key", "value"):
            if getattr(model, name, None) is None:
                raise law_mismatch(self, model, f"it has no `{name}` projection (the law is "
                                                "Lightning Attention's)")

    def block(self, model):
        blocks = [model.query, model.key, model.value]  # each (H, d, ·)
        return jnp.concatenate([b[h] for b in blocks for h in range(b.shape[0])], axis=1)

    def source_norm(self, model):
        return jnp.linalg.norm(self.block(model))


def _equivariant_parts(model):
    """For one square layer W ∈ R^{n×n}: R = WΠ⊥ − sΠ⊥ (s = tr(WΠ⊥)/(n−1)) and r = Π⊥W𝟙,
    Π⊥ the projector onto 𝟙^⊥."""
    w = _first_layer(model)
    n = w.shape[0]
    perp = jnp.eye(n) - jnp.full((n, n), 1.0 / n)
    s = jnp.trace(w @ perp) / (n - 1)
    return w @ perp - s * perp, perp @ w @ jnp.ones(n)


def _check_square(law, model):
    shape = _check_first_layer(law, model)
    if shape[0] != shape[1] or shape[0] < 2:
        raise law_mismatch(law, model, f"the law needs one square layer (n × n, n ≥ 2), the "
                                       f"model's first layer has shape {shape}")


class EquivariantResidualLaw(AbstractSubspaceLaw):
    """Direction (mod sign) of R = WΠ⊥ − sΠ⊥ for one S_n-equivariant linear layer
    W ∈ R^{n×n} (inputs and targets permuted together): with MSE the augmented loss only
    rescales R (seed paper §5.1). With `EquivariantRowSumLaw`: n² − 4 laws."""

    @property
    def name(self) -> str:
        return "equivariant[R]"

    def check(self, model) -> None:
        _check_square(self, model)

    def block(self, model):
        return _equivariant_parts(model)[0].reshape(-1, 1)

    def source_norm(self, model):
        return jnp.linalg.norm(_first_layer(model))


class EquivariantRowSumLaw(AbstractSubspaceLaw):
    """Direction (mod sign) of r = Π⊥W𝟙 for one S_n-equivariant linear layer (see
    `EquivariantResidualLaw`)."""

    @property
    def name(self) -> str:
        return "equivariant[r]"

    def check(self, model) -> None:
        _check_square(self, model)

    def block(self, model):
        return _equivariant_parts(model)[1][:, None]

    def source_norm(self, model):
        return jnp.linalg.norm(_first_layer(model))


class FourierPhaseLaw(AbstractLaw):
    """arg Ŵ_j, Ŵ_j = Σ_k w_k e^{−2πijk/n}, of a one-row linear layer w ∈ R^n under C_n shifts
    (1 ≤ j < n/2). Compared mod π: gradient descent may flip the sign of the component."""

    relative = False  # an absolute drift

    frequency: int = eqx.field(static=True)

    def __check_init__(self):
        integer("frequency", self.frequency, minimum=1)

    @property
    def name(self) -> str:
        return f"phase[{self.frequency}]"

    def check(self, model) -> None:
        shape = _check_first_layer(self, model, rows=1)
        if not self.frequency < shape[1]:
            raise law_mismatch(self, model, f"frequency {self.frequency} needs 1 ≤ j < n for "
                                            f"the model's n = {shape[1]} inputs")

    def _coefficient(self, model):
        self.check(model)
        w = _first_layer(model)[0]
        n = w.shape[0]
        angle = -2.0 * jnp.pi * self.frequency * jnp.arange(n) / n
        return jnp.sum(w * jnp.cos(angle)), jnp.sum(w * jnp.sin(angle))

    def __call__(self, model) -> Scalar:
        re, im = self._coefficient(model)
        return jnp.arctan2(im, re)

    def drift(self, value, reference, scale) -> Scalar:
        del scale
        delta = jnp.mod(value - reference, jnp.pi)
        return jnp.minimum(delta, jnp.pi - delta)

    def condition(self, model) -> Scalar:
        re, im = self._coefficient(model)
        return jnp.hypot(re, im) / jnp.linalg.norm(_first_layer(model))


class CyclicRatioLaw(AbstractLaw):
    """I(W) = (W₁ − W₂)/(W₁ + W₂ − 2W₃) of a one-row linear layer on R³ under C₃ shifts: the
    quantity the seed paper's Fig. 2 plots (absolute drift |I(W_t) − I(W_0)|)."""

    relative = False  # an absolute drift

    @property
    def name(self) -> str:
        return "ratio[I(W)]"

    def check(self, model) -> None:
        _check_first_layer(self, model, rows=1, columns=3)

    def __call__(self, model) -> Scalar:
        self.check(model)
        w = _first_layer(model)[0]
        return (w[0] - w[1]) / (w[0] + w[1] - 2.0 * w[2])

    def condition(self, model) -> Scalar:
        self.check(model)
        w = _first_layer(model)[0]
        return jnp.abs(w[0] + w[1] - 2.0 * w[2]) / jnp.linalg.norm(w)


def isotypic_components(group, *, seed: int = 0) -> list[tuple[np.ndarray, bool]]:
    """The non-trivial isotypic components of a finite group's representation on R^d.

    **Returns:** `(U, multiplicity_one)` per component: U (d × d_λ) an orthonormal basis, and
    whether every symmetric matrix commuting with G is a multiple of the identity on it (true
    for an irreducible of multiplicity one — the case with a Grassmannian law).
    """
    integer("seed", seed, minimum=0)
    if isinstance(group, OrthogonalGroup):
        # Irreducible on R^d with the scalars as commutant; for d = 1, {±1}'s sign line.
        return [(np.eye(group.dim), True)]
    if not isinstance(group, AbstractFiniteGroup):
        raise fail("group", group, "must be a finite conservation group or OrthogonalGroup",
                   "e.g. conservation.CyclicShift(3)")
    g = np.asarray(group.matrices())
    d = group.dim
    rng = np.random.default_rng(seed)

    def commutant_sample():
        a = rng.standard_normal((d, d))
        a = a + a.T
        return np.einsum("gij,jk,glk->il", g, a, g) / len(g)

    fixed = np.mean(g, axis=0)
    evals, evecs = np.linalg.eigh(0.5 * (fixed + fixed.T))
    complement = evecs[:, evals < 0.5]  # the projector's 0-eigenspace
    if complement.shape[1] == 0:
        return []
    first, second = commutant_sample(), commutant_sample()
    values, vectors = np.linalg.eigh(complement.T @ first @ complement)
    tol = 1e-8 * max(1.0, np.max(np.abs(values)))
    clusters, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] - values[i - 1] > tol:
            clusters.append(complement @ vectors[:, start:i])
            start = i
    # Clusters the second sample couples belong to one component of multiplicity > 1.
    parent = list(range(len(clusters)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(clusters)):
        for j in range(i + 1, len(clusters)):
            if np.linalg.norm(clusters[i].T @ second @ clusters[j]) > tol:
                parent[root(j)] = root(i)
    out = []
    for r in sorted({root(i) for i in range(len(clusters))}):
        members = [clusters[i] for i in range(len(clusters)) if root(i) == r]
        u = np.concatenate(members, axis=1)
        block = u.T @ second @ u
        scalar = len(members) == 1 and np.allclose(block, block[0, 0] * np.eye(len(block)),
                                                   atol=tol)
        out.append((u, bool(scalar)))
    return out


def _reproduces_orthogonal_average(model, augmentation: Augmentation, key_seed: int = 0) -> bool:
    """Whether augmenting by the group gives the same MSE moments as augmenting by all of
    O(d), for random data (then the augmented loss is invariant under every rotation)."""
    import jax

    from .._data.dataset import Dataset
    from .._data.objective import Moments

    group = augmentation.group
    if isinstance(group, OrthogonalGroup):
        return True
    d = group.dim
    degrees = model.feature_degrees
    max_axes = 2 * max(degrees) + (1 if augmentation.equivariant else 0)
    if _brauer_supported(max_axes, d):
        reference = OrthogonalGroup(d)  # exact, orthonormal basis of the invariants
    elif d == 2 and not augmentation.equivariant:
        # Beyond the exact projection's memory limit: SO(2) and O(2) agree on the (fully
        # symmetric) moment tensors of vector inputs with invariant targets, and C_N with
        # N > max_axes averages trigonometric polynomials of degree < N exactly.
        reference = PlanarRotations(max_axes + 1)
    else:
        return False
    key = jax.random.PRNGKey(key_seed)
    x_shape = (3, d) if hasattr(model, "query") else (d,)
    x = jax.random.normal(key, (8, *x_shape))
    y = jax.vmap(model)(x)
    y = y + jax.random.normal(jax.random.fold_in(key, 1), y.shape)
    base = Moments.from_data(model, Dataset(x, y))
    mine = augmentation.symmetrize(base, model)
    exact = Augmentation(reference, augmentation.equivariant).symmetrize(base, model)
    scale = float(jnp.linalg.norm(exact.M)) + float(jnp.linalg.norm(exact.B))
    error = float(jnp.linalg.norm(mine.M - exact.M)) + float(jnp.linalg.norm(mine.B - exact.B))
    return error <= 1e-10 * scale


def augmentation_laws(model, augment) -> tuple[AbstractLaw, ...]:
    """The conservation laws that MSE + augmentation by `augment` adds to `model`'s own.

    - One square linear layer with S_n acting on inputs and targets (`equivariant=True`): the
      directions of R = WΠ⊥ − sΠ⊥ and r = Π⊥W𝟙 (n² − 4 laws).
    - Linear nets (invariant targets): rowspace(W₁U_λ) for every non-trivial isotypic component
      of multiplicity one with d_λ > h (h = rows of W₁), h(d_λ − h) laws each; for one scalar
      output and C₃ shifts also the paper's ratio I(W).
    - Polynomial nets / neurons: rowspace(W₁) when the group reproduces the O(d) average of
      the moments (e.g. C₁₈ for Fig. 1's sextic neuron, icosahedral for quadratic nets) and
      h < d.
    - Lightning Attention: range([Q K V]) under O(d) (or an exact design of it), k < d.

    Returns `()` when no law is derived (e.g. non-design groups, equivariant targets of linear
    nets); use the law counter for a definite answer there. Monte-Carlo O(d) gives the laws
    of exact O(d), which then hold only to the Monte-Carlo defect.
    """
    from .._models.attention import LightningAttention
    from .._models.linear import DeepLinear
    from .._models.polynomial import Neuron, PolynomialNet

    augmentation = as_augmentation(augment)
    if augmentation is None:
        return ()
    model = model[0] if hasattr(model, "models") else model
    group = augmentation.group.exact()
    if isinstance(model, DeepLinear):
        if augmentation.equivariant:
            square = len(model.weights) == 1 and model.weights[0].shape[0] == group.dim
            if square and isinstance(group, Permutations) and group.dim >= 3:
                return (EquivariantResidualLaw(), EquivariantRowSumLaw())
            return ()
        h = model.weights[0].shape[0]
        if not isinstance(group, AbstractFiniteGroup):  # a user group with no commutant here
            return ()
        laws = []
        components = [u for u, single in isotypic_components(group) if single and u.shape[1] > h]
        for i, u in enumerate(components):
            laws.append(RowSpaceLaw(jnp.asarray(u), label=f"U{i}" if len(components) > 1 else "U"))
        single_row = h == 1 and len(model.weights) == 1
        if single_row and isinstance(group, CyclicShift) and group.dim == 3:
            laws.append(CyclicRatioLaw())
        return tuple(laws)
    if isinstance(model, PolynomialNet | Neuron):
        h = _first_layer(model).shape[0]
        if h < group.dim and _reproduces_orthogonal_average(
                model, Augmentation(group, augmentation.equivariant)):
            return (RowSpaceLaw(None),)
        return ()
    if isinstance(model, LightningAttention):
        k = AttentionRangeLaw().block(model).shape[1]
        if k < group.dim and _reproduces_orthogonal_average(
                model, Augmentation(group, augmentation.equivariant)):
            return (AttentionRangeLaw(),)
        return ()
    return ()
