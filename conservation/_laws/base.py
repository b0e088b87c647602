"""Conservation laws: functions Q(θ) constant along gradient flow, and how to check them.

A law is an `equinox.Module` with only static fields, so laws hash by value and a run with the
same laws reuses its compiled program. `law(model)` is the value Q(θ) (any shape);
`law.scale(model)` is the natural magnitude of the terms Q is built from, so that
`law.drift(Q(t), Q(0), scale)` is a *relative* drift that is meaningful even when Q(0) = 0
(a balanced initialisation).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar


class AbstractLaw(eqx.Module):
    """A candidate conserved quantity Q(θ) of a model."""

    # Whether `drift` is relative to `scale` (plots and tables label it "relative drift");
    # False for laws whose drift is absolute (subspace distances, angles, ratios).
    relative = True

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short unique label, e.g. `balance[0]`."""

    @abc.abstractmethod
    def __call__(self, model) -> Array:
        """The value Q(θ)."""

    def scale(self, model) -> Array:
        """Magnitude that the drift |Q(t) − Q(0)| is divided by (broadcasts against Q)."""
        del model
        return jnp.ones(())

    def drift(self, value: Array, reference: Array, scale: Array) -> Scalar:
        """max |Q(t) − Q(0)| / scale over the components of Q."""
        return jnp.max(jnp.abs(value - reference) / scale)

    def condition(self, model) -> Scalar:
        """How well Q(θ) is resolved: the relative size of the component it measures (∞ for
        laws that never degenerate). Below ~1e-6 the drift is dominated by round-off."""
        del model
        return jnp.asarray(jnp.inf)


class AbstractGramLaw(AbstractLaw):
    """Q = AᵀA − BBᵀ for two parameter blocks A, B (balance-type laws).

    Conserved whenever the loss is invariant under (A, B) ↦ (A G⁻¹, G B) for G ∈ GL(k)."""

    @abc.abstractmethod
    def blocks(self, model) -> tuple[Array, Array]:
        """The blocks (A, B) with AᵀA and BBᵀ both k×k."""

    def __call__(self, model) -> Float[Array, "k k"]:
        a, b = self.blocks(model)
        return a.T @ a - b @ b.T

    def scale(self, model) -> Scalar:
        a, b = self.blocks(model)
        return jnp.linalg.norm(a.T @ a) + jnp.linalg.norm(b @ b.T)


class BalanceLaw(AbstractGramLaw):
    """Deep linear balance W_{l+1}ᵀW_{l+1} − W_l W_lᵀ between layers `layer` and `layer + 1`."""

    layer: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return f"balance[{self.layer}]"

    def blocks(self, model):
        return model.weights[self.layer + 1], model.weights[self.layer]


class AttentionQKLaw(AbstractGramLaw):
    """Q_hᵀQ_h − K_hᵀK_h of one attention head (symmetry (Q, K) ↦ (QA, KA⁻ᵀ))."""

    head: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return f"qk[{self.head}]"

    def blocks(self, model):
        return model.query[self.head], model.key[self.head].T


class AttentionVOLaw(AbstractGramLaw):
    """V_hᵀV_h − W_O^h W_O^hᵀ of one head with an output projection ((V, W_O) ↦ (VB, B⁻¹W_O))."""

    head: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return f"vo[{self.head}]"

    def blocks(self, model):
        return model.value[self.head], model.out[self.head]


class NeuronRescaleLaw(AbstractLaw):
    """Per hidden neuron i of layer `layer`: |W_l[i,:]|² − k |W_{l+1}[:,i]|².

    Conserved when the activation is homogeneous of degree k (σ(cz) = c^k σ(z)), from the
    rescaling (W_l[i,:], W_{l+1}[:,i]) ↦ (c W_l[i,:], c^{-k} W_{l+1}[:,i]). For σ(z) = z² this is
    the seed paper's |w_j|² − 2a_j²; for k = 1 it is the diagonal of the balance law.
    """

    layer: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return f"rescale[{self.layer}]"

    def _terms(self, model):
        incoming = jnp.sum(model.weights[self.layer] ** 2, axis=1)
        outgoing = jnp.sum(model.weights[self.layer + 1] ** 2, axis=0)
        return incoming, self.degree * outgoing

    def __call__(self, model) -> Float[Array, " h"]:
        incoming, outgoing = self._terms(model)
        return incoming - outgoing

    def scale(self, model) -> Float[Array, " h"]:
        incoming, outgoing = self._terms(model)
        return incoming + outgoing


class AttentionKVLaw(AbstractLaw):
    """‖K_h‖² − ‖V_h‖² of one head (symmetry (K, V) ↦ (cK, V/c); with r = m = 1, |K|² − |V|²)."""

    head: int = eqx.field(static=True)

    @property
    def name(self) -> str:
        return f"kv[{self.head}]"

    def __call__(self, model) -> Scalar:
        return jnp.sum(model.key[self.head] ** 2) - jnp.sum(model.value[self.head] ** 2)

    def scale(self, model) -> Scalar:
        return jnp.sum(model.key[self.head] ** 2) + jnp.sum(model.value[self.head] ** 2)


class FunctionLaw(AbstractLaw):
    """A user-supplied law `fn(model) -> Array`, with an optional `scale_fn(model)`.

    Keep the same function objects between runs: they are part of the compiled program's key.
    """

    fn: Callable = eqx.field(static=True)
    label: str = eqx.field(static=True)
    scale_fn: Callable | None = eqx.field(static=True, default=None)

    @property
    def name(self) -> str:
        return self.label

    def __call__(self, model) -> Array:
        return self.fn(model)

    def scale(self, model) -> Array:
        return jnp.ones(()) if self.scale_fn is None else self.scale_fn(model)


def check_unique_names(laws) -> tuple[AbstractLaw, ...]:
    """Validate a sequence of laws (type and unique names) and return it as a tuple."""
    laws = tuple(laws)
    seen = set()
    for law in laws:
        if not isinstance(law, AbstractLaw):
            raise TypeError(
                f"`laws` must contain `AbstractLaw`s, got {type(law).__name__}; wrap a function "
                "as `conservation.FunctionLaw(fn, 'name')`."
            )
        if law.name in seen:
            raise ValueError(f"two laws are named {law.name!r}: law names must be unique.")
        seen.add(law.name)
    return laws


def pointwise_check(law: AbstractLaw, objective, model) -> Scalar:
    """The worst cosine |⟨∇Q_i, ∇L⟩| / (|∇Q_i| |∇L|) over the components Q_i of `law`.

    Q is conserved by the gradient flow of `objective` iff this vanishes everywhere
    (dQ/dt = −⟨∇Q, ∇L⟩). Components whose gradient vanishes at this point are skipped.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jfu.ravel_pytree(params)

    def loss(p):
        return objective(eqx.combine(unravel(p), static))

    def value(p):
        return jnp.ravel(law(eqx.combine(unravel(p), static)))

    grad_l = jax.grad(loss)(flat)
    jac_q = jax.jacrev(value)(flat)
    norms_q = jnp.linalg.norm(jac_q, axis=1)
    norm_l = jnp.linalg.norm(grad_l)
    tiny = jnp.finfo(flat.dtype).eps * jnp.max(norms_q)
    cos = jnp.abs(jac_q @ grad_l) / (jnp.maximum(norms_q, tiny) * norm_l)
    return jnp.max(jnp.where(norms_q > tiny, cos, 0.0))
