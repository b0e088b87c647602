"""The flow kinds' vector fields, written out by hand: every field a law count
(`count_laws(flow=...)`, `conservation/_laws/flows.py`) or a solve (`gradient_flow(field=...)`,
`conservation/_dynamics/fields.py`) integrates is evaluated at a random state with a linear
gradient g(θ) = Aθ + b and compared with its definition in numpy (gradient, preconditioned,
entropy mirror, user-potential mirror with its Hessian in closed form, sign, heavy ball, the
entropy-mirror heavy ball, Nesterov), plus the convexity threshold of a user mirror potential
on both sides, the heavy-ball ODE matched to the discrete iterates (closed-form ODE solution,
second order in η), and the argument errors of these paths. No solve is compiled: each check
runs the field eagerly on a few numbers, so the file takes a few seconds."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._laws.flows import embed, known_law_gradients, phase_point

KEY = jax.random.PRNGKey(0)
RNG = np.random.default_rng(30)

# A DeepLinear 2 → 3 → 1 at a positive point (the entropy mirror needs θ > 0): flat order is
# W₁'s 6 entries, then W₂'s 3 (ravel_pytree of the weights tuple).
W1 = np.abs(RNG.standard_normal((3, 2))) + 0.1
W2 = np.abs(RNG.standard_normal((1, 3))) + 0.1
MODEL = cn.DeepLinear([jnp.asarray(W1), jnp.asarray(W2)])
THETA = np.concatenate([W1.ravel(), W2.ravel()])
D = THETA.size
# The gradient of a quadratic loss, g(θ) = Aθ + b: any smooth g checks a field pointwise.
A = RNG.standard_normal((D, D))
B = RNG.standard_normal(D)
# A state away from θ (the fields are evaluated at y, not at the model's point).
Y = THETA + 0.3 * np.abs(RNG.standard_normal(D))


def grad(z):
    return jnp.asarray(A) @ z + jnp.asarray(B)


def g_np(z):
    return A @ z + B


def _resolve(flow, model=MODEL, theta=THETA):
    return flow._resolve(model, jnp.asarray(theta))


# ---------------------------------------------------------------- first-order count fields
def test_first_order_count_fields_match_their_definitions():
    """F(y) for the first-order flow kinds of `count_laws`, against numpy: gradient −g,
    preconditioned −P g (P = the per-leaf rates, broadcast by hand), entropy mirror on the
    selected leaf −(m⊙y + 1 − m)⊙g (m = 1 on W₂'s entries only), sign −sign(g). A sign flipped
    or a mask/rate misplaced moves an entry by O(1) (checked to 1e-12 both ways)."""
    g = g_np(Y)
    rates = (0.7, 0.25)
    lr = cn.DeepLinear([jnp.full_like(w, r) for w, r in zip(MODEL.weights, rates)])
    p = np.concatenate([np.full(W1.size, rates[0]), np.full(W2.size, rates[1])])
    mask = np.concatenate([np.zeros(W1.size), np.ones(W2.size)])
    cases = {
        "gradient": (cn.GradientFlow(), -g),
        "preconditioned": (cn.PreconditionedFlow(lr), -p * g),
        # A rule model -> rates is the same flow.
        "preconditioned-rule": (cn.PreconditionedFlow(
            lambda m: cn.DeepLinear([jnp.full_like(w, r) for w, r in zip(m.weights, rates)])),
            -p * g),
        "mirror-where": (cn.MirrorFlow(where=lambda m: m.weights[1]), -(mask * Y + 1 - mask) * g),
        "mirror-all": (cn.MirrorFlow(), -Y * g),
        "sign": (cn.SignFlow(), -np.sign(g)),
    }
    for name, (flow, want) in cases.items():
        field = _resolve(flow)
        got = np.asarray(field(grad, jnp.asarray(Y)))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------- second-order count fields
@pytest.mark.parametrize("name", ["momentum-friction", "momentum-rest", "mirror-momentum",
                                  "nesterov"])
def test_phase_space_count_fields_match_the_papers_odes(name):
    """The phase-space field F(s, θ, v) of "Keep the momentum" (ICML 2024 §3.1), written out:
    heavy ball θ̈ + τθ̇ = −g with ṡ = τs (τ > 0) or ṡ = 1 (τ = 0); its entropy mirror
    θ̈ + τθ̇ = −(m⊙(τθ + θ̇) + 1 − m)⊙g (m on W₂ only); Nesterov θ̈ + (r/s)θ̇ = −g with ṡ = 1.
    s = 1.7, τ = 0.7, r = 2.5 (none is 1, so τs ≠ τ/s ≠ s/τ)."""
    s, tau, r = 1.7, 0.7, 2.5
    v = np.random.default_rng(1).standard_normal(D)  # per test: any test order draws the same
    y = np.concatenate([[s], Y, v])
    g = g_np(Y)
    mask = np.concatenate([np.zeros(W1.size), np.ones(W2.size)])
    if name == "momentum-friction":
        flow, want = cn.MomentumFlow(friction=tau), np.concatenate([[tau * s], v, -tau * v - g])
    elif name == "momentum-rest":
        flow, want = cn.MomentumFlow(), np.concatenate([[1.0], v, -g])
    elif name == "mirror-momentum":
        flow = cn.MomentumFlow(friction=tau, potential="entropy", where=lambda m: m.weights[1])
        factor = mask * (tau * Y + v) + 1 - mask
        want = np.concatenate([[tau * s], v, -tau * v - factor * g])
    else:
        flow = cn.NesterovFlow(damping=r)
        want = np.concatenate([[1.0], v, -(r / s) * v - g])
    field = _resolve(flow)
    got = np.asarray(field(grad, jnp.asarray(y)))
    assert got.shape == (2 * D + 1,)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_phase_points_start_at_the_flows_clock():
    """The counted state (s₀, θ, v₀): s₀ = `start` for Nesterov (t₀ > 0), 1 = e^{τ·0} for a
    heavy ball with friction, 0 (= t) without; θ in the middle; a first-order state is θ."""
    for flow, s0 in ((cn.NesterovFlow(start=0.3), 0.3), (cn.MomentumFlow(friction=0.5), 1.0),
                     (cn.MomentumFlow(), 0.0)):
        y = phase_point(flow, THETA, KEY)
        assert y.shape == (2 * D + 1,) and y[0] == s0
        np.testing.assert_array_equal(y[1:1 + D], THETA)
        assert np.all(np.isfinite(y[1 + D:])) and np.any(y[1 + D:] != 0)
    np.testing.assert_array_equal(phase_point(cn.MirrorFlow(), THETA, KEY), THETA)
    assert cn.NesterovFlow(damping=2.5).describe().endswith("r = 2.5")


# ---------------------------------------------------------------- user mirror potentials
class _Scaled(eqx.Module):
    """A model with a non-parameter leaf (a plain float) that its potential reads: the
    potential must see the model's static part, not only its arrays."""

    w: jax.Array
    scale: float

    def __call__(self, x):
        return self.w * x


def _quartic(m):  # ψ = c Σ (w⁴/12 + w²/2): Hessian c·diag(w² + 1), strictly convex
    return m.scale * jnp.sum(m.w**4 / 12 + m.w**2 / 2)


def test_user_mirror_potential_field_is_minus_inverse_hessian_times_gradient():
    """A user potential's field −(∇²ψ(y))⁻¹ g(y), against the Hessian in closed form
    c·diag(y² + 1) (count flow on a model with a float leaf c = 2.5 that ψ reads; solve field
    `MirrorField` on flat θ), at y ≠ the model's point (the Hessian is taken where the field is
    evaluated). The entropy `MirrorField` is −y⊙g."""
    theta = np.array([0.4, -1.1, 0.8])
    y = np.array([1.3, -0.2, 0.5])
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
    g = a @ y + b

    def grad3(z):
        return jnp.asarray(a) @ z + jnp.asarray(b)

    c = 2.5
    field = _resolve(cn.MirrorFlow(_quartic), _Scaled(jnp.asarray(theta), c), theta)
    want = -g / (c * (y**2 + 1))
    np.testing.assert_allclose(np.asarray(field(grad3, jnp.asarray(y))), want, rtol=1e-12)
    assert cn.MirrorFlow(_quartic).describe() == "dθ/dt = −(∇²ψ)⁻¹∇L"

    def flat_potential(z):  # the same ψ on the flat parameters
        return c * jnp.sum(z**4 / 12 + z**2 / 2)

    got = cn.MirrorField(flat_potential)(grad3, jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    y_pos = np.abs(y) + 0.1
    got = cn.MirrorField("entropy")(grad3, jnp.asarray(y_pos))
    np.testing.assert_allclose(np.asarray(got), -y_pos * (a @ y_pos + b), rtol=1e-12)


@pytest.mark.parametrize("diagonal, accepted", [
    ((0.5, 0.5, 0.5), True),        # convex, smallest eigenvalue 0.5 < 1
    ((1e-6, 2.0, 3.0), True),       # barely convex: 1e-6 > 0
    ((0.0, 0.0, 0.0), False),       # flat (a linear ψ): exactly 0 is not > 0
    ((-0.1, 1.0, 1.0), False),      # one negative direction, the others positive
])
def test_user_mirror_potential_convexity_threshold(diagonal, accepted):
    """A user potential is accepted iff its Hessian's smallest eigenvalue is > 0 at θ:
    ψ = ½ Σ d_i w_i² + Σ w_i has Hessian diag(d) exactly, so the threshold is tested on both
    sides (0.5 and 1e-6 accepted; exactly 0, and −0.1 beside two positive directions,
    rejected with the eigenvalue in the message)."""
    d = jnp.asarray(diagonal)

    def psi(m):
        return 0.5 * jnp.sum(d * m.w**2) + jnp.sum(m.w)

    model = _Scaled(jnp.asarray([0.3, -0.7, 1.2]), 1.0)
    if accepted:
        field = _resolve(cn.MirrorFlow(psi), model, np.asarray(model.w))
        y = jnp.asarray([1.0, 2.0, -1.0])
        np.testing.assert_allclose(np.asarray(field(lambda z: z, y)),
                                   -np.asarray(y) / np.asarray(diagonal), rtol=1e-12)
    else:
        with pytest.raises(cn.ArgumentError, match=r"MirrorFlow.potential.*strictly convex"
                           ) as info:
            _resolve(cn.MirrorFlow(psi), model, np.asarray(model.w))
        assert f"{min(diagonal):.3g}" in str(info.value)


def test_user_mirror_potential_must_be_scalar_and_covers_its_own_leaves():
    """A potential returning a vector is a named `potential` error (before its Hessian);
    `where` with a user potential is refused (it selects the entropy's leaves); `pad_to`
    cannot embed a user potential's field."""
    model = _Scaled(jnp.asarray([0.3, -0.7, 1.2]), 1.0)
    with pytest.raises(cn.ArgumentError, match=r"`potential` must return a scalar.*\(3,\)"):
        _resolve(cn.MirrorFlow(lambda m: m.w**2), model, np.asarray(model.w))
    with pytest.raises(cn.ArgumentError, match="MirrorFlow.where"):
        cn.MirrorFlow(_quartic, where=lambda m: m.w)
    field = _resolve(cn.MirrorFlow(_quartic), model, np.asarray(model.w))
    with pytest.raises(cn.ArgumentError, match="pad_to"):
        field.padded(np.arange(3), 5)


def test_a_user_potential_keeps_no_frozen_weight_law():
    """Known laws of a user-potential mirror flow: none, even for weights that get no
    gradient, because (∇²ψ)⁻¹ mixes coordinates. Checked by hand: with a non-diagonal
    Hessian H and g_w = 0 the field −H⁻¹g still moves θ_w; under the entropy (diagonal)
    mirror the same frozen weight is a law (one unit row e_w)."""
    coordinates = np.array([1])
    model = _Scaled(jnp.asarray([0.3, -0.7, 1.2]), 1.0)
    rows = known_law_gradients(cn.MirrorFlow(_quartic), model, np.asarray(model.w),
                               coordinates)
    assert rows.shape == (0, 3)
    h = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])  # positive definite
    g = np.array([1.0, 0.0, -2.0])  # no gradient on coordinate 1
    assert abs(np.linalg.solve(h, g)[1]) > 0.1
    entropy = known_law_gradients(cn.MirrorFlow(), MODEL, THETA, coordinates)
    np.testing.assert_array_equal(entropy[:1], np.eye(D)[coordinates])


