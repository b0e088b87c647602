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
from .._validation import ArgumentError, fail, integer, model_parameters


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

    def check(self, model) -> None:
        """Raise an `ArgumentError` when this law cannot be evaluated on `model` (one model,
        not an ensemble): static checks of its structure and shapes, so they also run at
        trace time inside `jit`. Every evaluation of a built-in law makes them; the default
        checks nothing (`check_laws` then evaluates the law abstractly instead)."""
        del model

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
        self.check(model)
        a, b = self.blocks(model)
        return a.T @ a - b @ b.T

    def scale(self, model) -> Scalar:
        self.check(model)
        a, b = self.blocks(model)
        return jnp.linalg.norm(a.T @ a) + jnp.linalg.norm(b @ b.T)


class BalanceLaw(AbstractGramLaw):
    """Deep linear balance W_{l+1}ᵀW_{l+1} − W_l W_lᵀ between layers `layer` and `layer + 1`."""

    layer: int = eqx.field(static=True)

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)

    @property
    def name(self) -> str:
        return f"balance[{self.layer}]"

    def check(self, model) -> None:
        _check_layer(self, model, self.layer + 1)

    def blocks(self, model):
        return model.weights[self.layer + 1], model.weights[self.layer]


class AttentionQKLaw(AbstractGramLaw):
    """Q_hᵀQ_h − K_hᵀK_h of one attention head (symmetry (Q, K) ↦ (QA, KA⁻ᵀ))."""

    head: int = eqx.field(static=True)

    def __check_init__(self):
        integer("head", self.head, minimum=0)

    @property
    def name(self) -> str:
        return f"qk[{self.head}]"

    def check(self, model) -> None:
        _check_head(self, model, ("query", "key"))

    def blocks(self, model):
        return model.query[self.head], model.key[self.head].T


class AttentionVOLaw(AbstractGramLaw):
    """V_hᵀV_h − W_O^h W_O^hᵀ of one head with an output projection ((V, W_O) ↦ (VB, B⁻¹W_O))."""

    head: int = eqx.field(static=True)

    def __check_init__(self):
        integer("head", self.head, minimum=0)

    @property
    def name(self) -> str:
        return f"vo[{self.head}]"

    def check(self, model) -> None:
        _check_head(self, model, ("value", "out"))

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

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)
        integer("degree", self.degree, minimum=1)

    @property
    def name(self) -> str:
        return f"rescale[{self.layer}]"

    def check(self, model) -> None:
        _check_layer(self, model, self.layer + 1)

    def _terms(self, model):
        self.check(model)
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

    def __check_init__(self):
        integer("head", self.head, minimum=0)

    @property
    def name(self) -> str:
        return f"kv[{self.head}]"

    def check(self, model) -> None:
        _check_head(self, model, ("key", "value"))

    def __call__(self, model) -> Scalar:
        self.check(model)
        return jnp.sum(model.key[self.head] ** 2) - jnp.sum(model.value[self.head] ** 2)

    def scale(self, model) -> Scalar:
        self.check(model)
        return jnp.sum(model.key[self.head] ** 2) + jnp.sum(model.value[self.head] ** 2)


class FunctionLaw(AbstractLaw):
    """A user-supplied law `fn(model) -> Array`, with an optional `scale_fn(model)`.

    Keep the same function objects between runs: they are part of the compiled program's key.
    """

    fn: Callable = eqx.field(static=True)
    label: str = eqx.field(static=True)
    scale_fn: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not callable(self.fn):
            raise fail("fn", self.fn, "must be a function model -> Array")
        if not isinstance(self.label, str) or not self.label:
            raise fail("label", self.label, "must be a non-empty string (the law's name)")
        if self.scale_fn is not None and not callable(self.scale_fn):
            raise fail("scale_fn", self.scale_fn, "must be None or a function model -> Array")

    @property
    def name(self) -> str:
        return self.label

    def __call__(self, model) -> Array:
        return self.fn(model)

    def scale(self, model) -> Array:
        return jnp.ones(()) if self.scale_fn is None else self.scale_fn(model)


def law_mismatch(law: AbstractLaw, model, why: str, fix: str = "") -> ArgumentError:
    """The error for a law that does not fit `model`: names `laws`, the law and the model."""
    fix = fix or "pass laws of this model (e.g. model.laws(), or leave `laws` out)"
    return ArgumentError(f"`laws` holds {law.name!r} ({type(law).__name__}), which cannot be "
                         f"evaluated on `model` ({type(model).__name__}): {why}; {fix}.")


