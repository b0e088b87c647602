"""Flows beyond Euclidean gradient flow, as vector fields for `gradient_flow(field=...)`:
second-order (heavy-ball and Nesterov ODEs, integrated in phase space), sign, preconditioned
(per-leaf learning rates) and mirror flows.

A second-order field's state is y = (θ, v) flattened into one vector (θ the flat parameters,
v = θ̇): diffrax's per-step work is a tree_map over the state, and one leaf is fastest (as for
first-order flows). `gradient_flow` evaluates the loss, the ordinary laws and `final` on θ
(`position`), and `AbstractPhaseSpaceLaw`s on a `PhaseState` (t, w(t), θ, v).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu

from .._custom_types import Array, Float, ScalarLike
from .._validation import ArgumentError, fail, number
from .flow import AbstractVectorField, _shown, _WeightDecay


class AbstractPhaseSpaceField(AbstractVectorField):
    """A second-order flow θ̈ = a(t, θ, θ̇), integrated as the first-order system
    (θ, v)' = (v, a(t, θ, v)) on the flat state y = (θ, v).

    Subclasses give the `acceleration` a(t, θ, v), the integrating factor `weight`
    w(t) = exp(∫₀ᵗ γ) of their friction γ (the factor that makes ⟨v, Aθ⟩ conserved for an
    antisymmetric symmetry generator A: `AngularMomentumLaw`) and `start_velocity` c: the
    flow starts from v₀ = −c (∇L(θ₀) + λθ₀) unless `gradient_flow(velocity=...)` gives v₀.
    """

    phase_space = True

    @abc.abstractmethod
    def acceleration(self, grad: Callable, t: Array, theta: Array, v: Array) -> Array:
        """θ̈ at time `t` (the flow's), position `theta`, velocity `v` (flat)."""

    @abc.abstractmethod
    def weight(self, t: Array) -> Array:
        """w(t) = exp(∫₀ᵗ γ(s) ds) for the friction γ of the flow (1 at t = 0)."""

    @abc.abstractmethod
    def initial_velocity(self, grad: Callable, theta: Array) -> Array:
        """v₀ of a flow started at the flat parameters `theta`."""

    def rhs(self, grad, t, y):
        theta, v = self.position(y), self.velocity(y)
        return jnp.concatenate([v, self.acceleration(grad, t, theta, v)])

    def __call__(self, grad, y):
        return self.rhs(grad, jnp.zeros((), y.dtype), y)

    def start(self, grad, y):
        return jnp.concatenate([y, self.initial_velocity(grad, y)])

    def position(self, y):
        return y[: y.shape[-1] // 2]

    def velocity(self, y: Array) -> Array:
        """The flat velocity v of the state `y`."""
        return y[y.shape[-1] // 2:]


def _check_velocity_scale(value):
    number("start_velocity", _shown(value), ">=0", array=True,
           fix="c in v₀ = −c(∇L(θ₀) + λθ₀); 0 starts at rest")


class MomentumField(AbstractPhaseSpaceField, _WeightDecay):
    """The heavy-ball ODE μθ̈ + θ̇ = −∇L(θ) − λθ (mass μ > 0, weight decay λ ≥ 0), from
    v₀ = −c(∇L(θ₀) + λθ₀) (`start_velocity` c; default 0: at rest).

    Its friction is 1/μ, so w(t) = e^{t/μ}: Q = e^{t/μ}⟨v, Aθ⟩ is conserved for every
    antisymmetric generator A of a linear symmetry of the loss (`AngularMomentumLaw`), while
    the gradient-flow laws of symmetric generators (balance, ReLU rescaling) drift.

    The discrete heavy ball (PyTorch: v ← βv + g + λθ, θ ← θ − ηv, v₀ = 0) follows it with
    `MomentumField.heavy_ball(η, β, λ)`: time s = kη/(1 − β) per step k,
    μ = η(1 + β)/(2(1 − β)²) and c = (1 − β)/(1 + β) (derivation there).

    Example: `gradient_flow(objective, model, 5.0, field=MomentumField(0.5))`.
    """

    mass: Array = eqx.field(converter=jnp.asarray)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)
    start_velocity: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("mass", _shown(self.mass), ">0", array=True,
               fix="μ in μθ̈ + θ̇ = −∇L; μ → 0 is gradient flow (use GradientField)")
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)
        _check_velocity_scale(self.start_velocity)

    @classmethod
    def heavy_ball(cls, lr: ScalarLike, momentum: ScalarLike, weight_decay: ScalarLike = 0.0
                   ) -> "MomentumField":
        """The momentum ODE that the heavy ball with learning rate η, momentum β and weight
        decay λ follows to second order in η, in time s = kη/(1 − β) (step k).

        Derivation (g = ∇L + λθ): the iterates satisfy θ_{k+1} − 2θ_k + θ_{k−1} =
        −(1 − β)(θ_k − θ_{k−1}) − ηg(θ_k). With θ_k = θ(kh), h = η/(1 − β), Taylor
        expansion of the backward difference θ_k − θ_{k−1} = hθ' − h²θ''/2 + O(h³) gives
        h²(1 + β)/2 θ'' + (1 − β)hθ' = −ηg + O(h³), i.e. μθ'' + θ' = −g with
        μ = η(1 + β)/(2(1 − β)²) (its slow manifold is `ModifiedGradientField`'s modified
        equation). The heavy ball starts at rest, displaced by δ = ηβ/(1 − β)² g(θ₀) from
        the slow solution (`ModifiedGradientField`); the ODE from v₀ is displaced by
        μ(v₀ + g(θ₀)), equal for v₀ = −(1 − β)/(1 + β) g(θ₀). Then |θ_k − θ(s_k)| = O(η²)
        after the initial layer (β^k ≲ η), O(η) inside it (the transients decay at
        slightly different rates); from rest (c = 0) it is O(η) throughout.
        Measured in `tests/test_momentum_flows.py`.
        """
        beta = jnp.asarray(momentum)
        number("lr", _shown(jnp.asarray(lr)), ">0", array=True)
        number("momentum", _shown(beta), "[0,1)", array=True,
               fix="β ≥ 1 never forgets a gradient")
        mass = jnp.asarray(lr) * (1 + beta) / (2 * (1 - beta) ** 2)
        return cls(mass, weight_decay, (1 - beta) / (1 + beta))

    def acceleration(self, grad, t, theta, v):
        del t
        return -(v + self.decayed_grad(grad, theta)) / self.mass

    def weight(self, t):
        return jnp.exp(t / self.mass)

    def initial_velocity(self, grad, theta):
        return -self.start_velocity * self.decayed_grad(grad, theta)


class NesterovField(AbstractPhaseSpaceField, _WeightDecay):
    """Nesterov's ODE θ̈ + (3/τ)θ̇ + ∇L(θ) + λθ = 0 (Su, Boyd & Candès 2016) in its own time
    τ = t + t₀: the flow's time t starts at 0, τ at `start_time` t₀ > 0 (default 1; the ODE is
    singular at τ = 0). Starts from v₀ = −c(∇L(θ₀) + λθ₀) (`start_velocity` c; default 0, at rest).

    Its friction is 3/τ, so w(t) = (τ/t₀)³: Q = (τ/t₀)³⟨v, Aθ⟩ is conserved for every
    antisymmetric symmetry generator A (`AngularMomentumLaw`).

    Example: `gradient_flow(objective, model, 10.0, field=NesterovField(start_time=0.1))`.
    """

    start_time: Array = eqx.field(default=1.0, converter=jnp.asarray)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)
    start_velocity: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("start_time", _shown(self.start_time), ">0", array=True,
               fix="t₀ > 0: the ODE's friction 3/t is singular at t = 0")
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)
        _check_velocity_scale(self.start_velocity)

    def acceleration(self, grad, t, theta, v):
        tau = t + self.start_time
        return -3.0 * v / tau - self.decayed_grad(grad, theta)

    def weight(self, t):
        return ((t + self.start_time) / self.start_time) ** 3

    def initial_velocity(self, grad, theta):
        return -self.start_velocity * self.decayed_grad(grad, theta)