# ---------------------------------------------------------------- solve fields (fields.py)
def test_heavy_ball_parameters_are_the_derivations():
    """`MomentumField.heavy_ball(η, β, λ)`: mass μ = η(1 + β)/(2(1 − β)²) and start factor
    c = (1 − β)/(1 + β), by hand for η = 0.1, β = 0.9 (μ = 9.5, c = 1/19) and β = 0
    (μ = η/2, c = 1); λ passed through."""
    field = cn.MomentumField.heavy_ball(0.1, 0.9, 0.01)
    np.testing.assert_allclose(float(field.mass), 9.5, rtol=1e-13)
    np.testing.assert_allclose(float(field.start_velocity), 1 / 19, rtol=1e-13)
    assert float(field.weight_decay) == 0.01
    field = cn.MomentumField.heavy_ball(0.3, 0.0)
    np.testing.assert_allclose([float(field.mass), float(field.start_velocity)], [0.15, 1.0],
                               rtol=1e-13)


def _ode_error(eta, beta, mass, c, a=1.0, horizon=3.0):
    """Largest |θ_k − θ(kη/(1 − β))| after the initial layer (β^k ≤ η), for the heavy ball
    v ← βv + aθ, θ ← θ − ηv (v₀ = 0, θ₀ = 1) on L = aθ²/2, and the ODE μθ'' + θ' + aθ = 0
    from θ(0) = 1, θ'(0) = −c·a, solved in closed form (two exponentials)."""
    h = eta / (1 - beta)
    steps = int(round(horizon / h))
    theta, v, path = 1.0, 0.0, [1.0]
    for _ in range(steps):
        v = beta * v + a * theta
        theta = theta - eta * v
        path.append(theta)
    root = np.sqrt(1 - 4 * mass * a + 0j)
    fast, slow = (-1 - root) / (2 * mass), (-1 + root) / (2 * mass)
    weight_fast = (-c * a - slow) / (fast - slow)
    s = np.arange(steps + 1) * h
    ode = ((1 - weight_fast) * np.exp(slow * s) + weight_fast * np.exp(fast * s)).real
    first = int(np.ceil(np.log(eta) / np.log(beta)))
    return np.max(np.abs(np.asarray(path) - ode)[first:])


