"""The flow families whose conservation laws `count_laws` counts, as vector fields.

Each data set Z gives a loss L_Z; a flow family turns its gradient g = ∇L_Z(θ) into a vector
field F_Z on a state space, and a law is a function conserved by F_Z for every Z of the class:
locally their number is (state dimension) − dim Lie{F_Z}(y) (Marcotte, Gribonval & Peyré,
NeurIPS 2023 and ICML 2024).

- first order, state θ (dimension D): gradient flow F = −g; preconditioned −P g with a
  constant positive per-leaf learning rate P; mirror −(∇²ψ(θ))⁻¹ g for a strictly convex
  potential ψ (entropy: −θ ⊙ g, the multiplicative updates of NMF); sign −sign(g).
- second order, phase space (s, θ, v) of dimension 2D + 1, with a time coordinate because
  their laws depend on time ("Keep the momentum", ICML 2024, §3.1): heavy ball
  θ̈ + τθ̇ = −g with s = e^{τt} (ṡ = τs; s = t, ṡ = 1, when τ = 0), its entropy-mirror form
  θ̈ + τθ̇ = −(τθ + θ̇) ⊙ g on the mirror coordinates (the paper's NMF/ICNN momentum), and
  Nesterov's θ̈ + (r/t)θ̇ = −g with s = t (r = 3).

The sign field is locally constant where no component of g vanishes (its brackets vanish
there): its Lie algebra is the span of the sign vectors sign(∇L_Z(θ)) over data sets, the
definition of "Transformative or conservative?" (arXiv 2506.06194, §2.3) for sign-GD.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np

from .._validation import ArgumentError, choice, fail, number

FLOWS = ("gradient", "preconditioned", "mirror", "sign", "momentum", "nesterov")


class AbstractFlow(eqx.Module):
    """A family of training flows, one vector field per data set, whose laws `count_laws`
    counts (`flow=` takes one of these, or its name for the default parameters)."""

    kind = "gradient"
    second_order = False

    def state_dimension(self, parameters: int) -> int:
        """The dimension of the space the laws live on: D, or 2D + 1 for (s, θ, v)."""
        return 2 * parameters + 1 if self.second_order else parameters

    def describe(self) -> str:
        """The flow's equation, as text."""
        return "dθ/dt = −∇L"

    @abc.abstractmethod
    def _resolve(self, model, theta) -> "_Field":
        """The field on the flat state, for `model` at θ (leaf filters resolved to masks)."""


class GradientFlow(AbstractFlow):
    """Euclidean gradient flow dθ/dt = −∇L_Z(θ) (the default of `count_laws`)."""

    def _resolve(self, model, theta):
        return _Field("gradient")


class PreconditionedFlow(AbstractFlow):
    """dθ/dt = −P ∇L_Z(θ) with a constant positive learning rate per parameter leaf
    (per-layer learning rates, "Get rich quick", Kunin et al. 2024).

    **Arguments:** `lr`: a pytree of positive numbers (or arrays broadcasting to the leaves)
    with the structure of the model's parameters, or a function `model -> that pytree`.
    A constant diagonal P is a linear change of coordinates: the count equals gradient
    flow's, the laws differ (e.g. η₂⁻¹W₂ᵀW₂ − η₁⁻¹W₁W₁ᵀ for a deep linear net).

    ```python
    # a two-layer DeepLinear with layer 1 at lr 1 and layer 2 at lr 0.25
    rates = lambda m: cn.DeepLinear([jnp.full_like(w, r) for w, r in zip(m.weights, (1, 0.25))])
    cn.count_laws(model, cn.MSE(), flow=cn.PreconditionedFlow(rates))
    ```
    """

    lr: object

    def describe(self):
        return "dθ/dt = −P∇L (constant per-leaf learning rates)"

    def _resolve(self, model, theta):
        params = eqx.filter(model, eqx.is_inexact_array)
        # A model is callable too: only a plain function is a rule `model -> pytree`.
        rule = callable(self.lr) and not isinstance(self.lr, eqx.Module)
        lr = self.lr(model) if rule else self.lr
        try:
            lr = jax.tree_util.tree_map(
                lambda p, r: jnp.broadcast_to(jnp.asarray(r, p.dtype), p.shape), params,
                eqx.filter(lr, eqx.is_array_like))
        except Exception as e:  # noqa: BLE001 — any mismatch is the caller's structure
            raise ArgumentError(
                "`PreconditionedFlow.lr` must have the structure of the model's parameters "
                f"(one positive number or array per leaf), e.g. the model with each leaf "
                f"replaced by its learning rate; got a mismatch ({type(e).__name__}: "
                f"{str(e)[:160]}).") from None
        flat = jfu.ravel_pytree(lr)[0]
        if flat.shape != theta.shape:
            raise ArgumentError(f"`PreconditionedFlow.lr` gives {flat.size} learning rates for "
                                f"{theta.size} parameters; give one per leaf.")
        number("lr", np.asarray(flat), ">0", array=True,
               fix="every learning rate is a finite number > 0")
        return _Field("preconditioned", lr=flat)