class SignField(AbstractVectorField, _WeightDecay):
    """Sign-gradient flow dθ/dt = −sign(∇L(θ) + λθ), the continuous limit of sign descent
    (Adam with β₁ = β₂ = 0 in the limit of small ε). With `smoothing` ε > 0 the sign is
    replaced by g/√(g² + ε²).

    It keeps no conservation law in general (Marcotte et al. 2025): the balance and rescale
    laws of gradient flow drift under it. The exact sign is discontinuous where a gradient
    component vanishes: there the flow chatters and an adaptive solver shrinks its steps; run
    it over a horizon before that, or with ε > 0.

    Example: `gradient_flow(objective, model, 0.5, field=SignField())`.
    """

    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)
    smoothing: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)
        number("smoothing", _shown(self.smoothing), ">=0", array=True,
               fix="ε in g/√(g² + ε²); 0 is the exact sign")

    def __call__(self, grad, y):
        g = self.decayed_grad(grad, y)
        eps = self.smoothing
        smooth = g / jnp.sqrt(g**2 + eps**2 + jnp.where(eps > 0, 0.0, 1.0))
        return -jnp.where(eps > 0, smooth, jnp.sign(g))


class PreconditionedField(AbstractVectorField, _WeightDecay):
    """dθ/dt = −P(∇L(θ) + λθ) with a constant diagonal preconditioner P = diag(p), p > 0, one
    entry per flat parameter (in `jax.flatten_util.ravel_pytree` order of the model's
    floating-point leaves). `PreconditionedField.per_leaf(model, lrs)` builds P from one
    learning rate per parameter array (per-layer learning rates: "Get rich quick", whose
    conserved balance is `LrBalanceLaw`).

    Example: `field = PreconditionedField.per_leaf(net, [1.0, 0.25])` for a 2-layer net.
    """

    preconditioner: Float[Array, " P"] = eqx.field(converter=jnp.asarray)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("preconditioner", _shown(self.preconditioner), ">0", array=True,
               fix="one positive rate per flat parameter (or use PreconditionedField"
                   ".per_leaf)")
        if self.preconditioner.ndim != 1:
            raise fail("preconditioner", self.preconditioner.shape, "must be a flat vector "
                       "(one rate per parameter)")
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)

    @classmethod
    def per_leaf(cls, model, lrs, weight_decay: ScalarLike = 0.0) -> "PreconditionedField":
        """P with the rate `lrs[i]` on every entry of the i-th floating-point leaf of `model`
        (`jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))` order: for a
        `DeepLinear`, W_1, W_2, …)."""
        leaves = jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        lrs = list(lrs) if isinstance(lrs, list | tuple) else lrs
        if not isinstance(lrs, list) or len(lrs) != len(leaves):
            raise fail("lrs", lrs, f"must list one learning rate per parameter array "
                       f"({len(leaves)} for this model)")
        for rate in lrs:
            number("lrs", rate, ">0", fix="every learning rate must be positive")
        flat, _ = jfu.ravel_pytree([jnp.full(jnp.shape(x), r, float)
                                    for x, r in zip(leaves, lrs)])
        return cls(flat, weight_decay)

    def __call__(self, grad, y):
        if y.shape != self.preconditioner.shape:
            raise ArgumentError(
                f"`field` has a preconditioner of {self.preconditioner.shape[0]} entries but "
                f"the model has {y.shape[0]} parameters; build it for this model "
                "(PreconditionedField.per_leaf(model, lrs)).")
        return -self.preconditioner * self.decayed_grad(grad, y)