def test_heavy_ball_ode_follows_the_iterates_at_second_order():
    """The property the heavy-ball parameters exist for (numpy, no solve): with (μ, c) from
    `heavy_ball`, the ODE's closed-form solution tracks the discrete iterates to O(η²) —
    error ≤ 5e-4 at η = 0.02 and halving η divides it by > 3 (measured 0.00026, ×3.4 and
    ×3.6). Negative control: μ off by ×1.5 or c by ×2 leaves an O(η) error (> 5e-3, ratio
    < 2.2)."""
    beta = 0.5
    etas = (0.02, 0.01, 0.005)

    def errors(mass_factor=1.0, c_factor=1.0):
        out = []
        for eta in etas:
            field = cn.MomentumField.heavy_ball(eta, beta)
            out.append(_ode_error(eta, beta, mass_factor * float(field.mass),
                                  c_factor * float(field.start_velocity)))
        return np.array(out)

    good = errors()
    assert good[0] < 5e-4 and np.all(good[:-1] / good[1:] > 3.0)
    for wrong in (errors(mass_factor=1.5), errors(c_factor=2.0)):
        assert wrong[0] > 5e-3 and np.all(wrong[:-1] / wrong[1:] < 2.2)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0.0, "momentum": 0.5}, "lr"), ({"lr": -0.1, "momentum": 0.5}, "lr"),
    ({"lr": 0.1, "momentum": 1.0}, "momentum"), ({"lr": 0.1, "momentum": -0.1}, "momentum"),
])
def test_heavy_ball_rejects_bad_rates(kwargs, name):
    """η > 0 and β ∈ [0, 1): the boundary values are named errors (β = 1 never forgets)."""
    with pytest.raises(cn.ArgumentError, match=f"`{name}`"):
        cn.MomentumField.heavy_ball(**kwargs)


