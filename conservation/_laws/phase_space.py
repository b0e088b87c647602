"""Laws of flows other than Euclidean gradient flow.

**Phase-space laws** of second-order flows θ̈ + γ(t)θ̇ = −c(t)(∇L(θ) + λθ) (the heavy-ball ODE
μθ̈ + θ̇ = −∇L − λθ: γ = 1/μ; Nesterov's θ̈ + (3/t)θ̇ + ∇L = 0: γ = 3/t). They depend on the
time t, the position θ and the velocity v = θ̇, so they are evaluated on a `PhaseState`.

Derivation. Let A be a linear map of the parameters with ⟨∇L(θ), Aθ⟩ = 0 for every θ (the
generator of a linear symmetry θ ↦ e^{sA}θ of the loss), and J = ⟨v, Aθ⟩. Along the flow

    dJ/dt = ⟨v̇, Aθ⟩ + ⟨v, Av⟩ = −γ(t) J − c(t)(⟨∇L, Aθ⟩ + λ⟨θ, Aθ⟩) + ⟨v, Av⟩.

For an *antisymmetric* A (Aᵀ = −A) both ⟨θ, Aθ⟩ and ⟨v, Av⟩ vanish, so dJ/dt = −γ(t) J and

    Q = w(t) ⟨v, Aθ⟩,   w(t) = exp(∫_{t₀}^{t} γ(s) ds)   (e^{(t−t₀)/μ} heavy ball, (t/t₀)³ Nesterov)

is exactly conserved, also with weight decay. For a *symmetric* A (the rescalings of ReLU
nets, the symmetric part of GL(k) of linear layers) the term ⟨v, Av⟩ does not vanish, and the
gradient-flow law ½⟨θ, Aθ⟩ is not conserved: momentum breaks it (Marcotte, Gribonval & Peyré,
"Keep the momentum", ICML 2024). For consecutive linear layers (W_l, W_{l+1}) ↦ (G W_l,
W_{l+1} G⁻¹), G = e^{sX}, the generator is A(W_l, W_{l+1}) = (X W_l, −W_{l+1} X), antisymmetric
exactly when X is, and ⟨v, Aθ⟩ = tr(X (W_l V_lᵀ − V_{l+1}ᵀ W_{l+1})): the conserved quantities
are the antisymmetric part of M = W_l V_lᵀ − V_{l+1}ᵀ W_{l+1}, k(k − 1)/2 of them per pair
(`AngularMomentumLaw`).

**Laws of first-order flows with a preconditioner:** per-leaf learning rates
dW_l/dt = −η_l ∂L/∂W_l conserve η_{l+1}⁻¹W_{l+1}ᵀW_{l+1} − η_l⁻¹W_l W_lᵀ (`LrBalanceLaw`;
Kunin et al., "Get rich quick", NeurIPS 2024); the entropy mirror flow dθ/dt = −θ ⊙ ∇L
(multiplicative updates) conserves, per hidden unit i, Σ_j W_l[i, j] − Σ_k W_{l+1}[k, i]
(`MirrorBalanceLaw`: the rescaling generator A = diag(a) has ∇²φ(θ)Aθ = a, constant).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar
from .._validation import ArgumentError, fail, integer, number
from .base import AbstractLaw, _check_layer, law_mismatch


class PhaseState(eqx.Module):
    """A point of a second-order flow, what phase-space laws are evaluated on.

    - `t`: the flow's time (`gradient_flow`'s; Nesterov's own time is `t + start_time`).
    - `weight`: w(t) = exp(∫_{t₀}^{t} γ), the factor that makes ⟨v, Aθ⟩ conserved (1 at the
      start of the flow; e^{t/μ} for the heavy-ball ODE, ((t + t₀)/t₀)³ for Nesterov's).
    - `position`: the model at θ(t).
    - `velocity`: a model of the same structure holding v(t) = θ̇ in its parameters.
    """

    t: Array
    weight: Array
    position: eqx.Module
    velocity: eqx.Module


class AbstractPhaseSpaceLaw(AbstractLaw):
    """A law Q(t, θ, v) of a second-order flow: `law(state)` with a `PhaseState`.

    Monitored by `gradient_flow` with a phase-space field (`MomentumField`, `NesterovField`);
    other runs refuse it. `check(model)` receives the position model."""

    @abc.abstractmethod
    def value(self, state: PhaseState) -> Array:
        """Q at `state`."""

    def __call__(self, state) -> Array:
        if not isinstance(state, PhaseState):
            raise ArgumentError(
                f"the phase-space law {self.name!r} needs the time and velocity of a "
                "second-order flow; monitor it with gradient_flow(..., "
                "field=conservation.MomentumField(...) or NesterovField(...)).")
        return self.value(state)

    def scale(self, state) -> Array:
        del state
        return jnp.ones(())

    def drift_at(self, value: Array, reference: Array, scale: Array, state: PhaseState
                 ) -> Scalar:
        """The drift a flow records at `state` (Q(t) = `value`, Q(0) = `reference`, the start's
        `scale`): by default `drift(value, reference, scale)`, measured against the start."""
        del state
        return self.drift(value, reference, scale)


class AngularMomentumLaw(AbstractPhaseSpaceLaw):
    """w(t) · antisym(W_l V_lᵀ − V_{l+1}ᵀ W_{l+1}) between layers `layer` and `layer + 1` of a
    model with a `weights` tuple (deep linear nets): conserved by the heavy-ball and Nesterov
    ODEs, with or without weight decay (module docstring); antisym(M) = (M − Mᵀ)/2.

    Its scale is ‖W_l‖‖V_l‖ + ‖W_{l+1}‖‖V_{l+1}‖ at the start (the size of the terms), or,
    for a start with v = 0, ‖W_l‖² + ‖W_{l+1}‖² (the law is then 0 for all t: a start at rest
    or along −∇L has ⟨v, Aθ⟩ = 0; give `gradient_flow(velocity=...)` for a non-trivial one).
    Its `condition` is ‖antisym M‖ over the size of the terms: it falls like e^{−t/μ} (the
    velocity's orbit component decays).

    A flow records its drift at t against the larger of the start's scale and the scale now,
    w(t)·(‖W_l‖‖V_l‖ + ‖W_{l+1}‖‖V_{l+1}‖) (`drift_at`): |Q(t) − Q(0)| / (w(t)·size(t)) =
    |J(t) − J(0)/w(t)| / size(t), the error of J = antisym M against the size of its terms
    now, which an integration to rtol keeps ~rtol. Against the start's scale alone the
    weight would multiply the solver's error by w(t) (e^{267} for μ = 0.06 at t = 16): a
    drift of 1e100 for a law that holds. Once J(0)/w(t) is below the solver's error the law
    holds no information any more; the `condition` says when.
    """

    layer: int = eqx.field(static=True)

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)

    @property
    def name(self) -> str:
        return f"angular[{self.layer}]"

    def check(self, model) -> None:
        _check_layer(self, model, self.layer + 1)

    def _parts(self, state):
        self.check(state.position)
        w = state.position.weights
        v = state.velocity.weights
        m = w[self.layer] @ v[self.layer].T - v[self.layer + 1].T @ w[self.layer + 1]
        size = (jnp.linalg.norm(w[self.layer]) * jnp.linalg.norm(v[self.layer])
                + jnp.linalg.norm(w[self.layer + 1]) * jnp.linalg.norm(v[self.layer + 1]))
        rest = jnp.sum(w[self.layer] ** 2) + jnp.sum(w[self.layer + 1] ** 2)
        return 0.5 * (m - m.T), size, rest

    def value(self, state) -> Float[Array, "k k"]:
        antisym, _, _ = self._parts(state)
        return state.weight * antisym

    def scale(self, state) -> Scalar:
        _, size, rest = self._parts(state)
        return state.weight * jnp.where(size > 0, size, rest)

    def drift_at(self, value, reference, scale, state) -> Scalar:
        return self.drift(value, reference, jnp.maximum(scale, self.scale(state)))

    def condition(self, state) -> Scalar:
        antisym, size, _ = self._parts(state)
        return jnp.where(size > 0, jnp.linalg.norm(antisym) / jnp.where(size > 0, size, 1.0),
                         0.0)


def phase_space_laws(model) -> tuple[AbstractPhaseSpaceLaw, ...]:
    """The phase-space laws a model declares, as `model.laws()` declares its gradient-flow
    laws: what the heavy-ball and Nesterov ODEs conserve.

    A deep linear net (`DeepLinear`, or a bias-free, un-normalised `MLP` with the linear
    activation) has one `AngularMomentumLaw` per pair of consecutive layers (the
    antisymmetric generators of its GL(k) symmetries). Every other model declares none:
    a ReLU net's continuous symmetries are rescalings, symmetric generators, whose laws
    momentum breaks (Marcotte, Gribonval & Peyré 2024: ReLU nets keep no law under
    momentum); its gradient-flow laws stay monitored as the negative control.

    Example: `phase_space_laws(DeepLinear.random([3, 4, 4, 2], key=key))` is
    `(AngularMomentumLaw(0), AngularMomentumLaw(1))`.
    """
    from .._models.linear import DeepLinear  # models import laws: import here
    from .._models.mlp import MLP

    linear = isinstance(model, DeepLinear) or (
        isinstance(model, MLP) and model.activation == "linear" and model.biases is None
        and not model.normalize)
    if not linear:
        return ()
    return tuple(AngularMomentumLaw(layer) for layer in range(len(model.weights) - 1))


class FunctionPhaseLaw(AbstractPhaseSpaceLaw):
    """A user-supplied phase-space law `fn(state) -> Array` (`state` a `PhaseState`), with an
    optional `scale_fn(state)`. Keep the same function objects between runs (they key the
    compiled program)."""

    fn: Callable = eqx.field(static=True)
    label: str = eqx.field(static=True)
    scale_fn: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.fn):
            raise fail("fn", self.fn, "must be a function PhaseState -> Array")
        if not isinstance(self.label, str) or not self.label:
            raise fail("label", self.label, "must be a non-empty string (the law's name)")
        if self.scale_fn is not None and not callable(self.scale_fn):
            raise fail("scale_fn", self.scale_fn, "must be None or a function PhaseState -> "
                       "Array")

    @property
    def name(self) -> str:
        return self.label

    def check(self, model) -> None:
        del model  # evaluated on a PhaseState: nothing to check on the model alone

    def value(self, state) -> Array:
        return self.fn(state)

    def scale(self, state) -> Array:
        return jnp.ones(()) if self.scale_fn is None else self.scale_fn(state)


class LrBalanceLaw(AbstractLaw):
    """η_{l+1}⁻¹ W_{l+1}ᵀW_{l+1} − η_l⁻¹ W_l W_lᵀ: the balance of layers `layer`, `layer + 1`
    under per-layer learning rates dW_l/dt = −η_l ∂L/∂W_l (`PreconditionedField.per_leaf`):
    d/dt (W_l W_lᵀ)/η_l = −(G_l W_lᵀ + W_l G_lᵀ) = d/dt (W_{l+1}ᵀW_{l+1})/η_{l+1}, by the
    GL(k) symmetry (W_{l+1}ᵀ G_{l+1} = G_l W_lᵀ). `lrs` are the two rates (η_l, η_{l+1});
    equal rates give `BalanceLaw` up to the factor 1/η."""

    layer: int = eqx.field(static=True)
    lrs: tuple[float, float] = eqx.field(static=True)

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)
        if not isinstance(self.lrs, tuple) or len(self.lrs) != 2:
            raise fail("lrs", self.lrs, "must be a tuple (η_l, η_{l+1}) of two rates")
        for rate in self.lrs:
            number("lrs", rate, ">0", fix="the learning rates of the two layers")

    @property
    def name(self) -> str:
        return f"lr_balance[{self.layer}]"

    def check(self, model) -> None:
        _check_layer(self, model, self.layer + 1)

    def _terms(self, model):
        self.check(model)
        low, high = model.weights[self.layer], model.weights[self.layer + 1]
        return high.T @ high / self.lrs[1], low @ low.T / self.lrs[0]

    def __call__(self, model) -> Float[Array, "k k"]:
        high, low = self._terms(model)
        return high - low

    def scale(self, model) -> Scalar:
        high, low = self._terms(model)
        return jnp.linalg.norm(high) + jnp.linalg.norm(low)


class MirrorBalanceLaw(AbstractLaw):
    """Per hidden unit i of layer `layer`: Σ_j W_l[i, j] − Σ_k W_{l+1}[k, i], conserved by the
    entropy mirror flow dθ/dt = −θ ⊙ ∇L (`MirrorField("entropy")`, multiplicative updates,
    NMF) of a linear or ReLU layer pair: the rescaling generator A = diag(a) gives ∇²φ(θ)Aθ = a
    (φ = Σ θ log θ − θ), so dQ/dt = −⟨a, θ ⊙ ∇L⟩ = −⟨∇L, Aθ⟩ = 0."""

    layer: int = eqx.field(static=True)

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)

    @property
    def name(self) -> str:
        return f"mirror_balance[{self.layer}]"

    def check(self, model) -> None:
        _check_layer(self, model, self.layer + 1)
        low, high = model.weights[self.layer], model.weights[self.layer + 1]
        if low.shape[0] != high.shape[1]:
            raise law_mismatch(self, model, f"layer {self.layer} has {low.shape[0]} outputs "
                               f"but layer {self.layer + 1} {high.shape[1]} inputs")

    def __call__(self, model) -> Float[Array, " h"]:
        self.check(model)
        return (jnp.sum(model.weights[self.layer], axis=1)
                - jnp.sum(model.weights[self.layer + 1], axis=0))

    def scale(self, model) -> Float[Array, " h"]:
        self.check(model)
        return (jnp.sum(jnp.abs(model.weights[self.layer]), axis=1)
                + jnp.sum(jnp.abs(model.weights[self.layer + 1]), axis=0))
