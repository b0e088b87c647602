"""Find a network's translation, scale and rescale symmetries numerically (Kunin et al. 2021).

For any `equinox.Module`, candidate parameter sets are drawn from its pytree structure: every
weight leaf W (≥ 2 axes, output axis first) with the bias leaf it pairs with (`.weight`/`.bias`,
`weights[i]`/`biases[i]`, `w1`/`b1`, or the next leaf of the same parent). The three families
of "Neural Mechanics" and the gradient identity each one implies for every data batch:

- **translation** L(θ + α 1_A) = L(θ) ⇔ ⟨g, 1_A⟩ = 0; candidates: each column of [W b] of a
  matrix layer (e.g. the layer before a softmax);
- **scale** L(α θ_A) = L(θ) ⇔ ⟨g_A, θ_A⟩ = 0; candidates: each output unit (row of W and its
  bias; a normalised channel) and each whole layer (a layer-wide normalisation);
- **rescale** L(α θ_A1, α⁻¹ θ_A2) = L(θ) ⇔ ⟨g_A1, θ_A1⟩ − ⟨g_A2, θ_A2⟩ = 0; candidates: each
  hidden unit j of a layer (row j of W_l, b_l[j]) against what it feeds in the next weight
  leaf: input column/channel j, or — after a flatten — a contiguous block (channel-major) or a
  strided set (channel-last) of columns; both layouts are tried, the data decide.

Each identity is evaluated at several random parameter points on several data batches,
relative to |g_A||θ_A| (|g_A|√|A| for translation); a candidate is accepted when it is below
`tol` at every point where its gradient does not vanish (at least two such points). The laws
are Q = ⟨1_A, θ⟩ (translation) and Q = Σ_A1 θ² − Σ_A2 θ² (scale: A2 = ∅), i.e.
`AbstractMechanicsLaw`s, so the monitors and `track_mechanics` use them unchanged.
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
from .._data.objective import Objective
from .._models.base import Ensemble
from .._models.mlp import AbstractMechanicsLaw
from .._text import text_table
from .._validation import ArgumentError, fail, integer, model_parameters, number, prng_key
from .base import law_mismatch


class AbstractMaskLaw(AbstractMechanicsLaw):
    """A law given by a sparse coefficient mask over the flattened parameters (static index
    tuples, so laws hash by value and a run with the same laws reuses its compiled program)."""

    label: eqx.AbstractVar[str]
    size: eqx.AbstractVar[int]
    rows: eqx.AbstractVar[tuple[int, ...]]
    cols: eqx.AbstractVar[tuple[int, ...]]
    signs: eqx.AbstractVar[tuple[float, ...]]
    components: eqx.AbstractVar[int]

    @property
    def name(self) -> str:
        return self.label

    def check(self, model) -> None:
        # Shapes and dtypes only (the leaves may be abstract, as in `check_laws`).
        size = sum(math.prod(x.shape) for x in jtu.tree_leaves(model)
                   if isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)
                   and jnp.issubdtype(x.dtype, jnp.inexact))
        if size != self.size:
            raise law_mismatch(self, model, f"it was found for {self.size} parameters but the "
                                            f"model has {size}",
                               "find the laws again for this architecture (find_symmetries)")

    def mask(self, model) -> Float[Array, "c D"]:
        self.check(model)
        mask = np.zeros((self.components, self.size))
        mask[np.asarray(self.rows, int), np.asarray(self.cols, int)] = self.signs
        return jnp.asarray(mask)


class LinearMaskLaw(AbstractMaskLaw):
    """Q_c = ⟨m_c, θ⟩ (a translation law: m_c the indicator of a translated set)."""

    label: str = eqx.field(static=True)
    size: int = eqx.field(static=True)
    rows: tuple[int, ...] = eqx.field(static=True)
    cols: tuple[int, ...] = eqx.field(static=True)
    signs: tuple[float, ...] = eqx.field(static=True)
    components: int = eqx.field(static=True)
    quadratic = False


class QuadraticMaskLaw(AbstractMaskLaw):
    """Q_c = Σ m_c θ² (a scale law: m_c = +1 on the set; rescale: +1 on A1, −1 on A2)."""

    label: str = eqx.field(static=True)
    size: int = eqx.field(static=True)
    rows: tuple[int, ...] = eqx.field(static=True)
    cols: tuple[int, ...] = eqx.field(static=True)
    signs: tuple[float, ...] = eqx.field(static=True)
    components: int = eqx.field(static=True)
    quadratic = True


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One tested parameter set: `family`, `layer` (pytree path of the weight leaf), `unit`
    (column / unit index, `bias`, `all`, with the flatten layout for rescale), `size` |A|,
    the worst relative `residual` of its gradient identity over the `informative` points
    (NaN when the gradient on the set vanished everywhere), and the verdict."""

    family: str
    layer: str
    unit: str
    size: int
    residual: float
    informative: int
    accepted: bool
    reason: str
    plus: tuple[int, ...] = dataclasses.field(repr=False, default=())
    minus: tuple[int, ...] = dataclasses.field(repr=False, default=())