def test_phase_space_solve_fields_at_time_zero():
    """`field(grad, y)` of a phase-space solve field is its right-hand side at t = 0, written
    out: heavy ball (v, −(v + g + λθ)/μ) with μ = 0.4, λ = 0.1; Nesterov
    (v, −3v/t₀ − g − λθ) with t₀ = 0.6. The start is (θ, −c(g + λθ)), c = 0.3."""
    v = np.random.default_rng(3).standard_normal(D)
    y = jnp.asarray(np.concatenate([Y, v]))
    g = g_np(Y)
    mu, lam, t0, c = 0.4, 0.1, 0.6, 0.3
    got = cn.MomentumField(mu, lam, c)(grad, y)
    np.testing.assert_allclose(np.asarray(got), np.concatenate([v, -(v + g + lam * Y) / mu]),
                               rtol=1e-12)
    got = cn.NesterovField(t0, lam, c)(grad, y)
    np.testing.assert_allclose(np.asarray(got), np.concatenate([v, -3 * v / t0 - g - lam * Y]),
                               rtol=1e-12)
    start = cn.MomentumField(mu, lam, c).start(grad, jnp.asarray(Y))
    np.testing.assert_allclose(np.asarray(start), np.concatenate([Y, -c * (g + lam * Y)]),
                               rtol=1e-12)


