"""Symmetry discovery from the generators: the Lie algebra of a loss's linear infinitesimal
symmetries, found as the null space of sampled gradients, and the laws it gives.

A linear map A of the flat parameters θ ∈ R^D is an infinitesimal symmetry of a class of
losses when L_Z(e^{tA}θ) = L_Z(θ) to first order at every θ, for every data set Z of the
class:

    ⟨∇L_Z(θ), Aθ⟩ = 0   for all θ and Z.

These A form a Lie algebra 𝔤 (the condition is linear in A, and closed under brackets). A
general A has D² entries, so the search is restricted to a structure: a block per
(leaf, axis), a matrix X ∈ gl(n) acting on that axis of that leaf,

- a leaf with 0 or 1 axes: X acts on its n entries;
- a matrix W (out, in): X acts on the rows (W ↦ XW) and another on the columns (W ↦ WXᵀ);
- a leaf with ≥ 3 axes (heads, d, r): one X on axis 0, and for each axis a ≥ 1 one X per
  index of axis 0 (per head / per stacked layer).

The coupled actions of a pair of leaves — GL(k) acting on consecutive linear layers
(W₁ ↦ AW₁, W₂ ↦ W₂A⁻¹, generator X on the rows of W₁ and −Xᵀ on the columns of W₂) or on a
query/key pair (Q ↦ QA, K ↦ KA⁻ᵀ) — are linear combinations of these blocks, so the null
space finds them, with their orientation (rows or columns), without being told. The
condition is linear in the block coefficients: a sampled (θ_s, Z_s) gives the row
[⟨G_s, X ·ₐ W_s⟩] = the cross-Gram G_(a) W_(a)ᵀ of the gradient and parameter unfoldings;
the algebra is the null space of the stacked rows (SVD, relative threshold `tol`), minus the
coefficient combinations that act as zero (the identity on the rows and on the columns of
one matrix are the same map: detected per leaf and removed before the SVD).

**Which generators give which laws (gradient flow θ' = −∇L_Z).** For M symmetric,
Q_M(θ) = ½⟨θ, Mθ⟩ has dQ_M/dt = −⟨Mθ, ∇L_Z⟩, so Q_M is conserved for every Z iff M ∈ 𝔤:
the quadratic laws are exactly 𝔤 ∩ Sym(D), and that is what is computed (on symmetric block
coefficients, since Aᵀ acts blockwise by Xᵀ). Taking the symmetric part of a generator is
not enough: a shear A = E₁₂ of a loss that does not depend on θ₁ is a symmetry, while its
symmetric part gives θ₁θ₂, which is not conserved. Antisymmetric generators (𝔤 ∩ Skew:
rotations, e.g. Q ↦ QR, K ↦ KR for R orthogonal) give nothing for gradient flow
(θᵀAθ ≡ 0, and the Noether charge ⟨θ', Aθ⟩ = −⟨∇L, Aθ⟩ ≡ 0); in phase space, for the
Hamiltonian flow θ' = p, p' = −∇L, their charge ⟨p, Aθ⟩ is conserved
(d/dt = ⟨p, Ap⟩ − ⟨∇L, Aθ⟩ = 0 + 0), and it decays as e^{−γt} with heavy-ball friction γ.
Generators that are neither, and whose symmetric part is not in 𝔤, give no quadratic law.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._custom_types import Array, Float, Key
from .._data.dataset import Dataset, check_model_data
from .._data.losses import AbstractLoss
from .._text import text_table
from .._validation import ArgumentError, fail, integer, number
from .base import AbstractLaw, law_mismatch
from .counting import _rref

_SCALES = (0.1, 1.0, 10.0)


@dataclasses.dataclass(frozen=True)
class _Block:
    """gl(n) acting on `axis` of leaf `leaf` (`batched`: one matrix per index of axis 0)."""

    leaf: int
    axis: int
    batched: bool
    n: int
    slices: int

    @property
    def size(self) -> int:
        return self.slices * self.n * self.n


def _blocks(shapes) -> list[_Block]:
    out = []
    for i, shape in enumerate(shapes):
        if len(shape) <= 1:
            out.append(_Block(i, 0, False, max(math.prod(shape), 1), 1))
        elif len(shape) == 2:
            out += [_Block(i, 0, False, shape[0], 1), _Block(i, 1, False, shape[1], 1)]
        else:
            out.append(_Block(i, 0, False, shape[0], 1))
            out += [_Block(i, a, True, shape[a], shape[0]) for a in range(1, len(shape))]
    return out


def _unfold(block, x, shape, xp=np):
    """x (..., *shape) → (..., slices, n, rest): the acted-on axis second to last but one."""
    lead = x.shape[:x.ndim - len(shape)]
    if len(shape) == 0:
        return x.reshape(*lead, 1, 1, 1)
    k = len(lead)
    y = xp.moveaxis(x, k + block.axis, k + (1 if block.batched else 0))
    return y.reshape(*lead, block.slices, block.n, -1)


def _fold(block, u, shape):
    """The inverse of `_unfold`."""
    lead = u.shape[:-3]
    if len(shape) == 0:
        return u.reshape(lead)
    pos = 1 if block.batched else 0
    moved = list(shape)
    moved.insert(pos, moved.pop(block.axis))
    return np.moveaxis(u.reshape(*lead, *moved), len(lead) + pos, len(lead) + block.axis)


def _transforms(blocks):
    """Coordinate maps from symmetric / antisymmetric block coefficients to gl coordinates
    (X_pq = X_qp = c for the symmetric basis E_pq + E_qp, p ≤ q; E_pq − E_qp for p < q), and
    each coordinate's block index."""
    sym, skew, owner_sym, owner_skew = [], [], [], []
    offset = 0
    n_total = sum(b.size for b in blocks)
    for j, b in enumerate(blocks):
        for t in range(b.slices):
            base = offset + t * b.n * b.n
            for p in range(b.n):
                for q in range(p, b.n):
                    col = np.zeros(n_total)
                    col[base + p * b.n + q] = 1.0
                    col[base + q * b.n + p] = 1.0
                    sym.append(col)
                    owner_sym.append(j)
                    if q > p:
                        col = np.zeros(n_total)
                        col[base + p * b.n + q], col[base + q * b.n + p] = 1.0, -1.0
                        skew.append(col)
                        owner_skew.append(j)
        offset += b.size
    as_matrix = lambda cols: np.stack(cols, 1) if cols else np.zeros((n_total, 0))  # noqa
    return as_matrix(sym), as_matrix(skew), np.array(owner_sym, int), np.array(owner_skew, int)