def _mirror_mask(model, theta, where, name):
    """1.0 on the flat coordinates of the leaves `where(model)` selects (all when None)."""
    params = eqx.filter(model, eqx.is_inexact_array)
    if where is None:
        return jnp.ones_like(theta)
    picked = where(model)
    picked = picked if isinstance(picked, tuple | list) else (picked,)
    ids = {id(x) for x in picked}
    marks = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, float(id(a) in ids)), params)
    mask = jfu.ravel_pytree(marks)[0]
    if not float(jnp.sum(mask)):
        raise ArgumentError(f"`{name}.where` selected no parameter leaf of the model; return "
                            "leaves of the model, e.g. where=lambda m: m.weights[1].")
    return mask


def _check_entropy(theta, mask, name):
    if bool(jnp.any((mask > 0) & (theta <= 0))):
        raise ArgumentError(
            f"`{name}` with the entropy potential needs positive parameters on its mirror "
            "coordinates (the flow lives on θ > 0): count at a positive point, e.g. "
            "jax.tree.map(jnp.abs, model).")


class MirrorFlow(AbstractFlow):
    """Mirror flow dθ/dt = −(∇²ψ(θ))⁻¹ ∇L_Z(θ).

    **Arguments:**

    - `potential`: `"entropy"` (ψ = Σ θ log θ on the selected leaves, ½‖θ‖² on the others:
      dθ/dt = −θ ⊙ ∇L there, the multiplicative updates of NMF; needs θ > 0 there), or a
      function `model -> scalar`, strictly convex in the parameters (its Hessian is inverted
      at every point).
    - `where`: for the entropy, a function `model -> leaf or tuple of leaves` selecting the
      mirror leaves (default: all); e.g. the outer layer of an input-convex net.
    """

    potential: object = eqx.field(static=True, default="entropy")
    where: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.potential):
            choice("potential", self.potential, ("entropy",))
        elif self.where is not None:
            raise ArgumentError("`MirrorFlow.where` selects the leaves of the entropy "
                                "potential; a user potential covers its own leaves "
                                "(pass where=None).")

    def describe(self):
        return "dθ/dt = −(∇²ψ)⁻¹∇L" + (" (entropy)" if self.potential == "entropy" else "")

    def _resolve(self, model, theta):
        if self.potential == "entropy":
            mask = _mirror_mask(model, theta, self.where, "MirrorFlow")
            _check_entropy(theta, mask, "MirrorFlow")
            return _Field("mirror", mask=mask)
        _, unravel = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
        static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
        potential = self.potential

        def psi(y):
            return potential(eqx.combine(unravel(y), static))

        value = jax.eval_shape(psi, theta)
        if value.shape != ():
            raise fail("potential", self.potential, "must return a scalar",
                       f"it returned shape {value.shape}")
        eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(psi)(theta)))
        if not eigenvalues[0] > 0:
            raise ArgumentError(
                "`MirrorFlow.potential` must be strictly convex at the model's point (its "
                f"Hessian's smallest eigenvalue is {eigenvalues[0]:.3g}); a mirror map needs a "
                "positive-definite Hessian.")
        return _Field("potential", potential=psi)


class SignFlow(AbstractFlow):
    """Sign gradient flow dθ/dt = −sign(∇L_Z(θ)) (sign-GD, simplified Adam). The field is
    locally constant off the zero set of ∇L_Z, so its Lie algebra at θ is the span of the
    sign vectors over data sets; it keeps no law except in degenerate cases (n = m = r = 1
    for UVᵀ, Marcotte et al., arXiv 2506.06194)."""

    def describe(self):
        return "dθ/dt = −sign(∇L)"

    def _resolve(self, model, theta):
        return _Field("sign")