@dataclasses.dataclass(frozen=True)
class SymmetrySearch:
    """Result of `find_symmetries`.

    - `laws`: the accepted symmetries' laws (one `LinearMaskLaw`/`QuadraticMaskLaw` per family
      and layer, one component per unit), ready for `gradient_flow`, `train` and
      `track_mechanics`.
    - `candidates`: every tested set with its evidence; `accepted`, `rejected` filter them.
    - `independent`: rank of the laws' gradients at the model's parameters (= number of
      independent laws found).
    - `count`: `count_laws`'s Lie-algebra count for this model and loss (small models), or None.
    - `points`, `tol`: how many parameter points × batches were probed, and the threshold.
    - `generators`: with `find_symmetries(..., generators=True)`, the `GeneratorSearch` of
      `find_generators` on the same model, loss and data (the Lie algebra of linear
      symmetries, found without templates, and its quadratic laws); else None.
    """

    laws: tuple[AbstractMaskLaw, ...]
    candidates: tuple[Candidate, ...]
    independent: int
    parameters: int
    count: object | None
    points: int
    tol: float
    generators: object | None = None

    @property
    def accepted(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.accepted)

    @property
    def rejected(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.accepted)

    @property
    def n_laws(self) -> int:
        """Number of law components (e.g. one per hidden neuron for rescale)."""
        return sum(law.components for law in self.laws)

    @property
    def complete(self) -> bool | None:
        """Whether the found laws are all the laws `count_laws` counts (None: not counted)."""
        return None if self.count is None else self.count.laws == self.independent

    def describe(self, full: bool = False) -> str:
        """A table per family and layer: candidates tested / accepted, the worst residual of
        the accepted and the smallest of the rejected ones (`full=True`: every candidate)."""
        rows = [("family", "layer", "tested", "accepted", "worst accepted", "best rejected",
                 "why rejected")]
        if full:
            rows = [("family", "layer", "unit", "|A|", "residual", "points", "verdict")]
            for c in self.candidates:
                rows.append((c.family, c.layer, c.unit, str(c.size), _fmt(c.residual),
                             str(c.informative), "accepted" if c.accepted else c.reason))
        else:
            groups = {}
            for c in self.candidates:
                variant = c.unit.split(" ")[-1] if c.unit.endswith(")") else ""
                groups.setdefault((c.family, c.layer + (" " + variant if variant else "")),
                                  []).append(c)
            for (family, layer), cs in groups.items():
                acc = [c.residual for c in cs if c.accepted]
                rej = [c for c in cs if not c.accepted]
                reasons = sorted({c.reason.split(":")[0] for c in rej})
                rows.append((family, layer, str(len(cs)), str(len(acc)),
                             _fmt(max(acc)) if acc else "-",
                             _fmt(min((c.residual for c in rej), default=math.nan))
                             if rej else "-", ", ".join(reasons) or "-"))
        lines = [text_table(rows), "",
                 f"{self.n_laws} law components ({self.independent} independent) over "
                 f"{self.parameters} parameters, probed at {self.points} (point, batch) pairs, "
                 f"tol {self.tol:g}."]
        if self.count is not None:
            verdict = ("complete" if self.complete else
                       f"{self.count.laws - self.independent} law(s) outside the three "
                       "families (or a degenerate point)")
            lines.append(f"count_laws: {self.count.laws} independent laws (rank gap "
                         f"{self.count.gap:.2g}) -> {verdict}.")
        if self.generators is not None:
            lines += ["", "Generators (find_generators):", self.generators.describe()]
        return "\n".join(lines)


