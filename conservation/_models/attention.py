"""Lightning Attention: linear attention with a fixed decay mask, H heads, optional W_O.

    F(X) = Σ_h ((X Q_h)(X K_h)ᵀ ⊙ D)(X V_h) W_O^h,     D_ts = λ^{t−s} [t ≥ s]

(without W_O the heads are concatenated). `causal=False` with λ = 1 gives the seed paper's
bare form X Q Kᵀ Xᵀ X V. Three forms are implemented and agree to round-off: `parallel`
(the formula above), `tiled` (Lightning Attention-2's intra/inter-block algorithm) and
`recurrent` (kv_t = λ kv_{t−1} + k_tᵀ v_t, o_t = q_t kv_t).
"""

import functools
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import AttentionKVLaw, AttentionQKLaw, AttentionVOLaw
from .._validation import ArgumentError, choice, fail, integer, number
from .base import AbstractTensorizableModel, standard_normals
from .linear import _check_random

Form = Literal["parallel", "tiled", "recurrent"]


def _array(name, a) -> Array:
    try:
        a = jnp.asarray(a)
    except TypeError:
        raise fail(name, a, "must be a float array") from None
    # Integer entries would not be parameters (only inexact leaves train): make them float.
    return a if jnp.issubdtype(a.dtype, jnp.inexact) else a.astype(float)


@functools.partial(jax.jit, static_argnums=0)
def _random_projections(shape, key, init_scale):
    """Gaussian Q, K, V (and W_O when `out_dim` is not None) for `shape` = (dim, key_dim,
    value_dim, heads, out_dim): one compiled program per shape (barriers: see
    `linear._random_weights`)."""
    dim, key_dim, value_dim, heads, out_dim = shape
    keys = jax.random.split(key, 4)  # query, key, value, out
    shapes = [(heads, dim, key_dim), (heads, dim, key_dim), (heads, dim, value_dim)]
    if out_dim is not None:
        shapes.append((heads, value_dim, out_dim))
    draws = standard_normals(keys[: len(shapes)], shapes)
    draws = jax.lax.optimization_barrier(tuple(draws) + (None,) * (4 - len(draws)))
    roots = jax.lax.optimization_barrier((jnp.sqrt(dim), jnp.sqrt(value_dim)))
    std, std_out = jax.lax.optimization_barrier(tuple(init_scale / root for root in roots))
    query, key_, value, out = draws
    return (std * query, std * key_, std * value, None if out is None else std_out * out)