class MomentumFlow(AbstractFlow):
    """The heavy-ball flow θ̈ + τθ̇ = −∇L_Z(θ), in the phase space (s, θ, v = θ̇) with
    s = e^{τt} (s = t when τ = 0): its laws h(s, θ, v) depend on time ("Keep the momentum",
    Marcotte, Gribonval & Peyré, ICML 2024). μθ̈ + θ̇ = −∇L is the same family (τ = 1/μ,
    time rescaled).

    **Arguments:**

    - `friction`: τ ≥ 0 (the paper's notebooks use τ = 0).
    - `potential`: None (Euclidean) or `"entropy"`: the paper's mirror momentum
      θ̈ + τθ̇ = −(τθ + θ̇) ⊙ ∇L on the selected coordinates (−∇L on the others), as for NMF
      and input-convex nets; `where` selects the mirror leaves (default all).
    """

    friction: float = 0.0
    potential: str | None = eqx.field(static=True, default=None)
    where: Callable | None = eqx.field(static=True, default=None)
    second_order = True
    kind = "momentum"

    def __check_init__(self):
        number("friction", self.friction, ">=0")
        if self.potential is not None:
            choice("potential", self.potential, ("entropy",))
        elif self.where is not None:
            raise ArgumentError("`MomentumFlow.where` selects the entropy's leaves; pass "
                                "potential='entropy' with it.")

    def describe(self):
        tail = "(τθ + θ̇) ⊙ ∇L (entropy mirror)" if self.potential else "∇L"
        return f"θ̈ + τθ̇ = −{tail}, τ = {float(self.friction):g}"

    def _resolve(self, model, theta):
        mask = None
        if self.potential == "entropy":
            mask = _mirror_mask(model, theta, self.where, "MomentumFlow")
            _check_entropy(theta, mask, "MomentumFlow")
        return _Field("momentum", friction=jnp.asarray(self.friction, theta.dtype), mask=mask,
                      exponential=float(self.friction) > 0)


class NesterovFlow(AbstractFlow):
    """Nesterov's flow θ̈ + (r/t)θ̇ = −∇L_Z(θ) (r = 3: Su, Boyd & Candès), in the phase space
    (t, θ, v) from a time `start` t > 0 where the counted point lies."""

    damping: float = 3.0
    start: float = 1.0
    second_order = True
    kind = "nesterov"

    def __check_init__(self):
        number("damping", self.damping, ">0")
        number("start", self.start, ">0", fix="Nesterov's flow starts at a time t₀ > 0")

    def describe(self):
        return f"θ̈ + (r/t)θ̇ = −∇L, r = {float(self.damping):g}"

    def _resolve(self, model, theta):
        return _Field("nesterov", friction=jnp.asarray(self.damping, theta.dtype))


_NAMED = {"gradient": GradientFlow, "preconditioned": None, "mirror": MirrorFlow,
          "sign": SignFlow, "momentum": MomentumFlow, "nesterov": NesterovFlow}


def as_flow(flow) -> AbstractFlow:
    """`flow` as an `AbstractFlow`: an instance, or a name for the default parameters."""
    if isinstance(flow, AbstractFlow):
        return flow
    if isinstance(flow, str) and flow == "preconditioned":
        raise ArgumentError("`flow='preconditioned'` needs learning rates: pass "
                            "flow=conservation.PreconditionedFlow(lr) with one lr per leaf.")
    if not isinstance(flow, str) or flow not in _NAMED:
        raise fail("flow", flow, f"must be one of {list(FLOWS)} or a flow such as "
                   "conservation.MomentumFlow(friction=1.0)")
    return _NAMED[flow]()


