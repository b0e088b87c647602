"""Laws of the building blocks of transformers: rotary query/key pairs, gated feed-forward
layers, and the laws of one block of a composite model (a residual block, a transformer block,
a stack of blocks), evaluated on that block alone.

- `RotaryQKLaw`: with rotary position encoding the score between tokens t and s is
  x_t W_Q R((s − t)ω) W_Kᵀ x_sᵀ, so (W_Q, W_K) ↦ (W_Q A, W_K A⁻ᵀ) is a symmetry only for the
  A commuting with every rotation R(kω): per frequency pair a I + b J. Its symmetric part
  a I gives one law per pair, ‖W_Q[:, pair]‖² − ‖W_K[:, pair]‖²; the rotations b J give none
  under gradient flow (an antisymmetric generator has no moment map ½⟨θ, Gθ⟩ that is conserved).
- `GateRescaleLaw`: W₂(σ(W₁x) ⊙ W₃x) is invariant under scaling row i of W₃ by c and column
  i of W₂ by 1/c whatever σ is: ‖W₃[i,:]‖² − ‖W₂[:,i]‖² per hidden neuron.
- `SubmodelLaw`: a law of the sub-module at `path` (attribute names and indices), e.g.
  `("blocks", 1, "attention")`; its value is the inner law on that sub-module.
"""

import equinox as eqx
import jax.numpy as jnp

from .._custom_types import Array, Float
from .._validation import ArgumentError, fail, integer
from .base import AbstractLaw, law_mismatch


class RotaryQKLaw(AbstractLaw):
    """Per rotary frequency pair p of head `head`: ‖Q_h[:, 2p:2p+2]‖² − ‖K_h[:, 2p:2p+2]‖²
    (the part of Q_hᵀQ_h − K_hᵀK_h that survives rotary position encoding: the trace of each
    2×2 diagonal block)."""

    head: int = eqx.field(static=True)

    def __check_init__(self):
        integer("head", self.head, minimum=0)

    @property
    def name(self) -> str:
        return f"rotary_qk[{self.head}]"

    def check(self, model) -> None:
        for name in ("query", "key"):
            if getattr(model, name, None) is None:
                raise law_mismatch(self, model, f"it has no `{name}` projection")
        heads, r = model.query.shape[-3], model.query.shape[-1]
        if self.head >= heads:
            raise law_mismatch(self, model, f"it reads head {self.head} but the model has "
                                            f"{heads} heads")
        if r % 2:
            raise law_mismatch(self, model, f"the key dimension {r} is odd (rotary encoding "
                                            "rotates pairs of coordinates)")

    def _terms(self, model):
        self.check(model)
        q, k = model.query[self.head], model.key[self.head]
        pairs = q.shape[-1] // 2
        q2 = jnp.sum(q.reshape(q.shape[0], pairs, 2) ** 2, axis=(0, 2))
        k2 = jnp.sum(k.reshape(k.shape[0], pairs, 2) ** 2, axis=(0, 2))
        return q2, k2

    def __call__(self, model) -> Float[Array, " pairs"]:
        q2, k2 = self._terms(model)
        return q2 - k2

    def scale(self, model) -> Float[Array, " pairs"]:
        q2, k2 = self._terms(model)
        return q2 + k2


class GateRescaleLaw(AbstractLaw):
    """Per hidden neuron i of a gated feed-forward layer W₂(σ(W₁x) ⊙ W₃x):
    ‖W₃[i,:]‖² − ‖W₂[:,i]‖² (W₃ = `model.gate`, W₂ = `model.weights[1]`)."""

    @property
    def name(self) -> str:
        return "gate_rescale"

    def check(self, model) -> None:
        if getattr(model, "gate", None) is None:
            raise law_mismatch(self, model, "it has no `gate` (W₃) matrix",
                               "gated laws apply to gated feed-forward layers (SwiGLU, GeGLU)")
        weights = getattr(model, "weights", None)
        if not isinstance(weights, tuple | list) or len(weights) != 2:
            raise law_mismatch(self, model, "it has no `weights` pair (W₁, W₂)")

    def _terms(self, model):
        self.check(model)
        return jnp.sum(model.gate**2, axis=1), jnp.sum(model.weights[1] ** 2, axis=0)

    def __call__(self, model) -> Float[Array, " h"]:
        gate, out = self._terms(model)
        return gate - out

    def scale(self, model) -> Float[Array, " h"]:
        gate, out = self._terms(model)
        return gate + out