def test_preconditioned_solve_field_shape_errors():
    """A matrix preconditioner, and one built for another model size, are named errors; the
    right one gives −p⊙(g + λθ)."""
    with pytest.raises(cn.ArgumentError, match="`preconditioner` must be a flat vector"):
        cn.PreconditionedField(jnp.ones((3, 3)))
    field = cn.PreconditionedField(jnp.full(D + 1, 0.5))
    with pytest.raises(cn.ArgumentError, match=f"preconditioner of {D + 1} entries.*{D} "):
        field(grad, jnp.asarray(Y))
    p = np.linspace(0.5, 2.0, D)
    got = cn.PreconditionedField(jnp.asarray(p), 0.2)(grad, jnp.asarray(Y))
    np.testing.assert_allclose(np.asarray(got), -p * (g_np(Y) + 0.2 * Y), rtol=1e-12)


# ---------------------------------------------------------------- argument errors of flows
def test_flow_argument_errors_name_the_argument():
    """Bad flow arguments are `ArgumentError`s naming the argument: a learning-rate pytree of
    the wrong structure, a `where` selecting no leaf, an unknown momentum potential, `where`
    without the entropy, the entropy at a non-positive point."""
    with pytest.raises(cn.ArgumentError, match="`PreconditionedFlow.lr` must have the structure"):
        _resolve(cn.PreconditionedFlow([1.0]))
    with pytest.raises(cn.ArgumentError, match="`MirrorFlow.where` selected no parameter leaf"):
        _resolve(cn.MirrorFlow(where=lambda m: jnp.ones(3)))
    with pytest.raises(cn.ArgumentError, match="`potential` must be one of"):
        cn.MomentumFlow(potential="kl")
    with pytest.raises(cn.ArgumentError, match="`MomentumFlow.where`"):
        cn.MomentumFlow(where=lambda m: m.weights[0])
    negative = cn.DeepLinear([-jnp.asarray(W1), jnp.asarray(W2)])
    with pytest.raises(cn.ArgumentError, match="`MomentumFlow` with the entropy"):
        _resolve(cn.MomentumFlow(potential="entropy"), negative, -THETA)
    # The same selection on W₂ only (positive) is accepted: the check is on the mirror leaves.
    field = _resolve(cn.MomentumFlow(potential="entropy", where=lambda m: m.weights[1]),
                     negative, np.concatenate([-W1.ravel(), W2.ravel()]))
    np.testing.assert_array_equal(np.asarray(field.mask), np.r_[np.zeros(6), np.ones(3)])


def test_pad_to_frames_that_cannot_hold_the_model_are_named_errors():
    """`embed` (count_laws(pad_to=(frame, input_shape))): a frame of another type, a frame
    leaf smaller than the model's, a padded input smaller than the model's and a frame that
    cannot take the padded inputs are `ArgumentError`s naming `pad_to`; a zero-padded frame
    is accepted, with the model's entries as its leading blocks."""
    small = cn.DeepLinear([jnp.ones((2, 2)), jnp.ones((1, 2))])
    mlp = cn.MLP.random((2, 2, 1), key=KEY, bias=False)
    with pytest.raises(cn.ArgumentError, match="`pad_to`.*DeepLinear"):
        embed(small, mlp, (2,), (3,), KEY)
    tiny = cn.DeepLinear([jnp.ones((1, 2)), jnp.ones((1, 1))])
    with pytest.raises(cn.ArgumentError, match=r"`pad_to`'s frame has a leaf of shape \(1, 2\)"):
        embed(small, tiny, (2,), (3,), KEY)
    wide = cn.DeepLinear([jnp.zeros((3, 4)), jnp.zeros((2, 3))])
    with pytest.raises(cn.ArgumentError, match=r"`pad_to`'s input shape \(1,\) must be at least"):
        embed(small, wide, (2,), (1,), KEY)
    with pytest.raises(cn.ArgumentError, match=r"`pad_to`'s frame does not take inputs"):
        embed(small, wide, (2,), (3,), KEY)
    padded, mask, keep, shapes = embed(small, wide, (2,), (4,), KEY)
    np.testing.assert_array_equal(np.asarray(padded.weights[0])[:2, :2], np.ones((2, 2)))
    assert int(np.sum(np.asarray(mask))) == 6 and keep.size == 6 and shapes == ((4,), (2,))
    # Equal sizes are allowed ("at least as large"): a frame as wide as the model's input and
    # output, padded only in its hidden width.
    snug = cn.DeepLinear([jnp.zeros((3, 2)), jnp.zeros((1, 3))])
    padded, mask, keep, shapes = embed(small, snug, (2,), (2,), KEY)
    np.testing.assert_array_equal(np.asarray(padded.weights[1]), [[1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(keep, [0, 1, 2, 3, 6, 7])
    assert shapes == ((2,), (1,))