def _fmt(x):
    return "nan" if not np.isfinite(x) else f"{x:.1e}"


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str
    weight: int  # leaf index
    bias: int | None


def _layers(paths, shapes) -> list[_Layer]:
    """Weight leaves (≥ 2 axes) in pytree order, each with its bias leaf when one pairs up."""
    names = [jtu.keystr(p) for p in paths]
    used, layers = set(), []
    for i, shape in enumerate(shapes):
        if len(shape) < 2 or i in used:  # vectors, and biases already paired (Conv2d's
            continue                      # bias has shape (out, 1, 1))
        out = shape[0]

        def is_bias(j):
            s = shapes[j]
            return (j not in used and j != i and len(s) >= 1 and s[0] == out
                    and all(d == 1 for d in s[1:]) and (len(s) == 1 or len(s) < len(shape)))

        bias = None
        for a, b in (("weights", "biases"), ("weight", "bias"), ("W", "b"), ("w", "b")):
            at = names[i].rfind(a)
            if at < 0:
                continue
            target = names[i][:at] + b + names[i][at + len(a):]
            match = [j for j, n in enumerate(names) if n == target and is_bias(j)]
            if match:
                bias = match[0]
                break
        if bias is None and i + 1 < len(shapes) and is_bias(i + 1) and \
                paths[i + 1][:-1] == paths[i][:-1]:
            bias = i + 1
        if bias is not None:
            used.add(bias)
        name = names[i].lstrip(".")
        for suffix in (".weight", "['weight']", "['w']", "['W']"):
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        layers.append(_Layer(name, i, bias))
    return layers