def _cross_grams(blocks, shapes, g_leaves, w_leaves) -> np.ndarray:
    """Rows [⟨G_s, E_pq ·ₐ W_s⟩] over every block coefficient: (S, n_coefficients)."""
    out = []
    for b in blocks:
        ug = _unfold(b, g_leaves[b.leaf], shapes[b.leaf])
        uw = _unfold(b, w_leaves[b.leaf], shapes[b.leaf])
        out.append(np.einsum("stpr,stqr->stpq", ug, uw).reshape(ug.shape[0], -1))
    return np.concatenate(out, axis=1)


def _images(blocks, shapes, coefficients, w_leaves) -> list[np.ndarray]:
    """A θ per leaf for each coefficient row (c, n_coefficients) at one point: [(c, D_l)]."""
    c = coefficients.shape[0]
    out = [np.zeros((c, math.prod(s))) for s in shapes]
    offset = 0
    for b in blocks:
        x = coefficients[:, offset:offset + b.size].reshape(c, b.slices, b.n, b.n)
        uw = _unfold(b, w_leaves[b.leaf], shapes[b.leaf])
        image = _fold(b, np.einsum("ctpq,tqr->ctpr", x, uw), shapes[b.leaf])
        out[b.leaf] += image.reshape(c, math.prod(shapes[b.leaf]))
        offset += b.size
    return out


def _independent(columns, rtol=1e-9):
    """Indices of the columns that are not combinations of earlier ones (unpivoted QR: |R_jj|
    is the part of column j orthogonal to the columns before it)."""
    if columns.shape[1] == 0:
        return np.zeros(0, int)
    norms = np.linalg.norm(columns, axis=0)
    r = np.linalg.qr(columns / np.where(norms > 0, norms, 1.0), mode="r")
    diag = np.abs(np.diag(r)) if r.shape[0] >= r.shape[1] else np.abs(
        np.concatenate([np.diag(r), np.zeros(r.shape[1] - r.shape[0])]))
    return np.flatnonzero((diag > rtol) & (norms > 0))