def _path_text(path) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else p)
    return text


class SubmodelLaw(AbstractLaw):
    """`law` evaluated on the sub-module of a composite model at `path` (a tuple of attribute
    names and integer indices): the laws of one block of a residual network or transformer.

    Example: `SubmodelLaw(AttentionQKLaw(0), ("blocks", 1, "attention"))` is Q₀ᵀQ₀ − K₀ᵀK₀ of
    the attention of block 1 of a `BlockStack`."""

    law: AbstractLaw
    path: tuple[str | int, ...] = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.law, AbstractLaw):
            raise fail("law", self.law, "must be an `AbstractLaw`")
        if not isinstance(self.path, tuple) or not self.path or not all(
                (isinstance(p, str) and p) or (isinstance(p, int) and not isinstance(p, bool)
                                               and p >= 0) for p in self.path):
            raise fail("path", self.path, "must be a non-empty tuple of attribute names and "
                       "indices ≥ 0", 'e.g. ("blocks", 0, "attention")')

    @property
    def name(self) -> str:
        return f"{_path_text(self.path)}.{self.law.name}"

    @property
    def relative(self) -> bool:  # type: ignore[override]
        return self.law.relative

    def within(self, *prefix: str | int) -> "SubmodelLaw":
        """This law seen from a model that holds the current one at `prefix`."""
        return SubmodelLaw(self.law, tuple(prefix) + self.path)

    def submodel(self, model):
        """The sub-module at `path` (raises an `ArgumentError` naming the law when absent)."""
        node = model
        for i, p in enumerate(self.path):
            try:
                node = getattr(node, p) if isinstance(p, str) else node[p]
            except (AttributeError, IndexError, TypeError, KeyError):
                raise law_mismatch(self, model, f"it has no "
                                                f"{_path_text(self.path[:i + 1])}") from None
        return node

    def check(self, model) -> None:
        sub = self.submodel(model)
        try:
            self.law.check(sub)
        except ArgumentError as e:
            raise law_mismatch(self, model, f"on {_path_text(self.path)}: {e}") from None

    def __call__(self, model) -> Array:
        return self.law(self.submodel(model))

    def scale(self, model) -> Array:
        return self.law.scale(self.submodel(model))

    def drift(self, value, reference, scale):
        return self.law.drift(value, reference, scale)

    def condition(self, model):
        return self.law.condition(self.submodel(model))


def within(laws, *prefix: str | int) -> tuple[AbstractLaw, ...]:
    """`laws` of a sub-module seen from the model that holds it at `prefix`."""
    return tuple(law.within(*prefix) if isinstance(law, SubmodelLaw)
                 else SubmodelLaw(law, tuple(prefix)) for law in laws)


class MeanReadLaw(AbstractLaw):
    """Σ_j W_{…j…} along `axis` of the matrix at `path` that reads the output of a LayerNorm
    without affine (one number per remaining entry): LayerNorm's output has zero mean, so the
    loss never sees W's component along the all-ones direction, it gets no gradient and stays
    put (a linear law, like translation). RMSNorm has no such law.

    Example: `MeanReadLaw(("attention", "query"), -2)`: 1ᵀQ_h of every head of a pre-norm
    block, shape (heads, r)."""

    path: tuple[str | int, ...] = eqx.field(static=True)
    axis: int = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.path, tuple) or not self.path:
            raise fail("path", self.path, "must be a non-empty tuple of attribute names and "
                       "indices", 'e.g. ("ffn", "weights", 0)')
        integer("axis", self.axis)

    @property
    def name(self) -> str:
        return f"mean_read({_path_text(self.path)})"

    relative = True

    def _array(self, model):
        node = model
        for i, p in enumerate(self.path):
            try:
                node = getattr(node, p) if isinstance(p, str) else node[p]
            except (AttributeError, IndexError, TypeError, KeyError):
                raise law_mismatch(self, model, f"it has no "
                                                f"{_path_text(self.path[:i + 1])}") from None
        if not hasattr(node, "ndim") or not -node.ndim <= self.axis < node.ndim:
            raise law_mismatch(self, model, f"{_path_text(self.path)} has no axis {self.axis}")
        return node

    def check(self, model) -> None:
        self._array(model)

    def __call__(self, model) -> Array:
        return jnp.sum(self._array(model), axis=self.axis)

    def scale(self, model) -> Array:
        # The natural size of a sum of entries: the norm of the entries summed.
        return jnp.sqrt(jnp.sum(self._array(model) ** 2, axis=self.axis))