def _candidates(params) -> list[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(family, layer, unit, A1 flat indices, A2 flat indices) for every candidate set."""
    leaves_with_paths = jtu.tree_flatten_with_path(params)[0]
    paths = [p for p, _ in leaves_with_paths]
    shapes = [tuple(leaf.shape) for _, leaf in leaves_with_paths]
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
    index = [offsets[i] + np.arange(math.prod(s)).reshape(s) for i, s in enumerate(shapes)]
    layers = _layers(paths, shapes)
    empty = np.zeros(0, int)
    out = []
    for k, layer in enumerate(layers):
        w = index[layer.weight]
        b = None if layer.bias is None else index[layer.bias].reshape(-1)
        n_out = w.shape[0]
        # translation: columns of [W b] of a matrix layer
        if w.ndim == 2:
            for j in range(w.shape[1]):
                out.append(("translation", layer.name, str(j), w[:, j], empty))
            if b is not None:
                out.append(("translation", layer.name, "bias", b, empty))
        # scale: each output unit (row + bias entry), and the whole layer
        for j in range(n_out):
            row = w[j].reshape(-1)
            if b is not None:
                row = np.concatenate([row, b[j:j + 1]])
            out.append(("scale", layer.name, str(j), row, empty))
        whole = w.reshape(-1) if b is None else np.concatenate([w.reshape(-1), b])
        out.append(("scale", layer.name, "all", whole, empty))
        # rescale: hidden unit j against what it feeds in the next weight leaf
        if k + 1 < len(layers):
            nxt = index[layers[k + 1].weight]
            n_in = nxt.shape[1]
            layouts = []
            if n_in == n_out:
                layouts.append(("", lambda j: nxt[:, j].reshape(-1)))
            elif nxt.ndim == 2 and n_in % n_out == 0:
                per = n_in // n_out
                layouts.append((" (block)", lambda j: nxt[:, j * per:(j + 1) * per].reshape(-1)))
                layouts.append((" (strided)", lambda j: nxt[:, j::n_out].reshape(-1)))
            for label, feeds in layouts:
                for j in range(n_out):
                    row = w[j].reshape(-1)
                    if b is not None:
                        row = np.concatenate([row, b[j:j + 1]])
                    out.append(("rescale", layer.name, str(j) + label, row, feeds(j)))
    return out


def find_symmetries(
    model,
    loss: AbstractLoss,
    data: Dataset | tuple,
    *,
    key: Key | None = None,
    points: int = 4,
    max_points: int = 16,
    batch_size: int = 64,
    tol: float = 1e-10,
    count: bool | None = None,
    count_max_parameters: int = 32,
    generators: bool = False,
) -> SymmetrySearch:
    """Probe `model` (any `equinox.Module`) for translation, scale and rescale symmetries of
    `loss` on `data`, and return their conservation laws.

    **Arguments:**

    - `model`: a model or `Ensemble` (its first member is probed).
    - `loss`: e.g. `conservation.CrossEntropy()` (a softmax head adds translation symmetry).
    - `data`: a `conservation.Dataset` or an `(x, y)` pair; random batches of it are used.
    - `key`: PRNG key for the parameter points and batches.
    - `points`: parameter points probed per round: the model's own and `points − 1` random
      ones (each leaf perturbed by Gaussian noise of the leaf's RMS), each on its own batch.
    - `max_points`: further rounds of random points are drawn, up to this many points in
      all, while some candidate's gradient vanished at all but one point (dead ReLU units);
      a candidate never tested at 2 points is rejected as degenerate.
    - `batch_size`: samples per batch.
    - `tol`: accept a candidate when its relative residual is ≤ `tol` at every point.
    - `count`: cross-check with `count_laws` (Lie-algebra rank); None: when the model has at
      most `count_max_parameters` parameters.
    - `generators`: also search without templates: `find_generators` (the Lie algebra of
      linear symmetries θ ↦ Aθ, e.g. the GL(k) of attention's query/key pair) on random
      subsets of `data`, reported in `.generators`.

    **Returns:** a `SymmetrySearch` (`.laws`, `.accepted`, `.rejected`, `.describe()`).
    """
    if isinstance(model, Ensemble):
        model = model[0]
    if not isinstance(model, eqx.Module):
        raise ArgumentError(f"`model` must be an `equinox.Module` (wrap a function as "
                            f"`conservation.FunctionModel(fn, params)`), got "
                            f"{type(model).__name__}.")
    model = model_parameters(model)
    if not jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array)):
        raise ArgumentError(f"`model` ({type(model).__name__}) has no floating-point "
                            "parameters: there are no symmetries of parameters to find.")
    if not isinstance(loss, AbstractLoss):
        raise ArgumentError(f"`loss` must be a conservation loss such as `CrossEntropy()`, got "
                            f"{loss!r}.")
    if isinstance(data, tuple):
        if len(data) != 2:
            raise fail("data", data, "must be a `conservation.Dataset` or an (x, y) pair")
        data = Dataset(*data)
    if not isinstance(data, Dataset):
        raise ArgumentError(f"`data` must be a `conservation.Dataset` or an (x, y) pair, got "
                            f"{type(data).__name__}.")
    check_model_data(model, data, loss)
    prng_key("key", key, optional=True)
    points = integer("points", points, minimum=2,
                     fix="a law is confirmed at several points")
    max_points = integer("max_points", max_points, minimum=1)
    batch_size = integer("batch_size", batch_size, minimum=1,
                         fix="the number of samples per probed batch")
    number("tol", tol, "(0,1)", fix="a relative residual threshold such as 1e-10")
    if count is not None and not isinstance(count, bool):
        raise fail("count", count, "must be True, False or None")
    count_max_parameters = integer("count_max_parameters", count_max_parameters, minimum=0)
    if not isinstance(generators, bool):
        raise fail("generators", generators, "must be True or False")
    key = jax.random.PRNGKey(0) if key is None else key
    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta0, unravel = jfu.ravel_pytree(params)
    dim = theta0.size
    k_points, k_count = jax.random.split(key)

    raw = _candidates(params)
    ids = np.concatenate([np.full(len(a) + len(m), c) for c, (*_, a, m) in enumerate(raw)])
    flat = np.concatenate([np.concatenate([a, m]) for *_, a, m in raw]).astype(int)
    sign = np.concatenate([np.concatenate([np.ones(len(a)), -np.ones(len(m))])
                           for *_, a, m in raw])
    linear = np.array([f == "translation" for f, *_ in raw])
    n_cand = len(raw)
    size_a = np.bincount(ids, None, n_cand)

    # Random points: each leaf perturbed by noise of its own RMS (generic, same scales), each
    # on its own random batch. Where a set's gradient vanished (a ReLU unit dead on the batch)
    # the identity says nothing, so more rounds of points are drawn (up to `max_points`)
    # until every candidate was tested at ≥ 2 points.
    rms = jtu.tree_map(lambda a: jnp.full(a.shape, jnp.sqrt(jnp.mean(a**2)) + 1e-3), params)
    rms = jfu.ravel_pytree(rms)[0]
    n = len(data)
    size = min(batch_size, n)
    gradients = _gradients(static, unravel, loss)  # one compiled program for every round
    residual = np.zeros((0, n_cand))
    for round_ in range(-(-max(max_points, points) // points)):
        k_noise, k_batch = jax.random.split(jax.random.fold_in(k_points, round_))
        noise = jax.random.normal(k_noise, (points, dim)).at[0].multiply(round_ > 0)
        thetas = theta0[None] + rms[None] * noise  # the model's own point first
        index = jnp.stack([jax.random.choice(k, n, (size,), replace=False)
                           for k in jax.random.split(k_batch, points)])
        grads = np.asarray(gradients(thetas, data.x[index], data.y[index]))
        thetas = np.asarray(thetas)
        block = np.full((points, n_cand), np.nan)
        for p in range(points):
            g, th = grads[p], thetas[p]
            gn = np.sqrt(np.bincount(ids, g[flat] ** 2, n_cand))
            tn = np.sqrt(np.bincount(ids, th[flat] ** 2, n_cand))
            informative = (gn > 1e-9 * np.linalg.norm(g)) & (linear | (tn > 0))
            with np.errstate(invalid="ignore", divide="ignore"):
                lin = np.abs(np.bincount(ids, g[flat], n_cand)) / (gn * np.sqrt(size_a))
                quad = np.abs(np.bincount(ids, sign * g[flat] * th[flat], n_cand)) / (gn * tn)
                block[p] = np.where(informative, np.where(linear, lin, quad), np.nan)
        residual = np.concatenate([residual, block])
        tested = np.sum(np.isfinite(residual), axis=0)
        failed = np.nanmax(np.where(np.isfinite(residual), residual, -np.inf), axis=0) > tol
        if np.all((tested >= 2) | failed):
            break
    probed = residual.shape[0]

    candidates = []
    for c, (family, layer, unit, a, m) in enumerate(raw):
        r = residual[:, c]
        k = int(np.sum(np.isfinite(r)))
        worst = float(np.nanmax(r)) if k else math.nan
        if k < 2:
            ok, reason = False, "degenerate: zero gradient on the set at all but ≤ 1 points"
        elif worst > tol:
            ok, reason = False, f"residual: {worst:.1e} > tol"
        else:
            ok, reason = True, ""
        candidates.append(Candidate(family, layer, unit, len(a) + len(m), worst, k, ok, reason,
                                    tuple(int(i) for i in a), tuple(int(i) for i in m)))
    candidates = _prune(candidates)
    laws = _laws(candidates, dim)
    independent = _rank(laws, np.asarray(theta0))
    counted = None
    if count or (count is None and dim <= count_max_parameters):
        from .counting import count_laws

        # Rank D − independent proves the found laws complete (the count cannot be lower
        # than the number of true laws found), so the bracket search may stop there.
        counted = count_laws(model, loss, input_shape=tuple(data.x.shape[1:]), key=k_count,
                             target_rank=dim - independent)
    found = None
    if generators:
        from .generators import find_generators

        found = find_generators(model, loss, data, key=jax.random.fold_in(key, 1),
                                count=False)
    return SymmetrySearch(laws, tuple(candidates), independent, dim, counted, probed, tol,
                          found)


def _gradients(static, unravel, loss):
    """(θ_p, batch_p)_p ↦ ∇L_p(θ_p), vmapped and compiled."""
    def one(theta, x, y):
        objective = Objective(loss, Dataset(x, y))
        return jax.grad(lambda t: objective(eqx.combine(unravel(t), static)))(theta)

    return jax.jit(jax.vmap(one))


def _prune(candidates):
    """A whole-layer scale law that is the sum of accepted per-unit ones is not independent:
    mark it rejected as implied (keeps the law set free of exact redundancy)."""
    per_unit = {}
    for c in candidates:
        if c.family == "scale" and c.unit != "all":
            per_unit.setdefault(c.layer, []).append(c.accepted)
    out = []
    for c in candidates:
        if c.family == "scale" and c.unit == "all" and c.accepted and all(per_unit[c.layer]):
            c = dataclasses.replace(c, accepted=False,
                                    reason="implied: the sum of the accepted per-unit laws")
        out.append(c)
    return out


def _laws(candidates, dim) -> tuple[AbstractMaskLaw, ...]:
    groups = {}
    for c in candidates:
        if c.accepted:
            layout = c.unit.split(" ")[-1] if c.unit.endswith(")") else ""
            label = f"{c.family}[{c.layer}]" + (":all" if c.unit == "all" else "")
            groups.setdefault((label, layout), []).append(c)
    labels = [label for label, _ in groups]
    laws = []
    for (label, layout), cs in groups.items():
        if labels.count(label) > 1:  # two flatten layouts both passed: keep them apart
            label = f"{label}{layout}"
        rows, cols, signs = [], [], []
        for r, c in enumerate(cs):
            rows += [r] * (len(c.plus) + len(c.minus))
            cols += list(c.plus) + list(c.minus)
            signs += [1.0] * len(c.plus) + [-1.0] * len(c.minus)
        cls = LinearMaskLaw if cs[0].family == "translation" else QuadraticMaskLaw
        laws.append(cls(label, dim, tuple(rows), tuple(cols), tuple(signs), len(cs)))
    return tuple(laws)


def _rank(laws, theta) -> int:
    """Number of independent law gradients at θ (m for linear, 2 m θ for quadratic laws)."""
    if not laws:
        return 0
    rows = []
    for law in laws:
        m = np.zeros((law.components, law.size))
        m[np.asarray(law.rows, int), np.asarray(law.cols, int)] = law.signs
        rows.append(2 * m * theta[None] if law.quadratic else m)
    s = np.linalg.svd(np.concatenate(rows), compute_uv=False)
    return int(np.sum(s > 1e-9 * s[0]))