@dataclasses.dataclass(frozen=True)
class GeneratorNullSpace:
    """One null-space decision of `find_generators`: `dimension` of the null space among
    `coordinates` independent block coefficients, the normalised `singular_values`
    (descending, σ₁ = 1), `kept` (the largest σ counted as zero: the worst kept direction),
    `rejected` (the smallest σ counted as non-zero), `gap` = rejected / kept, the worst
    held-out relative residual |⟨∇L, Aθ⟩| / (|∇L| |Aθ|) of the kept generators (`residual`)
    and the median one of the best rejected direction (`rejected_residual`)."""

    dimension: int
    coordinates: int
    singular_values: np.ndarray = dataclasses.field(repr=False)
    kept: float
    rejected: float
    gap: float
    residual: float
    rejected_residual: float


class GeneratorLaw(AbstractLaw):
    """Quadratic laws Q_c(θ) = ½⟨θ, A_c θ⟩ of symmetric generators A_c found by
    `find_generators`: Q_c = ½ Σ_blocks ⟨X_c, W_(a) W_(a)ᵀ⟩, X_c the block's coefficient
    matrix and W_(a) the unfolding of the leaf along the acted-on axis (a Gram matrix, so
    the laws of consecutive linear layers are the entries of W₁W₁ᵀ − W₂ᵀW₂).

    Static fields only (sparse coefficients), so laws hash by value and a rerun reuses its
    compiled program; `check` refuses a model whose parameter leaves have other shapes."""

    label: str = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    blocks: tuple[tuple[int, int, bool, int, int], ...] = eqx.field(static=True)
    rows: tuple[int, ...] = eqx.field(static=True)
    cols: tuple[int, ...] = eqx.field(static=True)
    values: tuple[float, ...] = eqx.field(static=True)
    components: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return self.label

    def check(self, model) -> None:
        shapes = tuple(tuple(x.shape) for x in jtu.tree_leaves(model)
                       if isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)
                       and jnp.issubdtype(x.dtype, jnp.inexact))
        if shapes != self.shapes:
            raise law_mismatch(self, model, f"it was found for parameter leaves of shapes "
                                            f"{self.shapes} but the model's are {shapes}",
                               "find the laws again for this architecture (find_generators)")

    def _grams(self, model):
        self.check(model)
        leaves = jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        grams = []
        for spec in self.blocks:
            b = _Block(*spec)
            u = _unfold(b, leaves[b.leaf], self.shapes[b.leaf], xp=jnp)
            grams.append(jnp.einsum("tpr,tqr->tpq", u, u).reshape(-1))
        return grams

    def _matrix(self, n_coefficients):
        c = np.zeros((self.components, n_coefficients))
        c[np.asarray(self.rows, int), np.asarray(self.cols, int)] = self.values
        return c

    def __call__(self, model) -> Float[Array, " c"]:
        grams = jnp.concatenate(self._grams(model))
        return 0.5 * jnp.asarray(self._matrix(grams.size)) @ grams

    def scale(self, model) -> Float[Array, " c"]:
        # ½ Σ_blocks ‖X_c‖ ‖W_(a)W_(a)ᵀ‖ bounds each term of Q_c (Cauchy–Schwarz): never 0
        # at a balanced point, unlike |Q_c|.
        grams = self._grams(model)
        sizes = np.cumsum([0] + [g.size for g in grams])
        c = self._matrix(int(sizes[-1]))
        norms = np.stack([np.linalg.norm(c[:, a:b], axis=1)
                          for a, b in zip(sizes[:-1], sizes[1:])], 1)
        return 0.5 * jnp.asarray(norms) @ jnp.stack([jnp.linalg.norm(g) for g in grams])