class _Field(eqx.Module):
    """A resolved flow: the field F(g, y) on the flat state y, given y ↦ g = ∇L_Z(θ(y)).
    Arrays (friction, masks, learning rates) are traced: new values reuse the program."""

    kind: str = eqx.field(static=True)
    friction: jax.Array | None = None
    mask: jax.Array | None = None
    lr: jax.Array | None = None
    potential: Callable | None = eqx.field(static=True, default=None)
    exponential: bool = eqx.field(static=True, default=False)

    def padded(self, keep: np.ndarray, size: int) -> "_Field":
        """The field of a padded embedding (`count_laws(pad_to=...)`): the per-parameter
        arrays (mirror mask, learning rates) placed at the real flat positions `keep` of
        `size` padded parameters. The padding's values do not matter: its gradient is
        masked to zero, so every field vanishes there."""
        if self.kind == "potential":
            raise ArgumentError("`pad_to` cannot embed a user mirror potential (it is a "
                                "function of the real model); pass `pad_to=None`.")
        mask = None if self.mask is None else jnp.zeros(size).at[keep].set(self.mask)
        lr = None if self.lr is None else jnp.ones(size).at[keep].set(self.lr)
        return eqx.tree_at(lambda f: (f.mask, f.lr), self, (mask, lr),
                           is_leaf=lambda x: x is None)

    def __call__(self, gradient, y):
        if self.kind in ("momentum", "nesterov"):
            dim = (y.shape[0] - 1) // 2
            s, theta, v = y[0], y[1:1 + dim], y[1 + dim:]
            g = gradient(theta)
            tau = self.friction
            if self.kind == "nesterov":  # s = t
                return jnp.concatenate([jnp.ones((1,), y.dtype), v, -(tau / s) * v - g])
            if self.mask is not None:  # the notebooks' mirror momentum: diag(τθ + θ̇) g
                g = (self.mask * (tau * theta + v) + (1 - self.mask)) * g
            ds = tau * s if self.exponential else jnp.ones((), y.dtype)
            return jnp.concatenate([ds[None], v, -tau * v - g])
        g = gradient(y)
        if self.kind == "gradient":
            return -g
        if self.kind == "preconditioned":
            return -self.lr * g
        if self.kind == "mirror":
            return -(self.mask * y + (1 - self.mask)) * g
        if self.kind == "sign":
            return -jnp.sign(g)
        if self.kind == "potential":
            return -jnp.linalg.solve(jax.hessian(self.potential)(y), g)
        raise AssertionError(self.kind)


def phase_point(flow: AbstractFlow, theta: np.ndarray, key) -> np.ndarray:
    """The state at which a flow's laws are counted: θ, or (s₀, θ, v₀) with a generic
    Gaussian velocity at θ's scale and s₀ = 1 (e^{τ·0}), 0 (t = 0 when τ = 0) or `start`."""
    if not flow.second_order:
        return np.asarray(theta)
    theta = np.asarray(theta)
    scale = float(np.sqrt(np.mean(theta**2))) or 1.0
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    v = scale * rng.standard_normal(theta.shape)
    if isinstance(flow, NesterovFlow):
        s = float(flow.start)
    else:
        s = 1.0 if float(flow.friction) > 0 else 0.0
    return np.concatenate([[s], theta, v])


