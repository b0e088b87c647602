"""Groups acting orthogonally on data, and their averages over tensor representations.

A group G ⊂ O(d) acts on an input by rotating its last axis (a vector x ↦ g x; a token matrix
X ↦ X gᵀ, i.e. every token's feature vector by g). Tensorizable models have features built from
tensor powers x^{⊗k}, on which g acts as g^{⊗k}; `average` computes the group average
avg_g g^{⊗n} · T of a tensor with n such axes, which is what data augmentation does to the MSE
moments (seed paper, §2.4). Finite groups average over their elements; `OrthogonalGroup`
averages either over Haar samples (Monte Carlo, as in the paper's Fig. 3) or exactly, by
orthogonal projection onto the span of the Brauer (pairing) tensors.
"""

import abc
import functools
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float
from .._validation import ArgumentError, integer


class AbstractGroup(eqx.Module):
    """A compact group acting orthogonally on R^`dim`."""

    dim: eqx.AbstractVar[int]

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short label, e.g. `C3` or `O(8)`."""

    @abc.abstractmethod
    def average(self, tensor: Array, n_axes: int) -> Array:
        """avg_g (g ⊗ … ⊗ g) applied to the first `n_axes` axes of `tensor` (each of size
        `dim`); trailing axes are left alone."""

    def exact(self) -> "AbstractGroup":
        """The group whose average `average` approximates (itself, unless sampled)."""
        return self


class AbstractFiniteGroup(AbstractGroup):
    """A finite group, given by the list of its orthogonal matrices."""

    @abc.abstractmethod
    def matrices(self) -> Float[Array, "order d d"]:
        """All group elements (or, for a sampled group, the samples)."""

    @property
    def order(self) -> int:
        return self.matrices().shape[0]

    def average(self, tensor: Array, n_axes: int) -> Array:
        return _average_over(self.matrices(), jnp.asarray(tensor), n_axes)


@functools.partial(jax.jit, static_argnums=2)
def _average_over(matrices, tensor, n_axes):
    def act(g):
        out = tensor
        for axis in range(n_axes):
            # g acts on one axis: T_{..i..} ↦ Σ_j g_ij T_{..j..}
            out = jnp.moveaxis(jnp.tensordot(g, out, axes=([1], [axis])), 0, axis)
        return out

    def step(total, g):
        return total + act(g), None

    total, _ = jax.lax.scan(step, jnp.zeros_like(tensor), matrices)
    return total / matrices.shape[0]


def _permutation_matrices(perms) -> np.ndarray:
    perms = np.asarray(perms)
    n = perms.shape[1]
    eye = np.eye(n)
    return np.stack([eye[p] for p in perms])  # (g x)_i = x_{p(i)}


class CyclicShift(AbstractFiniteGroup):
    """C_n acting on R^n by cyclic coordinate shifts x ↦ (x_2, …, x_n, x_1)^k."""

    dim: int = eqx.field(static=True)

    def __init__(self, n: int):
        self.dim = _check_int("n", n, 2)

    @property
    def name(self) -> str:
        return f"C{self.dim}-shift"

    def matrices(self):
        return jnp.asarray(_permutation_matrices(
            [np.roll(np.arange(self.dim), -k) for k in range(self.dim)]))


class Permutations(AbstractFiniteGroup):
    """The symmetric group S_n permuting the coordinates of R^n (n! elements; n ≤ 8)."""

    dim: int = eqx.field(static=True)

    def __init__(self, n: int):
        self.dim = _check_int("n", n, 2)
        if n > 8:
            raise ArgumentError(f"`n` = {n}: S_n has n! elements; use n ≤ 8.")

    @property
    def name(self) -> str:
        return f"S{self.dim}"

    def matrices(self):
        return jnp.asarray(_permutation_matrices(list(itertools.permutations(range(self.dim)))))


class PlanarRotations(AbstractFiniteGroup):
    """C_n ⊂ SO(2): rotations of the plane by multiples of 2π/n."""

    n: int = eqx.field(static=True)
    dim: int = eqx.field(static=True, default=2)

    def __init__(self, n: int):
        self.n = _check_int("n", n, 1)
        self.dim = 2

    @property
    def name(self) -> str:
        return f"C{self.n}"

    def matrices(self):
        angle = 2.0 * np.pi * np.arange(self.n) / self.n
        c, s = np.cos(angle), np.sin(angle)
        return jnp.asarray(np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2))


class SignFlips(AbstractFiniteGroup):
    """(Z₂)^d: every combination of coordinate sign flips (2^d elements; d ≤ 12)."""

    dim: int = eqx.field(static=True)

    def __init__(self, d: int):
        self.dim = _check_int("d", d, 1)
        if d > 12:
            raise ArgumentError(f"`d` = {d}: (Z₂)^d has 2^d elements; use d ≤ 12.")

    @property
    def name(self) -> str:
        return f"Z2^{self.dim}"

    def matrices(self):
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=self.dim)))
        return jnp.asarray(np.einsum("gi,ij->gij", signs, np.eye(self.dim)))


def _closure(generators: np.ndarray) -> np.ndarray:
    """All products of the generators (a finite matrix group), deduplicated to 1e-8."""
    elements = [np.eye(generators.shape[-1])]
    keys = {tuple(np.round(elements[0], 8).ravel())}
    frontier = list(elements)
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                b = g @ a
                key = tuple(np.round(b, 8).ravel() + 0.0)
                if key not in keys:
                    keys.add(key)
                    new.append(b)
        elements += new
        frontier = new
    return np.stack(elements)


class Octahedral(AbstractFiniteGroup):
    """The rotation group of the cube, order 24, acting on R³ (not a 4-design of SO(3))."""

    dim: int = eqx.field(static=True, default=3)

    @property
    def name(self) -> str:
        return "O24"

    def matrices(self):
        quarter_turn = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
        cycle = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])
        return jnp.asarray(_closure(np.stack([quarter_turn, cycle])))


class Icosahedral(AbstractFiniteGroup):
    """The rotation group of the icosahedron, order 60, acting on R³ (reproduces SO(3)
    averages of all polynomials of degree ≤ 5)."""

    dim: int = eqx.field(static=True, default=3)

    @property
    def name(self) -> str:
        return "I60"

    def matrices(self):
        phi = (1.0 + np.sqrt(5.0)) / 2.0
        cycle = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])
        # Rotation by π about the axis (1, φ, 1/φ)/2 maps the icosahedron to itself.
        axis = np.array([1.0, phi, 1.0 / phi]) / 2.0
        half_turn = 2.0 * np.outer(axis, axis) - np.eye(3)
        flip = np.diag([1.0, -1.0, -1.0])
        return jnp.asarray(_closure(np.stack([cycle, half_turn, flip])))


class OrthogonalGroup(AbstractFiniteGroup):
    """O(d), averaged exactly (`samples=None`) or over Haar-random samples.

    Exact mode projects a tensor onto the O(d)-invariant tensors, spanned by the Brauer
    pairing tensors δ_{i_a i_b}⋯ (Frobenius-orthogonal projection = Haar average), through an
    orthonormal basis of that span built once in numpy (closed form for d = 2; otherwise an
    SVD of the pairing tensors, rank-checked against the known dimension): exact to a few
    ulps on any backend, cost independent of any orbit size. Supported: d = 2 up to 12 axes
    (degree-6 features), d ≥ 3 while (n − 1)!! · d^n ≤ 2^25 (e.g. 8 axes for d ≤ 4, 6 for
    d ≤ 8). Sampled mode draws `samples // 2` Haar
    matrices g (QR of a Gaussian with sign fix) and uses each with −g, as the seed paper's
    Fig. 3 does; its symmetry defect decays like samples^{-1/2}.
    """

    dim: int = eqx.field(static=True)
    samples: int | None = eqx.field(static=True, default=None)
    seed: int = eqx.field(static=True, default=0)

    def __init__(self, d: int, samples: int | None = None, seed: int = 0):
        self.dim = _check_int("d", d, 1)
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                    or samples < 2 or samples % 2):
            raise ArgumentError(f"`samples` must be None (exact) or an even int ≥ 2, got "
                                f"{samples!r}.")
        self.samples = samples
        self.seed = _check_int("seed", seed, 0)

    @property
    def name(self) -> str:
        return f"O({self.dim})" + ("" if self.samples is None else f"~{self.samples}")

    def exact(self) -> "OrthogonalGroup":
        return OrthogonalGroup(self.dim)

    def matrices(self):
        if self.samples is None:
            raise ValueError("exact O(d) has no finite list of elements (no finite orbits); "
                             "pass `samples=` for Monte-Carlo augmentation, or use the exact "
                             "moment symmetrisation (MSE).")
        z = jax.random.normal(jax.random.PRNGKey(self.seed), (self.samples // 2, self.dim,
                                                                self.dim))
        q, r = jnp.linalg.qr(z)
        q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]  # Haar, not just O(d)
        return jnp.concatenate([q, -q])

    def average(self, tensor, n_axes):
        if self.samples is not None:
            return super().average(tensor, n_axes)
        return _brauer_projection(jnp.asarray(tensor), n_axes, self.dim)


_MAX_BASIS_ENTRIES = 2**25  # 256 MiB of float64 for the dense pairing tensors (d ≥ 3)
_MAX_PLANAR_ENTRIES = 2**21  # d = 2: 12 axes (4096 × 462); 14 would be a 225 MB constant


def _pairings(items: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
    if not items:
        return [()]
    first, rest = items[0], items[1:]
    out = []
    for i, partner in enumerate(rest):
        for tail in _pairings(rest[:i] + rest[i + 1:]):
            out.append(((first, partner),) + tail)
    return out


def _double_factorial(n: int) -> int:
    return 1 if n <= 1 else n * _double_factorial(n - 2)


def _partitions(n: int, largest: int | None = None):
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for first in range(min(n, largest), 0, -1):
        for rest in _partitions(n - first, first):
            yield (first,) + rest


def _invariant_dimension(n_axes: int, d: int) -> int:
    """dim of the O(d)-invariant tensors with `n_axes` axes: Σ f^{2μ} over partitions μ of
    n/2 with at most d parts (f^λ = number of standard Young tableaux, hook length formula);
    (n − 1)!! when d ≥ n/2, where the Brauer pairing tensors are independent."""
    if n_axes % 2:
        return 0
    total = 0
    for mu in _partitions(n_axes // 2):
        if len(mu) > d:
            continue
        shape = [2 * part for part in mu]
        hooks = 1
        for i, row in enumerate(shape):
            for j in range(row):
                below = sum(1 for r in shape[i + 1:] if r > j)
                hooks *= row - j + below
        total += math.factorial(n_axes) // hooks
    return total


def _pairing_tensors(pairings, d: int) -> np.ndarray:
    """The Brauer tensors δ_{i_a i_b}⋯ of `pairings`, as rows of a (P, d^n) 0/1 matrix."""
    eye = np.eye(d)
    rows = []
    for pairing in pairings:
        basis = functools.reduce(np.multiply.outer, [eye] * len(pairing))
        built = [axis for pair in pairing for axis in pair]  # axis order of `basis`
        rows.append(np.transpose(basis, np.argsort(built)).ravel())
    return np.stack(rows)


def _planar_basis(n_axes: int) -> np.ndarray:
    """Integer rows S (r × 2^n) with 2^{(1−n)/2} S an orthonormal basis of the O(2)
    invariants: √2 Re(u_s) for the balanced sign strings s = (+, …) of u_± = (e₁ ± i e₂)/√2.

    u_s = ⊗_k u_{s_k} is SO(2)-invariant iff s has as many + as −; the reflection
    diag(1, −1) maps u_s to ū_s = u_{−s}, so u_s + u_{−s} = 2 Re(u_s) are the O(2)
    invariants, and the u_s are orthonormal (Hermitian). Entry a ∈ {0, 1}^n of
    2^{n/2} u_s is Π_k (i s_k)^{a_k}, whose real part is [|a| even] (−1)^{|a|/2} Π_{a_k=1} s_k.
    """
    signs = [s for s in itertools.product((1, -1), repeat=n_axes - 1)
             if sum(s) == -1]  # s_0 = +1 fixes one of the pair {s, −s}; balanced overall
    minus = np.array([[0] + [int(v < 0) for v in s] for s in signs], dtype=np.int64)
    a = np.array(list(itertools.product((0, 1), repeat=n_axes)), dtype=np.int64)
    weight = a.sum(axis=1)
    flips = (minus @ a.T) % 2
    rows = np.where(weight % 2 == 0, (-1.0) ** (weight // 2), 0.0) * (1.0 - 2.0 * flips)
    return rows


def _brauer_supported(n_axes: int, d: int) -> bool:
    """Whether exact O(d) averaging of tensors with `n_axes` axes is within the memory limit."""
    if n_axes % 2 or n_axes == 0 or d == 1:
        return True
    if d == 2:
        return _invariant_dimension(n_axes, 2) * 2**n_axes <= _MAX_PLANAR_ENTRIES
    return _double_factorial(n_axes - 1) * d**n_axes <= _MAX_BASIS_ENTRIES


@functools.lru_cache(maxsize=16)
def _brauer_basis(n_axes: int, d: int, order: tuple[int, ...] | None = None
                  ) -> tuple[np.ndarray, float]:
    """(S, s) with √s S (r × d^n) an orthonormal basis of the O(d)-invariant tensors with
    `n_axes` (even) axes, so that the Haar average is s Sᵀ(S t). Built once, in numpy float64.

    d = 2: the closed form of `_planar_basis` (integer entries, s = 2^{1−n}). Otherwise: the
    pairing tensors T mapped through the eigenvectors of their exact integer Gram matrix for
    its r = dim (known in closed form, `_invariant_dimension`) largest eigenvalues, then
    re-orthonormalised; the pairings are dependent when d < n/2, and an eigenvalue gap at r
    is required. `order` permutes the pairings
    (tests: the result must not depend on it).
    """
    rank = _invariant_dimension(n_axes, d)
    size = d**n_axes
    if d == 2:
        if not _brauer_supported(n_axes, d):
            raise ValueError(f"exact O(2) averaging of a tensor with {n_axes} axes needs a "
                             f"{size} × {rank} basis of its invariants; use at most 12 axes "
                             "(degree ≤ 6 features) or `OrthogonalGroup(2, samples=...)`.")
        return _planar_basis(n_axes), 2.0 ** (1 - n_axes)
    if not _brauer_supported(n_axes, d):
        raise ValueError(f"exact O({d}) averaging of a tensor with {n_axes} axes needs "
                         f"{_double_factorial(n_axes - 1)} Brauer tensors of size {d}^{n_axes}; "
                         "use "
                         "`OrthogonalGroup(d, samples=...)` (Monte Carlo) or fewer axes.")
    pairings = _pairings(tuple(range(n_axes)))
    if order is not None:
        pairings = [pairings[i] for i in order]
    tensors = _pairing_tensors(pairings, d)
    # The 0/1 pairing tensors have an exact integer Gram matrix (entries d^{#loops}); its
    # eigenvectors for the r = dim largest eigenvalues span the invariants' coordinates, and
    # Tᵀ V Λ^{-1/2} is then an orthonormal basis, re-orthonormalised once by QR.
    gram = tensors @ tensors.T
    lam, vectors = np.linalg.eigh(gram)
    lam, vectors = lam[::-1], vectors[:, ::-1]
    nxt = lam[rank] if rank < len(lam) else 0.0
    if not (lam[rank - 1] > 1e-6 * lam[0] and abs(nxt) < 1e-10 * lam[0]):
        raise RuntimeError(f"exact O({d}) on {n_axes} axes: no clean eigenvalue gap at the "
                           f"invariant dimension {rank} (λ = {lam[rank - 1]:.3e}, {nxt:.3e}); "
                           "please report this.")
    basis = (vectors[:, :rank] / np.sqrt(lam[:rank])).T @ tensors
    # One more orthonormalisation: the basis is already orthonormal to ~1e-14, so its Gram
    # matrix C ≈ I is perfectly conditioned and C^{-1/2} B is orthonormal to round-off
    # (a second CholeskyQR pass, cheaper than a Householder QR of a tall matrix).
    c_lam, c_vec = np.linalg.eigh(basis @ basis.T)
    basis = (c_vec / np.sqrt(c_lam)) @ c_vec.T @ basis
    return basis, 1.0


def _brauer_projection(tensor, n_axes, d):
    if n_axes % 2:
        return jnp.zeros_like(tensor)  # −I ∈ O(d) kills odd tensors
    if n_axes == 0 or d == 1:
        return tensor  # O(1) = {±1} fixes every even tensor
    basis, scale = _brauer_basis(n_axes, d)
    basis = jnp.asarray(basis, tensor.dtype)
    flat = tensor.reshape(d**n_axes, -1)
    # Orthogonal projection onto the invariants with an orthonormal basis √s S: s Sᵀ(S t).
    # Every step is a well-conditioned product: the result is exact to a few ulps on any
    # backend and whatever its summation order.
    return (scale * (basis.T @ (basis @ flat))).reshape(tensor.shape)


def _check_int(name: str, value, minimum: int) -> int:
    return integer(name, value, minimum=minimum)


GROUPS = {
    "cyclic_shift": CyclicShift,
    "permutations": Permutations,
    "rotations": PlanarRotations,
    "sign_flips": SignFlips,
    "octahedral": Octahedral,
    "icosahedral": Icosahedral,
    "orthogonal": OrthogonalGroup,
}