@dataclasses.dataclass(frozen=True)
class GeneratorSearch:
    """Result of `find_generators`.

    - `dimension`: dim 𝔤 of the Lie algebra of linear symmetries found (in the block
      structure); `generators`: a basis, (dimension, n_coefficients) block coefficients in
      reduced row-echelon form (`blocks` names the coordinates' blocks).
    - `symmetric`: dim 𝔤 ∩ Sym, the number of quadratic laws; `laws`: them, as one
      `GeneratorLaw` (one component each; empty when there are none), ready for
      `gradient_flow(..., laws=...)` and the monitors.
    - `antisymmetric`: dim 𝔤 ∩ Skew (rotations: no law for gradient flow; a Noether charge
      ⟨p, Aθ⟩ of Hamiltonian flows).
    - `independent`: rank of the laws' gradients at the model's θ (the number of independent
      laws there), comparable with `count_laws`; `count`: `count_laws`'s result, or None.
    - `algebra`, `laws_space`, `skew`: the `GeneratorNullSpace` evidence of each decision.
    - `parameters`: D; `points`: (θ, data set) pairs in the fit (plus `held_out` fresh ones
      for the residuals); `tol`.
    - `supports`: per generator, the parameter leaves it moves (where Aθ ≠ 0 at a generic
      θ: a property of the map A, not of the chosen coordinates).
    """

    dimension: int
    symmetric: int
    antisymmetric: int
    generators: np.ndarray = dataclasses.field(repr=False)
    blocks: tuple[str, ...]
    laws: tuple[GeneratorLaw, ...]
    independent: int
    algebra: GeneratorNullSpace
    laws_space: GeneratorNullSpace
    skew: GeneratorNullSpace
    count: object | None
    parameters: int
    points: int
    held_out: int
    tol: float
    supports: tuple[str, ...] = ()

    @property
    def complete(self) -> bool | None:
        """Whether `count_laws` counts no law beyond these quadratic ones (None: not run)."""
        return None if self.count is None else self.count.laws == self.independent

    def describe(self) -> str:
        """The three null-space decisions with their evidence, and the generators grouped
        by the blocks they act on."""
        rows = [("space", "dimension", "of", "kept σ", "rejected σ", "gap", "residual",
                 "rejected residual")]
        for name, ns in (("algebra 𝔤", self.algebra), ("𝔤 ∩ Sym (laws)", self.laws_space),
                         ("𝔤 ∩ Skew", self.skew)):
            rows.append((name, str(ns.dimension), str(ns.coordinates), _fmt(ns.kept),
                         _fmt(ns.rejected), _fmt(ns.gap), _fmt(ns.residual),
                         _fmt(ns.rejected_residual)))
        groups = {}
        for s in self.supports:
            groups[s] = groups.get(s, 0) + 1
        lines = [text_table(rows), ""]
        lines += [f"{k} generator(s) moving {s}" for s, k in groups.items()]
        lines.append(f"{self.dimension} generators ({self.symmetric} symmetric: quadratic laws, "
                     f"{self.independent} independent at θ; {self.antisymmetric} "
                     f"antisymmetric: none for gradient flow) over {self.parameters} "
                     f"parameters, from {self.points} (θ, data set) pairs, residuals on "
                     f"{self.held_out} more; tol {self.tol:g}.")
        if self.count is not None:
            verdict = ("agrees" if self.complete else
                       f"{self.count.laws - self.independent} law(s) beyond the quadratic ones "
                       "of these blocks (linear, non-polynomial, or another structure)")
            lines.append(f"count_laws: {self.count.laws} independent laws (gap "
                         f"{self.count.gap:.2g}) -> {verdict}.")
        return "\n".join(lines)


def _fmt(x):
    return "-" if x is None or not np.isfinite(x) else f"{x:.1e}"


def _block_name(path, block, shape):
    name = jtu.keystr(path).lstrip(".") or "θ"
    if len(shape) == 2:
        return f"{name}·{'rows' if block.axis == 0 else 'cols'}"
    if len(shape) <= 1:
        return name
    return f"{name}·axis{block.axis}" + (" per axis0" if block.batched else "")


