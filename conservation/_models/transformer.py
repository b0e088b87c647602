"""Transformer building blocks: softmax attention, feed-forward layers with modern activations,
residual blocks, pre-norm transformer blocks and stacks of blocks, with their laws.

Laws (gradient flow, every data set and loss; Marcotte, Gribonval & Peyré, arXiv 2506.06194,
and "Conservation laws for modern neural architectures", arXiv 2606.17816):

- **softmax attention**, per head h: Q_hᵀQ_h − K_hᵀK_h (GL(r) on the head's query/key pair,
  (Q, K) ↦ (QA, KA⁻ᵀ)) and, with an output projection, V_hᵀV_h − W_O^h W_O^hᵀ ((V, W_O) ↦
  (VB, B⁻¹W_O)); in the paper's row convention (W = our matrix transposed) these are
  QQᵀ − KKᵀ and VVᵀ − OOᵀ. Unlike Lightning Attention there is no ‖K‖² − ‖V‖²: the softmax
  is not homogeneous. With **rotary** encoding only the trace of each 2×2 frequency block of
  Q_hᵀQ_h − K_hᵀK_h survives (`RotaryQKLaw`).
- **feed-forward** W₂σ(W₁x): ReLU keeps one rescale law per hidden neuron, a linear σ the
  whole balance matrix, GELU and SiLU none (σ(cz) ≠ c^k σ(z): no continuous symmetry). Gated
  W₂(σ(W₁x) ⊙ W₃x) (SwiGLU, GeGLU) keeps ‖W₃[i,:]‖² − ‖W₂[:,i]‖² per neuron whatever σ; a
  ReLU gate also keeps ‖W₁[i,:]‖² − ‖W₂[:,i]‖².
- **residual block** x + f(x): the laws of f (Prop. 3.2). A parameter-free norm adds no
  scale law (the skip carries what it normalises); a LayerNorm adds the linear `MeanReadLaw`s
  of the matrices reading it (its output has mean zero).
- **stack of blocks**: the laws of each block alone, none across a skip (Thms 4.6, 4.7).
"""

import functools
import math
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import AttentionQKLaw, AttentionVOLaw, BalanceLaw, NeuronRescaleLaw
from .._laws.blocks import GateRescaleLaw, MeanReadLaw, RotaryQKLaw, within
from .._validation import ArgumentError, choice, fail, integer, number
from .attention import _array, _random_projections
from .base import AbstractModel, standard_normals
from .linear import _check_random

ACTIVATIONS_FFN = {
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),  # z Φ(z), the exact GELU
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "linear": lambda z: z,
}
NORMS = ("layer", "rms", "none")
Norm = Literal["layer", "rms", "none"]


def _flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise fail(name, value, "must be True or False")
    return value