def known_law_gradients(flow: AbstractFlow, model, y: np.ndarray,
                        coordinates: np.ndarray) -> np.ndarray:
    """Gradients at the state y of laws every field of `flow` conserves, for flows other than
    gradient flow (whose known laws are the model's `laws()`): rows of shape (·, state dim).

    - weights that get no gradient from any data set (`coordinates`, flat indices): one law
      each for first-order fields that act coordinate-wise (θ_w), two for second-order ones
      (s·v_w and θ_w + v_w/τ; v_w and θ_w − t·v_w at τ = 0; t^r·v_w and θ_w + t·v_w/(r − 1)
      for Nesterov, θ_w − t ln t·v_w at r = 1);
    - for a `DeepLinear` under a Euclidean momentum or Nesterov flow, the angular momenta
      c(s)·⟨v, ξ_A(θ)⟩ of the orthogonal symmetry W_l ↦ RW_l, W_{l+1} ↦ W_{l+1}Rᵀ of each
      hidden layer (A antisymmetric; ξ_A is then an antisymmetric linear map and ⟨∇L, ξ_A⟩ = 0,
      so d/dt⟨v, ξ_A⟩ = −τ⟨v, ξ_A⟩): c = s (= e^{τt}), 1 when τ = 0, t^r for Nesterov;
    - for a `DeepLinear` under the entropy mirror flow on every weight (NMF), one law per
      hidden neuron k: Σ_i W_{l+1}[i, k] − Σ_j W_l[k, j].
    """
    from .._models.linear import DeepLinear

    y = np.asarray(y, dtype=float)
    n = y.size
    rows = []
    if not flow.second_order:
        if isinstance(flow, MirrorFlow) and callable(flow.potential):
            return np.zeros((0, n))  # (∇²ψ)⁻¹ mixes coordinates: a frozen gradient is not enough
        rows = list(np.eye(n)[np.asarray(coordinates, int)])
        if isinstance(flow, MirrorFlow) and flow.where is None and isinstance(model, DeepLinear):
            # Entropy on every weight: the diagonal rescaling W_l ↦ DW_l, W_{l+1} ↦ W_{l+1}D⁻¹
            # has generator ξ = θ ⊙ ∇h for h = Σ_i W_{l+1}[i, k] − Σ_j W_l[k, j] (NMF's laws).
            offsets = np.concatenate([[0], np.cumsum([w.size for w in model.weights])])
            for l in range(len(model.weights) - 1):
                width = model.weights[l].shape[0]
                for k in range(width):
                    row = np.zeros(n)
                    inner = np.zeros(model.weights[l].shape)
                    inner[k, :] = -1.0
                    outer = np.zeros(model.weights[l + 1].shape)
                    outer[:, k] = 1.0
                    row[offsets[l]:offsets[l + 1]] = inner.ravel()
                    row[offsets[l + 1]:offsets[l + 2]] = outer.ravel()
                    rows.append(row)
        return np.array(rows).reshape(-1, n)
    dim = (n - 1) // 2
    s, v = y[0], y[1 + dim:]
    nesterov = isinstance(flow, NesterovFlow)
    tau = float(flow.damping if nesterov else flow.friction)
    for w in np.asarray(coordinates, int):
        e_theta, e_v = np.zeros(n), np.zeros(n)
        e_theta[1 + w], e_v[1 + dim + w] = 1.0, 1.0
        if nesterov:  # t^r v_w and θ_w + t v_w / (r − 1); θ_w − t ln t · v_w at r = 1
            first = s**tau * e_v
            first[0] = tau * s ** (tau - 1) * v[w]
            if tau != 1:
                second = e_theta + s / (tau - 1) * e_v
                second[0] = v[w] / (tau - 1)
            else:
                second = e_theta - s * np.log(s) * e_v
                second[0] = -(np.log(s) + 1.0) * v[w]
        elif tau > 0:  # s v_w and θ_w + v_w / τ
            first = s * e_v
            first[0] = v[w]
            second = e_theta + e_v / tau
        else:  # v_w and θ_w − t v_w
            first = e_v
            second = e_theta - s * e_v
            second[0] = -v[w]
        rows += [first, second]
    if isinstance(model, DeepLinear) and getattr(flow, "potential", None) is None:
        shapes = [w.shape for w in model.weights]
        sizes = [a * b for a, b in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        theta = y[1:1 + dim]
        mats = [theta[offsets[l]:offsets[l + 1]].reshape(shapes[l]) for l in range(len(shapes))]
        vels = [v[offsets[l]:offsets[l + 1]].reshape(shapes[l]) for l in range(len(shapes))]
        c, dc = ((s**tau, tau * s ** (tau - 1)) if nesterov else
                 ((s, 1.0) if tau > 0 else (1.0, 0.0)))

        def xi(a, ms, l):  # ξ_A on layers l (W ↦ A W) and l + 1 (W ↦ −W A), flat
            out = np.zeros(dim)
            out[offsets[l]:offsets[l + 1]] = (a @ ms[l]).ravel()
            out[offsets[l + 1]:offsets[l + 2]] = (-ms[l + 1] @ a).ravel()
            return out

        for l in range(len(shapes) - 1):
            width = shapes[l][0]
            for i in range(width):
                for j in range(i + 1, width):
                    a = np.zeros((width, width))
                    a[i, j], a[j, i] = 1.0, -1.0
                    row = np.zeros(n)
                    row[0] = dc * v @ xi(a, mats, l)
                    row[1:1 + dim] = -c * xi(a, vels, l)  # ∇_θ⟨v, ξθ⟩ = ξᵀv = −ξv
                    row[1 + dim:] = c * xi(a, mats, l)
                    rows.append(row)
    return np.array(rows).reshape(-1, n)


def embed(model, frame, input_shape: tuple[int, ...], frame_input: tuple[int, ...], key):
    """`model` embedded in `frame`, a model of the same structure whose every parameter leaf
    is at least as large: each of the model's leaves becomes the leading block of the frame's
    (the frame's values elsewhere, frozen by the returned mask), and inputs of `input_shape`
    are zero-padded to `frame_input` (`count_laws(pad_to=(frame, frame_input))`).

    The embedding is valid when the padded model, on zero-padded inputs, computes the model's
    outputs zero-padded, for every value of the real parameters near θ: the real coordinates'
    fields are then the model's, and every bracket too (the padding is frozen). This is
    checked at θ and at two random points around it, on random inputs, to 1e-10 relative;
    a frame that fails raises an `ArgumentError`.

    **Returns:** (padded model, mask: 1.0 on the real flat entries, keep: their flat indices,
    (padded input shape, padded output shape)).
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    f_params, f_static = eqx.partition(frame, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    f_leaves, f_treedef = jax.tree_util.tree_flatten(f_params)
    if treedef != f_treedef or type(model) is not type(frame):
        raise ArgumentError(f"`pad_to` = (frame, input_shape): the frame must be a "
                            f"{type(model).__name__} with the model's parameter structure "
                            "and larger leaves; got a different structure.")
    for a, b in zip(leaves, f_leaves):
        if a.ndim != b.ndim or any(m > n for m, n in zip(a.shape, b.shape)):
            raise ArgumentError(f"`pad_to`'s frame has a leaf of shape {b.shape} where the "
                                f"model's is {a.shape}: every frame leaf must be at least as "
                                "large in every axis.")
    if len(frame_input) != len(input_shape) or any(
            m > n for m, n in zip(input_shape, frame_input)):
        raise ArgumentError(f"`pad_to`'s input shape {tuple(frame_input)} must be at least "
                            f"the model's input shape {tuple(input_shape)} in every axis.")
    blocks = [tuple(slice(0, n) for n in a.shape) for a in leaves]
    masks = [np.zeros(b.shape) for b in f_leaves]
    for m, block in zip(masks, blocks):
        m[block] = 1.0

    def place(real):
        return jax.tree_util.tree_unflatten(f_treedef, [
            jnp.asarray(b, a.dtype).at[block].set(a)
            for a, b, block in zip(real, f_leaves, blocks)])

    padded = eqx.combine(place(leaves), f_static)
    out = jax.eval_shape(model, jax.ShapeDtypeStruct(input_shape, jnp.float64)).shape
    try:
        frame_out = jax.eval_shape(padded, jax.ShapeDtypeStruct(frame_input, jnp.float64)).shape
    except Exception as e:  # noqa: BLE001 — any failure means the frame cannot take it
        raise ArgumentError(f"`pad_to`'s frame does not take inputs of shape "
                            f"{tuple(frame_input)} ({type(e).__name__}: {str(e)[:160]}).") from None
    if len(frame_out) != len(out) or any(m > n for m, n in zip(out, frame_out)):
        raise ArgumentError(f"`pad_to`'s frame gives outputs of shape {frame_out}, which "
                            f"cannot hold the model's {out}.")
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    x = rng.standard_normal((4, *input_shape))
    x_pad = np.zeros((4, *frame_input))
    x_pad[(slice(None), *(slice(0, n) for n in input_shape))] = x
    scale = float(np.sqrt(np.mean(np.concatenate([np.ravel(a) for a in leaves]) ** 2))) or 1.0
    for trial in range(3):  # θ, then two random points around it (the brackets need a
        real = [a if trial == 0 else a + 0.3 * scale * rng.standard_normal(a.shape)  # germ)
                for a in leaves]
        here = eqx.combine(jax.tree_util.tree_unflatten(treedef, real), static)
        there = eqx.combine(place(real), f_static)
        want = np.zeros((4, *frame_out))
        want[(slice(None), *(slice(0, n) for n in out))] = np.asarray(
            jax.vmap(here)(jnp.asarray(x)))
        got = np.asarray(jax.vmap(there)(jnp.asarray(x_pad)))
        if not np.allclose(got, want, rtol=1e-10, atol=1e-10 * (np.abs(want).max() or 1.0)):
            raise ArgumentError(
                "`pad_to`'s frame does not compute the model's outputs (zero-padded) on "
                "zero-padded inputs (largest difference "
                f"{float(np.abs(got - want).max()):.3g}): the padding must not feed the real "
                "outputs, e.g. zero-padded weight matrices.")
    mask = np.concatenate([m.ravel() for m in masks])
    return padded, jnp.asarray(mask), np.flatnonzero(mask), (tuple(frame_input), frame_out)
