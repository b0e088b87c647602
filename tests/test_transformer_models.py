"""Softmax attention, feed-forward layers (GELU/SiLU/SwiGLU), residual and transformer blocks:
outputs against numpy reimplementations, their laws pointwise (gradients from jax, inner
products in numpy) and along a flow, near-miss controls that must drift, and law counts
against the closed forms of Marcotte, Gribonval & Peyré (arXiv 2506.06194) and our derivation
for rotary encoding."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import conservation as cn
from conservation._laws.blocks import GateRescaleLaw, MeanReadLaw, RotaryQKLaw, SubmodelLaw
from conservation._models.transformer import (
    BlockStack,
    FeedForward,
    ResidualBlock,
    SoftmaxAttention,
    TransformerBlock,
)

KEY = jax.random.PRNGKey(7)


# ---------------------------------------------------------------- numpy references

def _np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _np_rope(q, base):
    n, r = q.shape
    out = q.copy()
    for t in range(n):
        for p in range(r // 2):
            a = t * base ** (-2 * p / r)
            c, s = np.cos(a), np.sin(a)
            x, y = q[t, 2 * p], q[t, 2 * p + 1]
            out[t, 2 * p], out[t, 2 * p + 1] = c * x - s * y, s * x + c * y
    return out


def _np_attention(m, x):
    qs, ks, vs = (np.asarray(a) for a in (m.query, m.key, m.value))
    outs = []
    n = x.shape[0]
    for h in range(qs.shape[0]):
        q, k = x @ qs[h], x @ ks[h]
        if m.rotary:
            q, k = _np_rope(q, m.rotary_base), _np_rope(k, m.rotary_base)
        logits = q @ k.T / np.sqrt(q.shape[1])
        if m.causal:
            logits = np.where(np.tril(np.ones((n, n))) > 0, logits, -np.inf)
        o = _np_softmax(logits) @ (x @ vs[h])
        outs.append(o if m.out is None else o @ np.asarray(m.out[h]))
    return np.concatenate(outs, axis=1) if m.out is None else sum(outs)


def _np_ffn(f, x):
    w1, w2 = (np.asarray(w) for w in f.weights)
    z = w1 @ x
    act = {"gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))),
           "silu": lambda z: z / (1 + np.exp(-z)),
           "relu": lambda z: np.maximum(z, 0), "linear": lambda z: z}[f.activation]
    h = act(z) if f.gate is None else act(z) * (np.asarray(f.gate) @ x)
    return w2 @ h


def _np_norm(x, norm):
    if norm == "layer":
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) if norm != "none" else x


def _np_block(b, x):
    y = x + _np_attention(b.attention, _np_norm(x, b.norm))
    return y + np.stack([_np_ffn(b.ffn, t) for t in _np_norm(y, b.norm)])


@pytest.fixture(scope="module")
def tokens():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 4)))


@pytest.mark.parametrize("kwargs", [dict(heads=2, causal=True),  # heads concatenated
                                    dict(heads=2, out_dim=3, causal=True, rotary=True,
                                         rotary_base=10.0)])
def test_softmax_attention_matches_numpy(tokens, kwargs):
    m = SoftmaxAttention.random(4, key=KEY, key_dim=4, value_dim=3, **kwargs)
    got = np.asarray(m(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _np_attention(m, tokens), rtol=1e-12, atol=1e-13)
    # The causal mask is real: the first token's output depends on it alone.
    if m.causal:
        moved = tokens.copy()
        moved[1:] += 1.0
        np.testing.assert_allclose(np.asarray(m(jnp.asarray(moved)))[0], got[0], rtol=1e-13)


def test_ffn_and_block_match_numpy(tokens):
    x = tokens[0]
    for activation, gated in (("gelu", False), ("silu", True), ("relu", False)):
        f = FeedForward.random((4, 6, 3), key=KEY, activation=activation, gated=gated)
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), _np_ffn(f, x),
                                   rtol=1e-12, atol=1e-14)
    for norm in ("layer", "rms"):
        b = TransformerBlock.random(4, key=KEY, heads=2, hidden=5, activation="silu",
                                    gated=True, norm=norm, causal=True)
        np.testing.assert_allclose(np.asarray(b(jnp.asarray(tokens))), _np_block(b, tokens),
                                   rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- pointwise, in numpy

def _cosines(model, objective, laws):
    """Per law: the worst |⟨∇Q_i, ∇L⟩| / (‖∇Q_i‖‖∇L‖) over its components; the gradients
    from jax (one compiled program), the inner products in numpy."""
    flat, unravel = jfu.ravel_pytree(model)  # every leaf of these models is a parameter

    @jax.jit
    def gradients(p):
        values = lambda q: jnp.concatenate([jnp.ravel(law(unravel(q))) for law in laws])  # noqa: E731
        return jax.grad(lambda q: objective(unravel(q)))(p), jax.jacrev(values)(p)

    sizes = [int(np.size(jax.eval_shape(law, model))) for law in laws]
    grad_l, jac = (np.asarray(a) for a in gradients(flat))
    worst = []
    for rows in np.split(jac, np.cumsum(sizes)[:-1]):
        norms = np.linalg.norm(rows, axis=1)
        keep = norms > 1e-12 * norms.max()
        worst.append(float(np.max(np.abs(rows[keep] @ grad_l)
                                  / (norms[keep] * np.linalg.norm(grad_l)))))
    return np.array(worst)


def _objective(model, key, n=6, tokens=4, dim=4, loss=None):
    x = jax.random.normal(key, (n, tokens, dim))
    y = jax.random.normal(jax.random.fold_in(key, 1), jax.eval_shape(jax.vmap(model), x).shape)
    return cn.make_objective(loss or cn.MSE(), cn.Dataset(x, y), model)


def _near_qk(path=()):
    """Q₀ᵀQ₀ − 0.9 K₀ᵀK₀: a near miss of the query/key law."""
    def fn(m):
        for p in path:
            m = getattr(m, p)
        return m.query[0].T @ m.query[0] - 0.9 * m.key[0].T @ m.key[0]
    return cn.FunctionLaw(fn, "near_qk")


def test_attention_laws_hold_pointwise_and_near_misses_do_not():
    plain = SoftmaxAttention.random(4, key=KEY, heads=2, key_dim=2, value_dim=2, out_dim=4,
                                    causal=True)
    rope = SoftmaxAttention.random(4, key=KEY, heads=2, key_dim=4, value_dim=2,
                                   rotary=True, rotary_base=10.0)
    for model, loss in ((plain, cn.MSE()), (rope, cn.LogCosh())):
        objective = _objective(model, jax.random.PRNGKey(11), loss=loss)
        # Near misses: a mis-weighted QK law; Lightning's ‖K‖² − ‖V‖² (softmax is not
        # homogeneous); with RoPE, the full Q₀ᵀQ₀ − K₀ᵀK₀ (only its 2×2 traces survive).
        controls = [_near_qk(), cn.AttentionKVLaw(0)]
        if model.rotary:
            controls.append(cn.AttentionQKLaw(0))
        laws = model.laws()
        cos = _cosines(model, objective, laws + tuple(controls))
        held, broken = cos[:len(laws)], cos[len(laws):]
        assert held.max() < 1e-10, held
        assert broken.min() > 1e-3, broken
    # RoPE's law is the traces of the 2×2 diagonal blocks of the broken matrix law.
    full = np.asarray(cn.AttentionQKLaw(1)(rope))
    np.testing.assert_allclose(np.asarray(RotaryQKLaw(1)(rope)),
                               [full[0, 0] + full[1, 1], full[2, 2] + full[3, 3]], rtol=1e-13)


def test_ffn_laws_hold_pointwise_and_rescale_dies_with_smooth_activations():
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 3))
    y = jax.random.normal(jax.random.PRNGKey(6), (8, 2))
    rescale = cn.NeuronRescaleLaw(0, 1)
    for activation, gated in (("relu", False), ("gelu", False), ("silu", True), ("relu", True)):
        f = FeedForward.random((3, 4, 2), key=KEY, activation=activation, gated=gated)
        laws = f.laws()
        assert bool(laws) == (activation == "relu" or gated)
        # The per-neuron rescale law of W₁ against W₂ is the near miss wherever σ is smooth.
        controls = () if activation == "relu" else (rescale,)
        assert not set(controls) & set(laws)
        cos = _cosines(f, cn.make_objective(cn.MSE(), cn.Dataset(x, y), f), laws + controls)
        assert cos[:len(laws)].max(initial=0) < 1e-10, (activation, gated, cos)
        assert cos[len(laws):].min(initial=1) > 1e-3, (activation, gated, cos)


def test_block_and_stack_laws_are_block_local():
    stack = BlockStack.random(2, 3, key=KEY, hidden=2, activation="silu", gated=True,
                              causal=True)
    laws = stack.laws()
    names = [law.name for law in laws]
    assert "blocks[1].attention.qk[0]" in names and "blocks[0].ffn.gate_rescale" in names
    assert "blocks[1].mean_read(ffn.gate)" in names
    # Across a skip: block 0's FFN output columns against block 1's query rows (a balance
    # law that would hold without the skip and the norm) is not conserved; nor is a
    # LayerNorm law on an RMSNorm block.
    def straddle(m):
        return (jnp.sum(m.blocks[0].ffn.weights[1] ** 2)
                - jnp.sum(m.blocks[1].attention.query ** 2))

    objective = _objective(stack, jax.random.PRNGKey(12), dim=3)
    cos = _cosines(stack, objective, laws + (cn.FunctionLaw(straddle, "straddle"),))
    assert cos[:-1].max() < 1e-10, cos
    rms = TransformerBlock.random(3, key=KEY, hidden=2, norm="rms")
    assert not any("mean_read" in law.name for law in rms.laws())
    broken = [cos[-1], _cosines(rms, _objective(rms, jax.random.PRNGKey(13), dim=3),
                                [MeanReadLaw(("attention", "query"), -2)])[0]]
    assert min(broken) > 1e-3, broken


def _flow_drifts(model, controls, t1, key):
    objective = _objective(model, key, dim=3)
    laws = tuple(model.laws())
    result = cn.gradient_flow(objective, model, t1, laws=laws + tuple(controls), rtol=1e-10,
                              n_save=3, solver="tsit5")
    assert result.status_names() == ["success"]
    assert float(result.loss[0, -1]) < 0.9 * float(result.loss[0, 0])  # it really trained
    held = {law.name: float(result.max_drift[law.name][0]) for law in laws}
    return held, [float(result.max_drift[c.name][0]) for c in controls]


def test_attention_laws_hold_along_a_flow_and_near_misses_drift():
    m = SoftmaxAttention.random(3, key=KEY, key_dim=4, value_dim=2, out_dim=3, causal=True,
                                rotary=True, rotary_base=10.0)
    held, drifts = _flow_drifts(m, [_near_qk(), cn.AttentionQKLaw(0)], 0.5,
                                jax.random.PRNGKey(21))
    assert max(held.values()) < 1e-8, held
    assert min(drifts) > 1e-4, drifts


@pytest.mark.slow
def test_block_laws_hold_along_a_flow_and_near_misses_drift():
    block = TransformerBlock.random(3, key=KEY, heads=2, hidden=3, activation="silu",
                                    gated=True, causal=True)
    controls = [SubmodelLaw(_near_qk(), ("attention",)),
                SubmodelLaw(cn.NeuronRescaleLaw(0, 1), ("ffn",))]
    held, drifts = _flow_drifts(block, controls, 0.2, jax.random.PRNGKey(21))
    assert max(held.values()) < 1e-8, held
    assert min(drifts) > 1e-4, drifts


# ---------------------------------------------------------------- counts vs closed forms

def _count(model, expected, **kwargs):
    """count_laws with the target rank D − `expected` (the papers' count, not the model's
    laws): reaching it bounds the laws above by `expected`; the pointwise tests bound them
    below."""
    dim = jfu.ravel_pytree(model)[0].size
    return cn.count_laws(model, cn.MSE(), target_rank=dim - expected, **kwargs)


@pytest.mark.parametrize("activation, gated, expected", [
    ("gelu", False, 0),   # no continuous symmetry
    ("relu", False, 4),   # one rescale per hidden neuron (Abide Cor. 4.4)
    ("silu", True, 4),    # SwiGLU: one gate rescale per neuron
    ("relu", True, 8),    # ReGLU: gate and input rescales
])
def test_ffn_counts(activation, gated, expected):
    f = FeedForward.random((3, 4, 2), key=KEY, activation=activation, gated=gated)
    c = _count(f, expected)
    assert (c.laws, c.verdict, c.known) == (expected, "proved", expected), c.describe()


@pytest.mark.parametrize("rotary, expected", [
    # r(r+1)/2 + dv(dv+1)/2 with r = dv = 2: Marcotte et al. Cor. 3.9, d₁(d₁+1)
    pytest.param(False, 6, marks=pytest.mark.slow),
    (True, 4),   # RoPE: r/2 = 1 pair law + the VO law's 3
])
def test_single_head_attention_counts(rotary, expected):
    m = SoftmaxAttention.random(3, key=jax.random.PRNGKey(1), key_dim=2, value_dim=2,
                                out_dim=3, rotary=rotary, rotary_base=10.0)
    c = _count(m, expected, input_shape=(3, 3))
    assert (c.laws, c.verdict, c.known) == (expected, "proved", expected), c.describe()


def test_residual_stack_has_only_block_laws():
    # Two residual ReLU blocks x + W₂σ(W₁x) on R²: 3 + 3 rescale laws and none straddling
    # the skip (Thm 4.7; §4.4: m > 1 has no laws beyond the block laws).
    keys = jax.random.split(KEY, 2)
    stack = BlockStack([ResidualBlock(FeedForward.random((2, 3, 2), key=k, activation="relu"))
                        for k in keys])
    c = _count(stack, 6, input_shape=(2,))
    assert (c.laws, c.verdict, c.known) == (6, "proved", 6), c.describe()


@pytest.mark.slow
@pytest.mark.parametrize("norm, expected", [
    # attention r(r+1)/2 + dv(dv+1)/2 = 6; GELU FFN 0; LayerNorm: 1ᵀQ, 1ᵀK, 1ᵀV (2 each)
    # and W₁1 (4) get no gradient: 10 more.
    ("layer", 16),
    ("rms", 6),
])
def test_transformer_block_counts(norm, expected):
    b = TransformerBlock.random(3, key=jax.random.PRNGKey(1), hidden=4, activation="gelu",
                                norm=norm)
    c = _count(b, expected, input_shape=(3, 3))
    assert (c.laws, c.verdict, c.known) == (expected, "proved", expected), c.describe()


@pytest.mark.slow
def test_transformer_stack_counts_are_sums_of_block_counts():
    # Per block: attention (r = 2, dv = 1) 3 + 1, SwiGLU with 2 hidden neurons 2 = 6.
    stack = BlockStack.random(2, 3, key=jax.random.PRNGKey(1), value_dim=1, hidden=2,
                              activation="silu", gated=True, norm="rms")
    c = _count(stack, 12, input_shape=(3, 3))
    assert (c.laws, c.verdict, c.known) == (12, "proved", 12), c.describe()


def test_validation_names_the_argument():
    with pytest.raises(cn.ArgumentError, match="activation"):
        FeedForward.random((3, 4, 2), key=KEY, activation="tanh")
    with pytest.raises(cn.ArgumentError, match="even key dimension"):
        SoftmaxAttention.random(3, key=KEY, key_dim=3, rotary=True)
    with pytest.raises(cn.ArgumentError, match="keeps the width"):
        TransformerBlock(SoftmaxAttention.random(3, key=KEY, out_dim=2),
                         FeedForward.random((3, 4, 3), key=KEY))
    with pytest.raises(cn.ArgumentError, match="gate"):
        GateRescaleLaw()(FeedForward.random((3, 4, 2), key=KEY))
    with pytest.raises(cn.ArgumentError, match="blocks\\[5\\]"):
        SubmodelLaw(cn.AttentionQKLaw(0), ("blocks", 5, "attention"))(
            BlockStack([ResidualBlock(FeedForward.random((3, 4, 3), key=KEY))]))


def test_config_kinds_build_the_models():
    import pathlib
    import tomllib

    from conservation._experiments.runner import model_factory

    root = pathlib.Path(__file__).resolve().parents[1]
    raw = tomllib.loads((root / "configs" / "transformer_block.toml").read_text())
    config = cn.parse_config(raw)
    # Built abstractly (shapes only): nothing to compile.
    build = lambda spec: eqx.filter_eval_shape(model_factory(spec), KEY, 1.0)  # noqa: E731
    block = build(config.model)
    assert isinstance(block, TransformerBlock) and block.ffn.gate is not None
    assert block.attention.causal and block.norm == "layer" and block.attention.heads == 2
    stack = build(cn.parse_config(raw | {"model": raw["model"] | {"blocks": 2}}).model)
    assert isinstance(stack, BlockStack) and len(stack.blocks) == 2
    att = cn.parse_config(raw | {"model": {"kind": "softmax_attention", "dim": 3,
                                           "rotary": True, "out_dim": 3}}).model
    assert [law.name for law in build(att).laws()] == ["rotary_qk[0]", "vo[0]"]
    with pytest.raises(cn.ConfigError, match="even `model.key_dim`"):
        cn.parse_config(raw | {"model": {"kind": "softmax_attention", "dim": 3, "key_dim": 3,
                                         "rotary": True}})
    with pytest.raises(cn.ConfigError, match="data.tokens"):
        cn.parse_config(raw | {"data": {"n": 4}})