class MirrorField(AbstractVectorField):
    """Mirror flow d∇φ(θ)/dt = −∇L(θ), i.e. dθ/dt = −(∇²φ(θ))⁻¹∇L(θ), for a strictly convex
    potential φ.

    - `potential="entropy"`: φ(θ) = Σ θ_i log θ_i − θ_i, dθ/dt = −θ ⊙ ∇L (multiplicative
      updates / exponentiated gradient, NMF): keeps positive parameters positive; its laws
      include `MirrorBalanceLaw`. Start from θ > 0.
    - a function `potential(theta) -> scalar` of the flat parameters: its Hessian is formed
      densely and solved at every evaluation (P³ work: small models). Keep the same function
      object between runs (it keys the compiled program).

    Example: `gradient_flow(objective, model, 2.0, field=MirrorField("entropy"))`.
    """

    potential: str | Callable = eqx.field(default="entropy", static=True)

    def __check_init__(self):
        if not (self.potential == "entropy" or callable(self.potential)):
            raise fail("potential", self.potential, "must be 'entropy' or a function "
                       "theta -> scalar (a strictly convex potential of the flat parameters)")

    def __call__(self, grad, y):
        g = grad(y)
        if isinstance(self.potential, str):
            return -y * g
        return -jnp.linalg.solve(jax.hessian(self.potential)(y), g)