class LightningAttention(AbstractTensorizableModel):
    """One Lightning-Attention layer acting on a token matrix X ∈ R^{n×d}.

    Tensorization (seed paper §2.3): ψ(X)_{t,ijk} = Σ_s D_ts X_ti X_sj X_sk and
    Φ_{ijk,μ} = Σ_h (Q_h K_hᵀ)_{ij} (V_h W_O^h)_{kμ}. Laws per head h: Q_hᵀQ_h − K_hᵀK_h,
    ‖K_h‖² − ‖V_h‖², and V_hᵀV_h − W_O^h W_O^hᵀ when there is an output projection.
    """

    query: Float[Array, "heads d r"]
    key: Float[Array, "heads d r"]
    value: Float[Array, "heads d dv"]
    out: Float[Array, "heads dv m"] | None
    decay: float = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    form: Form = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __init__(
        self,
        query: Array,
        key: Array,
        value: Array,
        out: Array | None = None,
        *,
        decay: float = 1.0,
        causal: bool = True,
        form: Form = "parallel",
        block_size: int = 64,
    ):
        """**Arguments:**

        - `query`, `key`: per-head projections, shape (heads, d, r).
        - `value`: shape (heads, d, dv).
        - `out`: optional output projection W_O, shape (heads, dv, m); `None` concatenates heads.
        - `decay`: λ ∈ (0, 1], the decay of the mask D_ts = λ^{t−s}. λ = 1: no decay.
        - `causal`: mask out future tokens (t < s). `causal=False` requires `decay=1`.
        - `form`: how `__call__` evaluates: `"parallel"`, `"tiled"` or `"recurrent"`.
        - `block_size`: the tile size of the tiled form.
        """
        query, key, value = (_array(n, a) for n, a in (("query", query), ("key", key),
                                                       ("value", value)))
        if query.ndim != 3 or key.shape != query.shape:
            raise ArgumentError(
                f"`query` and `key` must both have shape (heads, d, r); got {query.shape} and "
                f"{key.shape}."
            )
        if value.ndim != 3 or value.shape[:2] != query.shape[:2]:
            raise ArgumentError(f"`value` must have shape (heads, d, dv) = {query.shape[:2]} + "
                                f"(dv,), got {value.shape}.")
        if out is not None:
            out = _array("out", out)
            if out.ndim != 3 or out.shape[:2] != (value.shape[0], value.shape[2]):
                raise ArgumentError(f"`out` must have shape (heads, dv, m) = "
                                    f"{(value.shape[0], value.shape[2])} + (m,); got {out.shape}.")
        number("decay", decay, "(0,1]")
        if not isinstance(causal, bool):
            raise fail("causal", causal, "must be True or False")
        if not causal and decay != 1.0:
            raise ArgumentError("`causal=False` needs `decay=1.0`: a decay mask is only causal.")
        choice("form", form, ("parallel", "tiled", "recurrent"))
        block_size = integer("block_size", block_size, minimum=1)
        self.query, self.key, self.value, self.out = query, key, value, out
        self.decay, self.causal, self.form, self.block_size = float(decay), causal, form, block_size

    @classmethod
    def random(
        cls,
        dim: int,
        *,
        key: Key,
        key_dim: int = 1,
        value_dim: int = 1,
        heads: int = 1,
        out_dim: int | None = None,
        init_scale: float = 1.0,
        **kwargs,
    ) -> "LightningAttention":
        """Gaussian Q, K, V (and W_O if `out_dim` is given) with std `init_scale`/√fan_in.

        `kwargs` (`decay`, `causal`, `form`, `block_size`) pass through to the constructor.
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

    def mask(self, n: int) -> Float[Array, "n n"]:
        """D_ts = λ^{t−s} [t ≥ s] (all ones when not causal)."""
        if not self.causal:
            return jnp.ones((n, n))
        t = jnp.arange(n)
        gap = t[:, None] - t[None, :]
        return jnp.where(gap >= 0, self.decay ** jnp.maximum(gap, 0), 0.0)

    def _project(self, x):
        """Per-head q, k, v of shapes (heads, n, ·)."""
        return (jnp.einsum("nd,hdr->hnr", x, w) for w in (self.query, self.key, self.value))

    def _combine_heads(self, o: Float[Array, "heads n dv"]) -> Array:
        if self.out is None:
            return jnp.moveaxis(o, 0, 1).reshape(o.shape[1], -1)
        return jnp.einsum("hnv,hvm->nm", o, self.out)

    def parallel(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        """((XQ)(XK)ᵀ ⊙ D)(XV) W_O: O(n²) memory, the reference form."""
        q, k, v = self._project(x)
        scores = jnp.einsum("hsr,htr->hst", q, k) * self.mask(x.shape[0])[None]
        return self._combine_heads(jnp.einsum("hst,htv->hsv", scores, v))

    def recurrent(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        """kv_t = λ kv_{t−1} + k_tᵀ v_t, o_t = q_t kv_t: O(1) state per token."""
        q, k, v = self._project(x)

        def step(kv, kvt):
            k_t, v_t = kvt
            kv = self.decay * kv + jnp.einsum("hr,hv->hrv", k_t, v_t)
            return kv, kv

        kv0 = jnp.zeros((self.heads, k.shape[-1], v.shape[-1]), x.dtype)
        kv_final, kv_all = jax.lax.scan(step, kv0, (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0)))
        if self.causal:
            o = jnp.einsum("hnr,nhrv->hnv", q, kv_all)
        else:
            o = jnp.einsum("hnr,hrv->hnv", q, kv_final)
        return self._combine_heads(o)

    def tiled(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        """Lightning Attention-2 tiling: exact intra-block products, a carried KV across blocks."""
        n = x.shape[0]
        b = self.block_size
        n_blocks = -(-n // b)
        # Zero tokens appended at the end change no earlier output (causal or not).
        x = jnp.pad(x, ((0, n_blocks * b - n), (0, 0)))
        q, k, v = (a.reshape(self.heads, n_blocks, b, a.shape[-1]) for a in self._project(x))
        q, k, v = (jnp.moveaxis(a, 1, 0) for a in (q, k, v))  # (blocks, heads, b, ·)
        lam = self.decay
        i = jnp.arange(b)
        intra_mask = self.mask(b)
        q_decay = lam ** (i + 1.0)  # Λ = diag(λ, …, λ^b)
        k_decay = lam ** (b - 1.0 - i)  # λ^b Λ^{-1}, computed without dividing by λ^b
        block_decay = lam**b

        if not self.causal:
            kv = jnp.einsum("bhtr,bhtv->hrv", k, v)
            o = jnp.einsum("bhsr,hrv->bhsv", q, kv)
        else:

            def step(kv, blk):
                qb, kb, vb = blk
                scores = jnp.einsum("hsr,htr->hst", qb, kb) * intra_mask[None]
                o_intra = jnp.einsum("hst,htv->hsv", scores, vb)
                o_inter = q_decay[None, :, None] * jnp.einsum("hsr,hrv->hsv", qb, kv)
                kv = block_decay * kv + jnp.einsum("htr,htv->hrv", k_decay[None, :, None] * kb, vb)
                return kv, o_intra + o_inter

            kv0 = jnp.zeros((self.heads, k.shape[-1], v.shape[-1]), x.dtype)
            _, o = jax.lax.scan(step, kv0, (q, k, v))
        o = jnp.moveaxis(o, 0, 1).reshape(self.heads, n_blocks * b, -1)[:, :n]
        return self._combine_heads(o)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        return getattr(self, self.form)(x)

    def features(self, x: Float[Array, "n d"]) -> Float[Array, "n d**3"]:
        pairs = jnp.einsum("sj,sk->sjk", x, x).reshape(x.shape[0], -1)
        mixed = self.mask(x.shape[0]) @ pairs
        return jnp.einsum("ti,tp->tip", x, mixed).reshape(x.shape[0], -1)

    def tensorize(self) -> Float[Array, "d**3 m"]:
        d = self.query.shape[-2]
        if self.out is None:
            phi = jnp.einsum("hir,hjr,hkm->ijkhm", self.query, self.key, self.value)
        else:
            vo = jnp.einsum("hkv,hvm->hkm", self.value, self.out)
            phi = jnp.einsum("hir,hjr,hkm->ijkm", self.query, self.key, vo)
        return phi.reshape(d**3, -1)

    @property
    def feature_degrees(self) -> tuple[int, ...]:
        return (3,)  # ψ_t = x_t ⊗ Σ_s D_ts x_s ⊗ x_s

    def laws(self):
        laws = []
        for h in range(self.heads):
            laws += [AttentionQKLaw(h), AttentionKVLaw(h)]
            if self.out is not None:
                laws.append(AttentionVOLaw(h))
        return tuple(laws)