class SoftmaxAttention(AbstractModel):
    """Multi-head softmax attention on a token matrix X ∈ R^{n×d}:

        F(X) = Σ_h softmax((X Q_h)(X K_h)ᵀ / √r + M) (X V_h) W_O^h

    (without W_O the heads' outputs are concatenated, shape (n, heads·dv)). M = −∞ above the
    diagonal when `causal`. `rotary=True` rotates each query/key pair of coordinates
    (2p, 2p+1) of token t by the angle t·ω_p, ω_p = base^{−2p/r} (RoPE).

    Laws per head: `AttentionQKLaw` (or `RotaryQKLaw` with rotary encoding) and, with W_O,
    `AttentionVOLaw`.
    """

    query: Float[Array, "heads d r"]
    key: Float[Array, "heads d r"]
    value: Float[Array, "heads d dv"]
    out: Float[Array, "heads dv m"] | None
    causal: bool = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)
    rotary_base: float = eqx.field(static=True)

    def __init__(self, query: Array, key: Array, value: Array, out: Array | None = None, *,
                 causal: bool = False, rotary: bool = False, rotary_base: float = 10000.0):
        """**Arguments:**

        - `query`, `key`: per-head projections, shape (heads, d, r) (r even with `rotary`).
        - `value`: shape (heads, d, dv); `out`: W_O, shape (heads, dv, m), or None.
        - `causal`: token t attends to tokens s ≤ t only.
        - `rotary`, `rotary_base`: rotary position encoding and its base (> 1).
        """
        query, key, value = (_array(n, a) for n, a in (("query", query), ("key", key),
                                                       ("value", value)))
        if query.ndim != 3 or key.shape != query.shape:
            raise ArgumentError(f"`query` and `key` must both have shape (heads, d, r); got "
                                f"{query.shape} and {key.shape}.")
        if value.ndim != 3 or value.shape[:2] != query.shape[:2]:
            raise ArgumentError(f"`value` must have shape (heads, d, dv) = {query.shape[:2]} + "
                                f"(dv,), got {value.shape}.")
        if out is not None:
            out = _array("out", out)
            if out.ndim != 3 or out.shape[:2] != (value.shape[0], value.shape[2]):
                raise ArgumentError(f"`out` must have shape (heads, dv, m) = "
                                    f"{(value.shape[0], value.shape[2])} + (m,); got {out.shape}.")
        _flag("causal", causal)
        _flag("rotary", rotary)
        number("rotary_base", rotary_base, ">0")
        if rotary_base <= 1:
            raise fail("rotary_base", rotary_base, "must be > 1", "the usual base is 10000")
        if rotary and query.shape[-1] % 2:
            raise fail("query", query.shape, "must have an even key dimension r with "
                       "rotary=True (RoPE rotates pairs of coordinates)")
        self.query, self.key, self.value, self.out = query, key, value, out
        self.causal, self.rotary, self.rotary_base = causal, rotary, float(rotary_base)

    @classmethod
    def random(cls, dim: int, *, key: Key, key_dim: int = 2, value_dim: int = 2,
               heads: int = 1, out_dim: int | None = None, init_scale: float = 1.0,
               **kwargs) -> "SoftmaxAttention":
        """Gaussian Q, K, V (and W_O if `out_dim` is given) with std `init_scale`/√fan_in;
        `kwargs` (`causal`, `rotary`, `rotary_base`) pass through to the constructor.

        Example: `SoftmaxAttention.random(4, key=jax.random.PRNGKey(0), heads=2, out_dim=4)`.
        """
        for name, v in (("dim", dim), ("key_dim", key_dim), ("value_dim", value_dim),
                        ("heads", heads)):
            integer(name, v, minimum=1)
        if out_dim is not None:
            integer("out_dim", out_dim, minimum=1)
        _check_random(key, init_scale)
        query, key_, value, out = _random_projections(
            (dim, key_dim, value_dim, heads, out_dim), key, init_scale)
        return cls(query, key_, value, out, **kwargs)

    @property
    def heads(self) -> int:
        return self.query.shape[-3]

    def frequencies(self) -> Float[Array, " pairs"]:
        """ω_p = base^{−2p/r}, p = 0 … r/2 − 1 (the rotary frequencies)."""
        r = self.query.shape[-1]
        return self.rotary_base ** (-2.0 * jnp.arange(r // 2) / r)

    def _rotate(self, q: Float[Array, "heads n r"]) -> Float[Array, "heads n r"]:
        n, r = q.shape[-2], q.shape[-1]
        angle = jnp.arange(n)[:, None] * self.frequencies()[None, :]  # (n, pairs)
        lead = (1,) * (q.ndim - 2)  # explicit broadcast over the heads
        cos, sin = jnp.cos(angle).reshape(lead + angle.shape), jnp.sin(angle).reshape(
            lead + angle.shape)
        pairs = q.reshape(*q.shape[:-1], r // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(q.shape)

    def scores(self, x: Float[Array, "n d"]) -> Float[Array, "heads n n"]:
        """The attention weights softmax(q_t · k_s / √r) per head (rows sum to 1)."""
        q = jnp.einsum("nd,hdr->hnr", x, self.query)
        k = jnp.einsum("nd,hdr->hnr", x, self.key)
        if self.rotary:
            q, k = self._rotate(q), self._rotate(k)
        logits = jnp.einsum("htr,hsr->hts", q, k) / math.sqrt(q.shape[-1])
        if self.causal:
            n = x.shape[0]
            # Masked logits get a finite −∞ stand-in: exp underflows to exactly 0, and no inf
            # enters the backward pass (inf · 0 would make the gradient NaN).
            below = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(below[None], logits, jnp.finfo(logits.dtype).min)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        v = jnp.einsum("nd,hdv->hnv", x, self.value)
        o = jnp.einsum("hts,hsv->htv", self.scores(x), v)
        if self.out is None:
            return jnp.moveaxis(o, 0, 1).reshape(x.shape[0], -1)
        return jnp.einsum("hnv,hvm->nm", o, self.out)

    def laws(self):
        laws = []
        for h in range(self.heads):
            laws.append(RotaryQKLaw(h) if self.rotary else AttentionQKLaw(h))
            if self.out is not None:
                laws.append(AttentionVOLaw(h))
        return tuple(laws)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_ffn(widths, gated, key, init_scale):
    """W₁ (h, d), W₂ (m, h) and, when `gated`, W₃ (h, d), std init_scale/√fan_in: one compiled
    program per (widths, gated)."""
    d, h, m = widths
    shapes = [(h, d), (m, h)] + ([(h, d)] if gated else [])
    draws = standard_normals(jax.random.split(key, len(shapes)), shapes)
    stds = [init_scale / jnp.sqrt(float(s[1])) for s in shapes]
    draws = [s * w for s, w in zip(stds, draws)]
    return (draws[0], draws[1]), (draws[2] if gated else None)


class FeedForward(AbstractModel):
    """x ↦ W₂ σ(W₁ x), or gated x ↦ W₂ (σ(W₁ x) ⊙ W₃ x) (SwiGLU: σ = SiLU, GeGLU: GELU),
    bias-free, acting on vectors (a transformer block applies it to every token).

    Laws: ReLU: `NeuronRescaleLaw(0, 1)`; linear: `BalanceLaw(0)`; GELU/SiLU: none; gated:
    `GateRescaleLaw()` (plus `NeuronRescaleLaw(0, 1)` for a ReLU or linear gate).
    """

    weights: tuple[Float[Array, "h d"], Float[Array, "m h"]]
    gate: Float[Array, "h d"] | None
    activation: str = eqx.field(static=True)

    def __init__(self, weights: Sequence[Array], gate: Array | None = None, *,
                 activation: str = "gelu"):
        """**Arguments:** `weights` = (W₁, W₂) of shapes (h, d), (m, h); `gate` = W₃, shape
        (h, d), or None; `activation`: "gelu", "silu", "relu" or "linear"."""
        if isinstance(weights, str | bytes) or not isinstance(weights, Sequence) or \
                len(weights) != 2:
            raise fail("weights", weights, "must be a pair (W₁, W₂) of matrices")
        w1, w2 = (_array(f"weights[{i}]", w) for i, w in enumerate(weights))
        if w1.ndim != 2 or w2.ndim != 2 or w2.shape[1] != w1.shape[0]:
            raise ArgumentError(f"`weights` must be W₁ (h, d) and W₂ (m, h); got shapes "
                                f"{w1.shape} and {w2.shape}.")
        if gate is not None:
            gate = _array("gate", gate)
            if gate.shape != w1.shape:
                raise ArgumentError(f"`gate` (W₃) must have W₁'s shape {w1.shape}, got "
                                    f"{gate.shape}.")
        choice("activation", activation, tuple(ACTIVATIONS_FFN))
        self.weights, self.gate, self.activation = (w1, w2), gate, activation

    @classmethod
    def random(cls, widths: Sequence[int], *, key: Key, activation: str = "gelu",
               gated: bool = False, init_scale: float = 1.0) -> "FeedForward":
        """Gaussian W₁, W₂ (and W₃ when `gated`) with std `init_scale`/√fan_in for `widths` =
        (d, h, m).

        Example: `FeedForward.random((4, 8, 4), key=jax.random.PRNGKey(0),
        activation="silu", gated=True)` (SwiGLU)."""
        if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or \
                len(widths) != 3:
            raise fail("widths", widths, "must be (d, h, m): input, hidden, output widths")
        widths = tuple(integer("widths", w, minimum=1) for w in widths)
        choice("activation", activation, tuple(ACTIVATIONS_FFN))
        _flag("gated", gated)
        _check_random(key, init_scale)
        weights, gate = _random_ffn(widths, gated, key, init_scale)
        return cls(weights, gate, activation=activation)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " m"]:
        h = ACTIVATIONS_FFN[self.activation](self.weights[0] @ x)
        if self.gate is not None:
            h = h * (self.gate @ x)
        return self.weights[1] @ h

    def laws(self):
        homogeneous = self.activation in ("relu", "linear")
        if self.gate is not None:
            return (GateRescaleLaw(),) + ((NeuronRescaleLaw(0, 1),) if homogeneous else ())
        if self.activation == "linear":
            return (BalanceLaw(0),)
        return (NeuronRescaleLaw(0, 1),) if homogeneous else ()


def normalize(x: Float[Array, "... d"], norm: str, eps: float = 1e-6) -> Float[Array, "... d"]:
    """A parameter-free norm over the last axis: "layer" (x − mean)/√(var + ε), "rms"
    x/√(mean x² + ε), or "none"."""
    if norm == "layer":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    if norm == "none":
        return x
    return x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + eps)


def _mean_read_laws(module, path) -> tuple[MeanReadLaw, ...]:
    """The `MeanReadLaw`s of the matrices of `module` (at `path`) that read a LayerNorm's
    output: an attention's Q, K, V (axis d), a feed-forward layer's W₁ and gate W₃."""
    if isinstance(module, SoftmaxAttention):
        return tuple(MeanReadLaw(path + (name,), -2) for name in ("query", "key", "value"))
    if isinstance(module, FeedForward):
        return (MeanReadLaw(path + ("weights", 0), -1),) + (
            (MeanReadLaw(path + ("gate",), -1),) if module.gate is not None else ())
    return ()


class ResidualBlock(AbstractModel):
    """x ↦ x + f(N(x)) with f any model whose output has its input's shape and N a
    parameter-free norm (`"none"` by default). Laws: those of f (on `inner`), and with
    `norm="layer"` the `MeanReadLaw`s of f's first matrices when f is a conservation
    `FeedForward` or `SoftmaxAttention`.

    Example: `ResidualBlock(FeedForward.random((3, 4, 3), key=key, activation="relu"))`."""

    inner: eqx.Module
    norm: str = eqx.field(static=True)

    def __init__(self, inner: eqx.Module, *, norm: Norm = "none"):
        if not isinstance(inner, eqx.Module):
            raise fail("inner", inner, "must be an `equinox.Module` (the block's f)")
        choice("norm", norm, NORMS)
        self.inner, self.norm = inner, norm

    def __call__(self, x: Array) -> Array:
        y = self.inner(normalize(x, self.norm))
        if y.shape != x.shape:
            raise ArgumentError(f"a residual block needs f(x) of x's shape {x.shape}, got "
                                f"{y.shape}: give f output width = input width.")
        return x + y

    def laws(self):
        laws = self.inner.laws() if isinstance(self.inner, AbstractModel) else ()
        return within(laws, "inner") + (_mean_read_laws(self.inner, ("inner",))
                                        if self.norm == "layer" else ())


class TransformerBlock(AbstractModel):
    """A pre-norm transformer block on X ∈ R^{n×d}:

        Y = X + Attn(N(X)),     Z = Y + FFN(N(Y))   (the FFN on every token)

    with N a parameter-free LayerNorm or RMSNorm (no affine gain: with a gain the laws would
    involve it). Laws: the attention's and the FFN's, each on its own sub-module. The norm
    adds no scale law, since what it normalises is carried by the skip connection; a
    LayerNorm (mean-zero output) adds the linear `MeanReadLaw`s of the matrices reading it:
    1ᵀQ_h, 1ᵀK_h, 1ᵀV_h, W₁1 (and W₃1), which get no gradient.
    """

    attention: SoftmaxAttention
    ffn: FeedForward
    norm: str = eqx.field(static=True)

    def __init__(self, attention: SoftmaxAttention, ffn: FeedForward, *, norm: Norm = "layer"):
        if not isinstance(attention, SoftmaxAttention) or attention.out is None:
            raise fail("attention", type(attention).__name__, "must be a SoftmaxAttention with "
                       "an output projection (out_dim = d)")
        if not isinstance(ffn, FeedForward):
            raise fail("ffn", type(ffn).__name__, "must be a FeedForward")
        d = attention.query.shape[-2]
        if attention.out.shape[-1] != d or ffn.weights[0].shape[1] != d or \
                ffn.weights[1].shape[0] != d:
            raise ArgumentError(f"a transformer block keeps the width d = {d}: the attention's "
                                f"out_dim ({attention.out.shape[-1]}) and the FFN's input and "
                                f"output widths ({ffn.weights[0].shape[1]}, "
                                f"{ffn.weights[1].shape[0]}) must equal d.")
        choice("norm", norm, NORMS)
        self.attention, self.ffn, self.norm = attention, ffn, norm

    @classmethod
    def random(cls, dim: int, *, key: Key, heads: int = 1, key_dim: int = 2,
               value_dim: int = 2, hidden: int = 8, activation: str = "gelu",
               gated: bool = False, norm: Norm = "layer", init_scale: float = 1.0,
               **attention_kwargs) -> "TransformerBlock":
        """A block of width `dim` with random attention (`heads`, `key_dim`, `value_dim`;
        `attention_kwargs`: `causal`, `rotary`, `rotary_base`) and FFN (`hidden`,
        `activation`, `gated`).

        Example: `TransformerBlock.random(4, key=jax.random.PRNGKey(0), heads=2,
        activation="silu", gated=True, causal=True)`."""
        integer("dim", dim, minimum=1)
        integer("hidden", hidden, minimum=1)
        _check_random(key, init_scale)
        k_att, k_ffn = jax.random.split(key)
        attention = SoftmaxAttention.random(dim, key=k_att, key_dim=key_dim,
                                            value_dim=value_dim, heads=heads, out_dim=dim,
                                            init_scale=init_scale, **attention_kwargs)
        ffn = FeedForward.random((dim, hidden, dim), key=k_ffn, activation=activation,
                                 gated=gated, init_scale=init_scale)
        return cls(attention, ffn, norm=norm)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        y = x + self.attention(normalize(x, self.norm))
        return y + jax.vmap(self.ffn)(normalize(y, self.norm))

    def laws(self):
        laws = within(self.attention.laws(), "attention") + within(self.ffn.laws(), "ffn")
        if self.norm == "layer":
            laws += (_mean_read_laws(self.attention, ("attention",))
                     + _mean_read_laws(self.ffn, ("ffn",)))
        return laws


class BlockStack(AbstractModel):
    """Blocks applied in turn, x ↦ B_L(⋯ B_1(x)) (residual or transformer blocks). Laws: the
    laws of each block alone (`SubmodelLaw`s on `blocks[i]`); a deep residual network has no
    law across a skip connection (Marcotte et al., Thm 4.7).

    Example: `BlockStack.random(2, 4, key=key, heads=2)` (two transformer blocks)."""

    blocks: tuple[eqx.Module, ...]

    def __init__(self, blocks: Sequence[eqx.Module]):
        if isinstance(blocks, eqx.Module) or not isinstance(blocks, Sequence) or not blocks:
            raise fail("blocks", blocks, "must be a non-empty list of blocks")
        for i, b in enumerate(blocks):
            if not isinstance(b, eqx.Module):
                raise fail(f"blocks[{i}]", b, "must be an `equinox.Module`")
        self.blocks = tuple(blocks)

    @classmethod
    def random(cls, depth: int, dim: int, *, key: Key, **block_kwargs) -> "BlockStack":
        """`depth` random `TransformerBlock`s of width `dim` (`block_kwargs` as
        `TransformerBlock.random`), from independent keys."""
        depth = integer("depth", depth, minimum=1)
        keys = jax.random.split(key, depth)
        return cls([TransformerBlock.random(dim, key=k, **block_kwargs) for k in keys])

    def __call__(self, x: Array) -> Array:
        for block in self.blocks:
            x = block(x)
        return x

    def laws(self):
        laws = ()
        for i, block in enumerate(self.blocks):
            if isinstance(block, AbstractModel):
                laws += within(block.laws(), "blocks", i)
        return laws