def find_generators(
    model,
    loss: AbstractLoss,
    data: Dataset | tuple | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    key: Key | None = None,
    points: int | None = None,
    held_out: int = 16,
    set_size: int = 4,
    scales: tuple[float, ...] = _SCALES,
    tol: float = 1e-8,
    max_coefficients: int = 2048,
    count: bool | None = None,
    count_max_parameters: int = 32,
) -> GeneratorSearch:
    """The Lie algebra of linear infinitesimal symmetries θ ↦ Aθ of `loss` for `model` (any
    `equinox.Module`), in the block structure of the module docstring, and its laws.

    **Arguments:**

    - `model`: a model or `Ensemble` (its first member is probed), at a generic point.
    - `loss`: e.g. `conservation.MSE()`.
    - `data`: the data class: None (Gaussian inputs at the `scales`, random targets), or a
      `Dataset` / `(x, y)` pair whose random subsets of `set_size` samples are the data sets.
    - `input_shape`: one input's shape when `data` is None (inferred for conservation's
      vector and token models).
    - `key`: PRNG key for the parameter points and data sets.
    - `points`: (θ, data set) pairs in the fit (default: the number of independent block
      coefficients + 16; fewer are raised to that); `held_out`: fresh pairs for residuals.
      Each θ is the model's own (the first) or it plus Gaussian noise of each leaf's RMS.
    - `tol`: a singular value ≤ `tol`·σ₁ of the row- and column-normalised system is zero.
    - `max_coefficients`: refuse a structure with more block coefficients (Σ n² per block).
    - `count`: cross-check with `count_laws`; None: when D ≤ `count_max_parameters`.

    **Returns:** a `GeneratorSearch` (`.dimension`, `.symmetric`, `.laws`, `.describe()`).

    ```python
    found = cn.find_generators(cn.DeepLinear.random((2, 2, 2), key=key), cn.MSE())
    found.dimension, found.symmetric  # 4 (gl(2)), 3 (entries of W₀W₀ᵀ − W₁ᵀW₁)
    ```
    """
    from .counting import _check_model, _Sampler

    if isinstance(data, tuple):
        if len(data) != 2:
            raise fail("data", data, "must be None, a `conservation.Dataset` or an (x, y) pair")
        data = Dataset(*data)
    if data is not None and not isinstance(data, Dataset):
        raise ArgumentError(f"`data` must be None, a `conservation.Dataset` or an (x, y) pair, "
                            f"got {type(data).__name__}.")
    if isinstance(data, Dataset) and input_shape is None:
        input_shape = tuple(data.x.shape[1:])
    model, input_shape = _check_model(model, loss, input_shape, key, tol)
    if isinstance(data, Dataset):
        check_model_data(model, data, loss)
    if points is not None:
        points = integer("points", points, minimum=2)
    held_out = integer("held_out", held_out, minimum=1,
                       fix="the residuals are checked on fresh (θ, data set) pairs")
    set_size = integer("set_size", set_size, minimum=1)
    if isinstance(scales, str) or np.ndim(scales) != 1 or not len(scales):
        raise fail("scales", scales, "must be a non-empty tuple of input scales > 0")
    for s_ in scales:
        number("scales", s_, ">0", fix="every scale is a finite number > 0")
    max_coefficients = integer("max_coefficients", max_coefficients, minimum=1)
    if count is not None and not isinstance(count, bool):
        raise fail("count", count, "must be True, False or None")
    count_max_parameters = integer("count_max_parameters", count_max_parameters, minimum=0)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta0, unravel = jfu.ravel_pytree(params)
    leaves_paths = jtu.tree_flatten_with_path(params)[0]
    shapes = [tuple(leaf.shape) for _, leaf in leaves_paths]
    blocks = _blocks(shapes)
    names = tuple(_block_name(p, b, shapes[b.leaf])
                  for b in blocks for p in [leaves_paths[b.leaf][0]])
    n_coef = sum(b.size for b in blocks)
    if n_coef > max_coefficients:
        worst = max(blocks, key=lambda b: b.size)
        raise ArgumentError(
            f"the block structure of {type(model).__name__} has {n_coef} coefficients "
            f"(largest block: {names[blocks.index(worst)]}, {worst.size}), more than "
            f"`max_coefficients` = {max_coefficients}; probe a smaller model of the same "
            "architecture (the algebra's structure does not depend on the widths beyond the "
            "shared ones) or raise `max_coefficients`.")
    dim = theta0.size
    key = jax.random.PRNGKey(0) if key is None else key
    k_count, k_data = jax.random.split(key)
    # Host-side randomness (one seed from `key`): no device program per sample shape.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)).astype(np.uint32))
    sym_t, skew_t, owner_sym, owner_skew = _transforms(blocks)
    gl_t = np.eye(n_coef)
    owner_gl = np.repeat(np.arange(len(blocks)), [b.size for b in blocks])
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
    theta0 = np.asarray(theta0)

    # Parameter points: the model's own, then each leaf perturbed by noise of its own RMS.
    rms = np.concatenate([np.full(b - a, math.sqrt(np.mean(theta0[a:b] ** 2)) + 1e-3)
                          for a, b in zip(offsets[:-1], offsets[1:])])

    def draw(n, own_first):
        noise = rng.standard_normal((n, dim))
        if own_first:
            noise[0] = 0.0
        return theta0[None] + rms[None] * noise

    def split(flat):  # (S, D) → leaves (S, *shape), in ravel_pytree order
        return [flat[:, a:b].reshape(flat.shape[0], *s)
                for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]

    # Which coefficient combinations act as zero (e.g. the identity on the rows and on the
    # columns of one matrix): per leaf, their images Aθ at random probe points are
    # dependent. A map is zero iff it is zero at enough generic points: K_l coefficients of
    # a leaf of D_l entries need R·D_l ≥ K_l image rows (a bias of n entries: n points).
    per_leaf = np.bincount([b.leaf for b in blocks], [b.size for b in blocks], len(shapes))
    sizes = np.array([max(math.prod(s), 1) for s in shapes])
    probe = split(draw(int(max(4, np.max(-(-per_leaf // sizes)) + 2)), False))

    def reduce(transform, owner):
        keep, norms = [], np.zeros(transform.shape[1])
        for leaf in range(len(shapes)):
            cols = np.flatnonzero(np.isin(owner, [j for j, b in enumerate(blocks)
                                                  if b.leaf == leaf]))
            if not cols.size:
                continue
            images = np.concatenate([
                _images(blocks, shapes, transform[:, cols].T,
                        [w[r] for w in probe])[leaf] for r in range(probe[0].shape[0])], 1)
            norms[cols] = np.linalg.norm(images, axis=1) / math.sqrt(probe[0].shape[0])
            keep.append(cols[_independent(images.T)])
        # No leaf with a coefficient of this kind (all-scalar leaves have no skew part).
        return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int), norms

    keeps = {v: reduce(t, o) for v, t, o in (("gl", gl_t, owner_gl), ("sym", sym_t, owner_sym),
                                             ("skew", skew_t, owner_skew))}
    needed = len(keeps["gl"][0]) + 16
    n_points = needed if points is None else max(points, needed)

    from .discovery import _gradients

    gradients = _gradients(static, unravel, loss)
    sampler = _Sampler(model, loss, data, tuple(float(s) for s in scales), input_shape,
                       set_size, rng)
    # The fitted pairs and the held-out ones in one call (one compiled program).
    thetas = np.concatenate([draw(n_points, True), draw(held_out, False)])
    x, y = sampler(n_points + held_out)
    g = np.asarray(gradients(jnp.asarray(thetas), jnp.asarray(x), jnp.asarray(y)))
    m = _cross_grams(blocks, shapes, split(g), split(thetas))
    g_fit, m_fit = g[:n_points], m[:n_points]
    g_out, th_out, m_out = g[n_points:], thetas[n_points:], m[n_points:]
    g_norm = np.linalg.norm(g_fit, axis=1)
    live = g_norm > 0
    m_fit = m_fit[live] / g_norm[live, None]
    # Zero rows (no equation) keep the system at least square, so every direction gets a
    # singular value when pairs with a vanishing gradient were dropped.
    m_fit = np.concatenate([m_fit, np.zeros((max(0, n_coef - m_fit.shape[0]), n_coef))])

    def null_space(variant, transform):
        keep, norms = keeps[variant]
        basis = transform[:, keep] / norms[keep]  # columns: unit-size actions
        if basis.shape[1] == 0:
            return np.zeros((0, n_coef)), GeneratorNullSpace(0, 0, np.zeros(0), math.nan, math.nan,
                                                     math.nan, math.nan, math.nan)
        # At least as many rows as coordinates (`needed`): all right singular vectors.
        _, s, vt = np.linalg.svd(m_fit @ basis, full_matrices=False)
        s = s / s[0] if s[0] > 0 else s
        rank = int(np.sum(s > tol))
        null = vt[rank:]
        kept = float(s[rank]) if rank < s.size else math.nan
        rejected = float(s[rank - 1]) if rank > 0 else math.nan
        coefficients = np.zeros((0, n_coef))
        if null.shape[0]:
            # Canonical basis: reduced row echelon form in the natural coordinates.
            natural = _rref(null * (1 / norms[keep])[None], tol=1e-9)
            coefficients = natural @ transform[:, keep].T
        residual = _residual(blocks, shapes, coefficients, g_out, th_out, m_out, split)
        rejected_residual = math.nan
        if rank > 0:
            best = (vt[rank - 1] @ basis.T)[None]
            rejected_residual = float(np.nanmedian(_residual(
                blocks, shapes, best, g_out, th_out, m_out, split, reduce_=None)))
        gap = rejected / kept if rank and null.shape[0] and kept > 0 else math.inf
        return coefficients, GeneratorNullSpace(null.shape[0], basis.shape[1], s, kept, rejected,
                                       gap, residual, rejected_residual)

    generators, algebra = null_space("gl", gl_t)
    symmetric, laws_space = null_space("sym", sym_t)
    _, skew = null_space("skew", skew_t)

    laws = ()
    independent = 0
    if symmetric.shape[0]:
        r, c = np.nonzero(symmetric)
        spec = tuple((b.leaf, b.axis, b.batched, b.n, b.slices) for b in blocks)
        laws = (GeneratorLaw("generator_laws", tuple(shapes), spec, tuple(int(i) for i in r),
                             tuple(int(j) for j in c), tuple(float(v) for v in symmetric[r, c]),
                             symmetric.shape[0]),)
        # ∇Q_c(θ₀) = A_c θ₀: their rank is the number of laws independent at θ₀.
        grads = np.concatenate(_images(blocks, shapes, symmetric,
                                       [np.asarray(w) for w in jtu.tree_leaves(params)]), 1)
        sv = np.linalg.svd(grads, compute_uv=False)
        independent = int(np.sum(sv > 1e-9 * sv[0])) if sv.size and sv[0] > 0 else 0
    counted = None
    if count or (count is None and dim <= count_max_parameters):
        from .counting import count_laws

        counted = count_laws(model, loss, input_shape=input_shape, key=k_count,
                             data=data, target_rank=dim - independent)
    return GeneratorSearch(
        algebra.dimension, laws_space.dimension, skew.dimension, generators, names, laws,
        independent, algebra, laws_space, skew, counted, dim, int(np.sum(live)), held_out,
        tol, _supports(blocks, shapes, generators, probe, leaves_paths))


def _supports(blocks, shapes, generators, probe, leaves_paths):
    names = [jtu.keystr(p).lstrip(".") or "θ" for p, _ in leaves_paths]
    if generators.shape[0] == 0:
        return ()
    images = _images(blocks, shapes, generators, [w[0] for w in probe])
    norms = np.stack([np.linalg.norm(i, axis=1) for i in images], 1)  # (generators, leaves)
    return tuple(" + ".join(n for n, v in zip(names, row) if v > 1e-9 * row.max())
                 for row in norms)


def _residual(blocks, shapes, coefficients, g, thetas, m, split, reduce_=np.max):
    """Relative residuals |⟨∇L_s, Aθ_s⟩| / (|∇L_s| |Aθ_s|) of coefficient rows on held-out
    pairs: their worst (`reduce_`), or all of them (`reduce_=None`)."""
    if coefficients.shape[0] == 0:
        return math.nan
    leaves = split(thetas)
    out = []
    for s in range(thetas.shape[0]):
        image = np.concatenate(_images(blocks, shapes, coefficients,
                                       [w[s] for w in leaves]), 1)
        scale = np.linalg.norm(image, axis=1) * np.linalg.norm(g[s])
        ok = scale > 0
        out.append(np.where(ok, np.abs(m[s] @ coefficients.T) / np.where(ok, scale, 1.0),
                            np.nan))
    out = np.concatenate(out)
    return out if reduce_ is None else float(np.nanmax(out)) if np.any(np.isfinite(out)) \
        else math.nan