def _check_layer(law, model, last: int) -> None:
    """`model.weights` exists and has a layer `last` (the deepest one the law reads)."""
    weights = getattr(model, "weights", None)
    if not isinstance(weights, tuple | list):
        raise law_mismatch(law, model, "it has no `weights` tuple of layers")
    if last >= len(weights):
        raise law_mismatch(law, model, f"it reads layer {last} but the model has "
                                       f"{len(weights)} layers (0 to {len(weights) - 1})")


def _check_head(law, model, blocks) -> None:
    """`model` has the attention blocks `blocks` and a head `law.head`."""
    for name in blocks:
        if getattr(model, name, None) is None:
            raise law_mismatch(law, model, f"it has no `{name}` projection"
                               + (" (built without `out`)" if name == "out" else ""))
    heads = model.query.shape[-3] if hasattr(model, "query") else getattr(model, blocks[0]).shape[0]
    if law.head >= heads:
        raise law_mismatch(law, model, f"it reads head {law.head} but the model has {heads} "
                                       "heads")


def check_unique_names(laws) -> tuple[AbstractLaw, ...]:
    """Validate a sequence of laws (type and unique names) and return it as a tuple."""
    if isinstance(laws, AbstractLaw) or isinstance(laws, str) or not hasattr(laws, "__iter__"):
        raise fail("laws", laws, "must be a list of laws", "wrap a single law as [law]")
    laws = tuple(laws)
    seen = set()
    for law in laws:
        if not isinstance(law, AbstractLaw):
            raise ArgumentError(
                f"`laws` must contain `AbstractLaw`s, got {type(law).__name__}; wrap a function "
                "as `conservation.FunctionLaw(fn, 'name')`."
            )
        if law.name in seen:
            raise ArgumentError(f"two laws are named {law.name!r}: law names must be unique.")
        seen.add(law.name)
    return laws


def check_laws(laws, model) -> tuple[AbstractLaw, ...]:
    """Validate `laws` for `model` (a model or an `Ensemble`) at the boundary of a run: each
    is an `AbstractLaw`, names are unique, and each can be evaluated on one member of `model`
    — its static `check`, or for laws without one (`FunctionLaw`s, user subclasses) an
    abstract evaluation (`jax.eval_shape`, nothing computed). Raises an `ArgumentError` naming
    the law; returns the laws as a tuple."""
    laws = check_unique_names(laws)
    if not laws:
        return laws
    member = _abstract_member(model)
    for law in laws:
        law.check(member)
        if type(law).check is not AbstractLaw.check:
            continue
        try:
            for method in (law, law.scale, law.condition):
                eqx.filter_eval_shape(method, member)
        except ArgumentError:
            raise
        except Exception as e:  # noqa: BLE001 — the user's law cannot take this model
            raise law_mismatch(law, member, f"{type(e).__name__}: {str(e)[:200]}",
                               "fix the law's function or pass laws of this model") from e
    return laws


def _abstract_member(model):
    """One member of `model` (a model, or an ensemble's first) with abstract leaves."""
    from .._models.base import Ensemble  # models import laws: import here, not at the top

    if isinstance(model, Ensemble):
        return eqx.filter_eval_shape(lambda e: e[0], model)
    if not isinstance(model, eqx.Module):
        raise fail("model", model, "must be an `equinox.Module` or an `Ensemble`")
    return model


def pointwise_check(law: AbstractLaw, objective, model) -> Scalar:
    """The worst cosine |⟨∇Q_i, ∇L⟩| / (|∇Q_i| |∇L|) over the components Q_i of `law`.

    Q is conserved by the gradient flow of `objective` iff this vanishes everywhere
    (dQ/dt = −⟨∇Q, ∇L⟩). Components whose gradient vanishes at this point are skipped.
    `model` is one model (not an ensemble); parameters of another float dtype are converted
    to float64, with a warning.
    """
    if not isinstance(law, AbstractLaw):
        raise fail("law", law, "must be an `AbstractLaw`",
                   "wrap a function as conservation.FunctionLaw(fn, 'name')")
    if not callable(objective):
        raise fail("objective", objective, "must be callable as objective(model)",
                   "build one with conservation.make_objective(loss, data, model)")
    from .._models.base import Ensemble

    if isinstance(model, Ensemble):
        raise ArgumentError(f"`model` is an Ensemble of {model.size}; pointwise_check takes "
                            "one model: pass ensemble[i].")
    if not isinstance(model, eqx.Module):
        raise fail("model", model, "must be an `equinox.Module`")
    model = model_parameters(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(params):
        raise ArgumentError(f"`model` ({type(model).__name__}) has no floating-point "
                            "parameters: there is no gradient to check against.")
    check_laws((law,), model)
    return _pointwise(law, objective, model)


@eqx.filter_jit
def _pointwise(law, objective, model):
    """`pointwise_check`'s arithmetic as one compiled program per (law, objective, model
    structure): run eagerly it compiled ~70 small programs, one per operation and shape."""
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
