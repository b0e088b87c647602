"""The central flow of gradient descent at the edge of stability (Cohen, Damian, Talwalkar,
Kolter & Lee, "Understanding optimization in deep learning with central flows", ICLR 2025).

Gradient descent with learning rate η drives the sharpness S(θ) (the top Hessian eigenvalue) up
to 2/η and then oscillates about a slowly moving centre. The central flow is an ODE for that
centre, in the flow's time t = η·step:

    dθ/dt = −∇L(θ) − ½ ∇³L(θ)[Σ],    Σ = U X Uᵀ ⪰ 0,

with U the top-k Hessian eigenvectors and X (k×k) the oscillation covariance in their basis,
chosen so that the eigenvalues stay at or below 2/η (a semidefinite complementarity problem).
`CentralFlowField` is that right-hand side for `gradient_flow`; `central_flow_comparison` runs
it next to gradient descent and the stable (plain gradient) flow from the same
initialisations.
"""

import dataclasses
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._custom_types import Array, Float, ScalarLike
from .._data.objective import Objective
from .._laws.base import FunctionLaw
from .._models.base import AbstractModel, Ensemble, as_ensemble, default_laws
from .._validation import ArgumentError, choice, fail, integer, is_traced, number
from .arguments import check_objective
from .batching import flat_member
from .flow import AbstractVectorField, GradientField, ModifiedGradientField, gradient_flow
from .monitor import (
    DIVERGED,
    FAILED,
    MAX_STEPS,
    SUCCESS,
    Result,
    mark_loss_increased,
)
from .train import optimizer, train

EIGENSOLVERS = ("auto", "dense", "lanczos")
# `eigensolver="auto"`: the dense Hessian (P Hessian-vector products, one eigh) up to this many
# parameters, Lanczos beyond.
DENSE_MAX_PARAMS = 400


def _shown(x):
    return x if is_traced(x) else np.asarray(x).tolist()


def _hvp(grad: Callable, y: Array) -> Callable:
    return lambda v: jax.jvp(grad, (y,), (v,))[1]


def top_eigenpairs(hvp: Callable, size: int, k: int, eigensolver: str = "auto",
                   lanczos_steps: int = 40) -> tuple[Float[Array, " k"], Float[Array, "P k"]]:
    """The `k` largest eigenvalues (descending) and unit eigenvectors of the symmetric operator
    `hvp` on R^`size`, a deterministic function of the operator (no state between calls, so a
    flow's right-hand side stays a function of θ).

    `"dense"`: the matrix from `size` products and `numpy`-equivalent `eigh` (exact);
    `"lanczos"`: `lanczos_steps` Lanczos steps with full reorthogonalisation from a fixed
    random start vector (exact when `lanczos_steps` ≥ `size`, else Ritz pairs); `"auto"`: dense
    up to `DENSE_MAX_PARAMS` parameters."""
    if eigensolver == "auto":
        eigensolver = "dense" if size <= DENSE_MAX_PARAMS else "lanczos"
    if eigensolver == "dense":
        h = jax.vmap(hvp)(jnp.eye(size))
        w, v = jnp.linalg.eigh(0.5 * (h + h.T))
        return w[::-1][:k], v[:, ::-1][:, :k]
    m = min(lanczos_steps, size)
    q0 = jax.random.normal(jax.random.PRNGKey(0), (size,))
    q0 = q0 / jnp.linalg.norm(q0)
    basis = jnp.zeros((m + 1, size)).at[0].set(q0)

    def step(j, carry):
        basis, alpha, beta = carry
        w = hvp(basis[j])
        a = jnp.vdot(basis[j], w)
        # Full reorthogonalisation, twice (rows beyond j are still zero): in float64 the Ritz
        # pairs then agree with a dense eigh to round-off once the Krylov space holds them.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        ok = b > 1e-12 * jnp.maximum(jnp.abs(a), 1.0)  # an invariant subspace: stop growing
        q = jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0)
        return basis.at[j + 1].set(q), alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    basis, alpha, beta = jax.lax.fori_loop(0, m, step, (basis, jnp.zeros(m), jnp.zeros(m)))
    t = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    w, s = jnp.linalg.eigh(t)
    return w[::-1][:k], basis[:m].T @ s[:, ::-1][:, :k]


def _pairs(k: int) -> tuple[np.ndarray, np.ndarray, Array]:
    """The pairs i ≤ j of `numpy.triu_indices(k)` and their weights in a sum over all
    ordered pairs (1 on the diagonal, 2 off it)."""
    rows, cols = np.triu_indices(k)
    return rows, cols, jnp.asarray(np.where(rows == cols, 1.0, 2.0))


def _symmetric(values: Array, k: int) -> Array:
    """The symmetric k×k matrix whose upper triangle (`numpy.triu_indices` order) is
    `values`."""
    rows, cols = np.triu_indices(k)
    return jnp.zeros((k, k)).at[rows, cols].set(values).at[cols, rows].set(values)


def solve_sdcp(q: Float[Array, "k k"], gram: Float[Array, "n n"], k: int,
               iterations: int = 300) -> Float[Array, "k k"]:
    """The oscillation covariance X of the complementarity problem

        X ⪰ 0,   M(X) = q + ½ B[X] ⪰ 0,   ⟨X, M(X)⟩ = 0,

    with B[X]_ij = Σ_kl ⟨g_ij, g_kl⟩ X_kl (`gram` = the Gram matrix of the g_ij for i ≤ j, in
    `numpy.triu_indices(k)` order). B is positive semidefinite, so these are the optimality
    conditions of min_{X ⪰ 0} ¼⟨X, B[X]⟩ + ⟨q, X⟩ (the anchor solves the same program with
    cvxpy). k = 1: the closed form x = max(0, −2q/‖g‖²). k > 1: `iterations` accelerated
    projected-gradient steps (FISTA with adaptive restart, projection by eigh)."""
    if k == 1:
        g2 = gram[0, 0]
        return jnp.reshape(jnp.where(g2 > 0, jnp.maximum(0.0, -2 * q[0, 0] / jnp.where(
            g2 > 0, g2, 1.0)), 0.0), (1, 1))
    rows, cols, weight = _pairs(k)

    def gradient(x):
        return q + 0.5 * _symmetric(gram @ (weight * x[rows, cols]), k)

    # ⟨X, B[X]⟩ = ‖Σ_ij X_ij g_ij‖² ≤ ‖X‖²_F Σ_ij ‖g_ij‖² (ordered pairs): a Lipschitz bound.
    lipschitz = 0.5 * jnp.sum(weight * jnp.diag(gram))
    rate = jnp.where(lipschitz > 0, 1.0 / jnp.where(lipschitz > 0, lipschitz, 1.0), 0.0)

    def project(x):
        w, v = jnp.linalg.eigh(0.5 * (x + x.T))
        return (v * jnp.maximum(w, 0.0)[None, :]) @ v.T

    def step(_, carry):
        x, z, s = carry
        new = project(z - rate * gradient(z))
        s_new = 0.5 * (1 + jnp.sqrt(1 + 4 * s**2))
        restart = jnp.sum((z - new) * (new - x)) > 0  # O'Donoghue–Candès gradient restart
        s_new = jnp.where(restart, 1.0, s_new)
        z_new = jnp.where(restart, new, new + (s - 1) / s_new * (new - x))
        return new, z_new, s_new

    x0 = jnp.zeros((k, k))
    x, _, _ = jax.lax.fori_loop(0, iterations, step, (x0, x0, jnp.asarray(1.0)))
    return x


class Oscillation(eqx.Module):
    """What the central flow predicts at one point θ (see `CentralFlowField.oscillation`).

    - `eigenvalues`: the top-k Hessian eigenvalues (descending; of H + λI with weight decay
      λ); `eigenvalues[0]` is the sharpness.
    - `eigenvectors`: the matching unit eigenvectors, shape (P, k).
    - `covariance`: X, shape (k, k), the oscillation covariance Σ = U X Uᵀ in the eigenbasis.
    - `velocity`: dθ/dt of the central flow at θ.
    - `loss`: L(θ); `predicted_loss`: GD's time-averaged loss, L(θ) + ½⟨H, Σ⟩.
    """

    eigenvalues: Float[Array, " k"]
    eigenvectors: Float[Array, "P k"]
    covariance: Float[Array, "k k"]
    velocity: Float[Array, " P"]
    loss: Float[Array, ""]
    predicted_loss: Float[Array, ""]


class CentralFlowField(AbstractVectorField):
    """The central flow of gradient descent with learning rate η (Cohen et al., ICLR 2025), in
    time t = η·step, for `gradient_flow(..., field=CentralFlowField(lr))`:

        dθ/dt = −∇L(θ) − ½ Σ_ij X_ij ∇(u_iᵀ H(θ) u_j),

    (½∇³L[Σ] for Σ = U X Uᵀ), U = the top-k Hessian eigenvectors u_i (eigenvalues λ_i),
    X ⪰ 0 (k×k) from the complementarity problem that keeps ηλ_i ≤ 2. With the constraint
    matrix a = 2I − η UᵀHU and its rate da/dt along the flow (U held fixed: at an eigenvector
    the Hellmann–Feynman derivative), X solves

        X ⪰ 0,   M = (κ a + da/dt)/η ⪰ 0,   ⟨X, M⟩ = 0,    κ = `relaxation`/η,

    i.e. an eigenvalue below 2/η without oscillation (X = 0) may rise freely; once at the
    edge, X is the smallest oscillation that holds it there. The κa term (Baumgarte
    stabilisation; the anchor's projection over a substep dt does the same with κ = 1/dt)
    pulls an eigenvalue that overshot back to 2/η with rate κ and keeps the right-hand side a
    continuous function of θ, which the adaptive solvers need. κ → ∞ is the exact central
    flow; with κ finite the oscillation switches on ~1/κ (= 1/`relaxation` GD steps) before
    the sharpness reaches 2/η. For k = 1 and the sharpness S at 2/η,
    σ² = X = 2 max(0, ⟨∇S, −∇L⟩)/‖∇S‖² (the paper's §3). Below the edge (ηS < 2 with room,
    κ(2 − ηS) > η⟨∇S, ∇L⟩) X = 0 and this is gradient flow.

    Eigenpairs are computed at every evaluation from Hessian-vector products (`eigensolver`:
    dense Hessian for ≤ 400 parameters, else `lanczos_steps` Lanczos steps; see
    `top_eigenpairs`), the third derivatives ∇(u_iᵀHu_j) by reverse-over-forward-over-reverse
    differentiation: P (dense) or `lanczos_steps` Hessian-vector products plus k(k+1)/2
    third-derivative gradients per evaluation.

    **Arguments:** `lr` η > 0 (traced: a new value does not recompile); `k` (≥ 1) eigenvalues
    that may sit at the edge; `relaxation` κη > 0 (default 2: the same rate as the top
    curvature direction at the edge, so no extra stiffness); `eigensolver` "auto", "dense" or
    "lanczos"; `lanczos_steps` ≥ k; `sdcp_iterations` (k > 1 only, see `solve_sdcp`);
    `weight_decay` λ ≥ 0 (GD on L + λ‖θ‖²/2, as `optimizer("gd", weight_decay=λ)`).

    **Example:** `gradient_flow(objective, model, t1=lr * steps, field=CentralFlowField(lr))`
    follows GD's `steps` steps at learning rate `lr`, edge of stability included.
    """

    lr: Array = eqx.field(converter=jnp.asarray)
    k: int = eqx.field(default=1, static=True)
    relaxation: Array = eqx.field(default=2.0, converter=jnp.asarray)
    eigensolver: str = eqx.field(default="auto", static=True)
    lanczos_steps: int = eqx.field(default=40, static=True)
    sdcp_iterations: int = eqx.field(default=300, static=True)
    weight_decay: Array = eqx.field(default=0.0, converter=jnp.asarray)

    def __check_init__(self):
        number("lr", _shown(self.lr), ">0", array=True,
               fix="the learning rate η of the gradient descent the flow follows")
        integer("k", self.k, minimum=1, fix="the number of top eigenvalues that may reach 2/η")
        number("relaxation", _shown(self.relaxation), ">0", array=True,
               fix="the rate (per GD step) at which an overshooting eigenvalue returns to "
                   "2/η, e.g. 2.0")
        choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        integer("lanczos_steps", self.lanczos_steps, minimum=self.k,
                fix="Lanczos needs at least k steps for k eigenpairs")
        integer("sdcp_iterations", self.sdcp_iterations, minimum=1)
        number("weight_decay", _shown(self.weight_decay), ">=0", array=True)

    def oscillation(self, grad: Callable, y: Float[Array, " P"],
                    loss: Callable | None = None) -> Oscillation:
        """The central flow's quantities at the flat parameters `y` (`grad(y)` = ∇L(y);
        `loss(y)` = L(y), optional: without it `loss` and `predicted_loss` are NaN). With
        weight decay λ the eigenvalues are those of H + λI (what GD's stability sees) and
        the losses are un-regularised."""
        k = min(self.k, y.shape[0])
        # GD with weight decay λ is GD on L + λ‖θ‖²/2: H + λI, the same third derivative.
        plain, lam = grad, self.weight_decay

        def grad(z):
            return plain(z) + lam * z

        hvp = _hvp(grad, y)
        eigenvalues, u = top_eigenpairs(hvp, y.shape[0], k, self.eigensolver,
                                        self.lanczos_steps)
        rows, cols, weight = _pairs(k)

        def third(i, j):  # ∇_θ (u_iᵀ H(θ) u_j) at y, u held fixed
            return jax.grad(lambda z: jnp.vdot(u[:, i], _hvp(grad, z)(u[:, j])))(y)

        g = jax.vmap(third)(jnp.asarray(rows), jnp.asarray(cols))  # (pairs, P)
        gradient = grad(y)
        # a_ij = 2δ_ij − η(UᵀHU)_ij; (UᵀHU) = diag(λ) at eigenvectors.
        a = 2 * jnp.eye(k) - self.lr * jnp.diag(eigenvalues)
        pair_rate = g @ gradient  # ⟨g_ij, ∇L⟩
        rate = _symmetric(pair_rate, k)
        # M/η = (relaxation/η²)·a + ⟨g, ∇L⟩ + ½B[X]: a's scale is 1/η², B's is η⁰.
        q = self.relaxation / self.lr**2 * a + rate
        x = solve_sdcp(q, g @ g.T, k, self.sdcp_iterations)
        velocity = -gradient - 0.5 * (weight * x[rows, cols]) @ g
        value = jnp.asarray(jnp.nan) if loss is None else loss(y)
        # The time average of the un-regularised loss over the oscillation: ½⟨∇²L, Σ⟩.
        return Oscillation(eigenvalues, u, x, velocity, value,
                           value + 0.5 * jnp.sum(jnp.diag(x) * (eigenvalues - lam)))

    def __call__(self, grad, y):
        return _velocity(self, grad, y)


# Traced once per flow and then called: the solvers evaluate the field at ~25 places (stages,
# saves, checks), each a fresh trace of the eigensolver and third derivatives without it.
@eqx.filter_jit
def _velocity(field, grad, y):
    return field.oscillation(grad, y).velocity


# The parameters as a law, kept at every save (`values=[...]`): how the comparison reads θ(t)
# of a flow or a discrete run. One function object: it is part of the compiled programs' key.
def _flat(model):
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


_PARAMETERS = FunctionLaw(_flat, "parameters")


def _without_parameters(result: Result) -> Result:
    def drop(d):
        return {k: v for k, v in d.items() if k != _PARAMETERS.name}

    return dataclasses.replace(
        result, values=drop(result.values), drift=drop(result.drift),
        max_drift=drop(result.max_drift), condition=drop(result.condition),
        final_values=drop(result.final_values),
        reference=None if result.reference is None else tuple(
            drop(r) for r in result.reference))


class CentralFlowComparison(eqx.Module):
    """Gradient descent, its central flow and the stable flow from the same initialisations
    (`central_flow_comparison`). B members, T saves at t = η·step.

    - `t` (T,), `steps` (T,): the save times and the GD steps they are.
    - `gd_loss`, `gd_loss_average` (B, T): GD's loss at the saved steps, and its centred
      moving average over `window` steps (what the central flow predicts).
    - `gd_sharpness`, `stable_sharpness` (B, T): the top Hessian eigenvalue along GD and
      along gradient flow; `central_eigenvalues` (B, T, k) along the central flow.
    - `central_loss` (B, T): L(θ_CF(t)); `central_predicted_loss` (B, T): L + ½⟨H, Σ⟩, the
      time-averaged loss the central flow predicts for GD; `stable_loss` (B, T).
    - `covariance` (B, T, k, k): X, the oscillation covariance in the top eigenbasis
      (σ² = `covariance[..., 0, 0]` for k = 1).
    - `distance_central`, `distance_stable` (B, T): ‖θ_GD − θ_CF‖ and ‖θ_GD − θ_GF‖ at GD's
      iterates.
    - `midpoint_central`, `midpoint_stable` (B, T): the same from GD's second-order midpoint
      θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4 (θ*_0 = θ_0), which averages out the period-2
      oscillation about the centre; the central-flows paper measures its distances this way.
    - `gd`, `central`, `stable` (and `modified`, or None): the runs' `Result`s (statuses,
      law drifts).
    """

    t: Float[Array, " T"]
    steps: Array
    gd_loss: Float[Array, "B T"]
    gd_loss_average: Float[Array, "B T"]
    gd_sharpness: Float[Array, "B T"]
    central_loss: Float[Array, "B T"]
    central_predicted_loss: Float[Array, "B T"]
    central_eigenvalues: Float[Array, "B T k"]
    covariance: Float[Array, "B T k k"]
    stable_loss: Float[Array, "B T"]
    stable_sharpness: Float[Array, "B T"]
    distance_central: Float[Array, "B T"]
    distance_stable: Float[Array, "B T"]
    midpoint_central: Float[Array, "B T"]
    midpoint_stable: Float[Array, "B T"]
    gd: Result
    central: Result
    stable: Result
    modified: Result | None
    window: int = eqx.field(static=True)


@eqx.filter_jit
def _observe(field, static, unravel, objective, ys):
    """The field's `Oscillation` at every row of `ys` (N, P)."""

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    grad = jax.grad(loss)
    return jax.lax.map(lambda y: field.oscillation(grad, y, loss), ys)


def _moving_average(loss: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` consecutive steps (shorter at the ends), along axis 1."""
    n = loss.shape[1]
    c = np.concatenate([np.zeros((loss.shape[0], 1)), np.cumsum(loss, axis=1)], axis=1)
    lo = np.clip(np.arange(n) - window // 2, 0, n)
    hi = np.clip(np.arange(n) - window // 2 + window, 0, n)
    return (c[:, hi] - c[:, lo]) / (hi - lo)[None, :]


def _check_schedule(steps, n_save, window, what):
    """`steps`, `n_save` and `window` of a comparison, checked: every save falls on a step."""
    steps = integer("steps", steps, minimum=1)
    n_save = integer("n_save", n_save, minimum=2)
    if steps % (n_save - 1):
        raise fail("steps", steps, f"must be a multiple of n_save − 1 = {n_save - 1} (every "
                   f"save is a {what})",
                   f"e.g. steps={(steps // (n_save - 1) + 1) * (n_save - 1)}")
    return steps, n_save, integer("window", window, minimum=1)


def _at_saves(thetas, at):
    """The iterates θ_k at the saved steps `at` of `thetas` (B, steps + 2, P), and their
    second-order midpoints (θ_{k−1} + 2θ_k + θ_{k+1})/4 (θ_0 itself at the start)."""
    theta_k = thetas[:, at]
    before = thetas[:, np.maximum(at - 1, 0)]
    midpoint = jnp.where((at > 0)[None, :, None],
                         0.25 * (before + 2 * theta_k + thetas[:, at + 1]), theta_k)
    return theta_k, midpoint


def central_flow_comparison(
    objective: Objective,
    model: AbstractModel | Ensemble,
    lr: ScalarLike,
    steps: int,
    *,
    n_save: int = 101,
    k: int = 1,
    relaxation: ScalarLike = 2.0,
    window: int = 8,
    laws=None,
    modified: bool = False,
    solver="tsit5",
    rtol: ScalarLike = 1e-8,
    max_steps: int = 100_000,
    eigensolver: str = "auto",
    weight_decay: ScalarLike = 0.0,
) -> CentralFlowComparison:
    """Run gradient descent (`train`, learning rate `lr`, `steps` steps), its central flow and
    gradient flow (the stable flow) — and optionally the modified flow — from every member of
    `model`, to t = `lr`·`steps`, and compare them at `n_save` saves.

    **Arguments:**

    - `objective`, `model`: as for `gradient_flow` (a model or an `Ensemble`).
    - `lr`: η > 0; `steps`: GD steps, a multiple of `n_save` − 1 (saves fall on steps).
    - `k`, `relaxation`, `eigensolver`, `weight_decay`: of the `CentralFlowField` (and λ
      of GD and of the other flows).
    - `window`: GD steps in the moving average of its loss (≥ 1).
    - `laws`: laws to monitor in every run (default the model's); `modified`: also run
      `ModifiedGradientField(lr)`.
    - `solver`, `rtol`, `max_steps`: of the flows (`gradient_flow`).

    **Returns:** a `CentralFlowComparison`. GD runs one step past `steps` (the last save's
    midpoint needs θ_{steps+1}; `gd`'s drifts include it) and keeps its parameters at every
    step (B·steps·P numbers): meant for small models.

    **Example:**

        cmp = central_flow_comparison(objective, ensemble, lr=0.1, steps=400)
        ratio = cmp.distance_central / cmp.distance_stable  # ≪ 1 at the edge of stability
    """
    ensemble = as_ensemble(model)
    check_objective(objective)
    number("lr", lr, ">0", fix="the learning rate of gradient descent")
    steps, n_save, window = _check_schedule(steps, n_save, window, "GD step")
    if not isinstance(modified, bool):
        raise fail("modified", modified, "must be True or False")
    field = CentralFlowField(lr, k=k, relaxation=relaxation, eigensolver=eigensolver,
                             weight_decay=weight_decay)
    laws = tuple(default_laws(ensemble[0]) if laws is None else laws)
    if any(law.name == _PARAMETERS.name for law in laws):
        raise ArgumentError("`laws` holds a law named 'parameters', the name the comparison "
                            "uses to read θ(t); rename it.")
    watched = [*laws, _PARAMETERS]
    keep = [_PARAMETERS.name]
    # One step past the end: the last save's second-order midpoint needs θ_{steps+1}.
    gd = train(objective, ensemble, optimizer("gd", lr=lr, weight_decay=weight_decay),
               steps + 1, n_save=steps + 2, step_time=float(lr), laws=watched, values=keep)
    t1 = float(lr) * steps
    flows = {}
    for name, f in (("central", field), ("stable", GradientField(weight_decay)),
                    ("modified", ModifiedGradientField(lr, weight_decay=weight_decay)
                     if modified else None)):
        if f is not None:
            flows[name] = gradient_flow(objective, ensemble, t1, n_save=n_save, solver=solver,
                                        rtol=rtol, max_steps=max_steps, laws=watched,
                                        values=keep, field=f)
    at = np.arange(n_save) * (steps // (n_save - 1))
    theta_gd, midpoint = _at_saves(gd.values[_PARAMETERS.name], at)
    theta_cf = flows["central"].values[_PARAMETERS.name]
    theta_gf = flows["stable"].values[_PARAMETERS.name]
    b, t, p = theta_cf.shape
    params, static = eqx.partition(ensemble[0], eqx.is_inexact_array)
    unravel = jfu.ravel_pytree(params)[1]
    flat = jnp.concatenate([theta_gd, theta_cf, theta_gf]).reshape(3 * b * t, p)
    seen = _observe(field, static, unravel, objective, flat)
    seen = jtu.tree_map(lambda x: x.reshape((3, b, t) + x.shape[1:]), seen)
    average = _moving_average(np.asarray(gd.loss), window)[:, at]
    results = {name: _without_parameters(r) for name, r in flows.items()}
    return CentralFlowComparison(
        t=jnp.asarray(flows["central"].t), steps=jnp.asarray(at),
        gd_loss=gd.loss[:, at], gd_loss_average=jnp.asarray(average),
        gd_sharpness=seen.eigenvalues[0, ..., 0],
        central_loss=seen.loss[1], central_predicted_loss=seen.predicted_loss[1],
        central_eigenvalues=seen.eigenvalues[1], covariance=seen.covariance[1],
        stable_loss=seen.loss[2], stable_sharpness=seen.eigenvalues[2, ..., 0],
        distance_central=jnp.linalg.norm(theta_gd - theta_cf, axis=-1),
        distance_stable=jnp.linalg.norm(theta_gd - theta_gf, axis=-1),
        midpoint_central=jnp.linalg.norm(midpoint - theta_cf, axis=-1),
        midpoint_stable=jnp.linalg.norm(midpoint - theta_gf, axis=-1),
        gd=_without_parameters(gd), central=results["central"], stable=results["stable"],
        modified=results.get("modified"), window=window)


# ---------------------------------------------------------------------------------------------
# Scalar RMSProp (the paper's §4): one adaptive scalar ν for all parameters.


def _check_rmsprop(lr, beta2, eps, relaxation):
    number("lr", _shown(lr), ">0", array=True,
           fix="the learning rate η of the scalar RMSProp the flow follows")
    number("beta2", _shown(beta2), "(0,1)", array=True,
           fix="β₂ in ν ← β₂ν + (1 − β₂)‖∇L‖², e.g. 0.99")
    number("eps", _shown(eps), ">=0", array=True, fix="ε in θ ← θ − η∇L/(√ν + ε), e.g. 0")
    number("relaxation", _shown(relaxation), ">0", array=True,
           fix="the rate (per step) at which an overshooting effective sharpness returns to "
               "2, e.g. 2.0")


class RMSPropOscillation(eqx.Module):
    """What the scalar-RMSProp central flow predicts at one state (θ, ν)
    (`RMSPropCentralFlow.oscillation`).

    - `sharpness`: S, the top Hessian eigenvalue; `effective_sharpness`: ηS/(√ν + ε), the
      quantity RMSProp's stability pins at 2; `eigenvector`: the unit top eigenvector (P,).
    - `variance`: σ², the oscillation's variance along the top eigenvector (0 below the edge).
    - `velocity`: dθ/dt; `nu_rate`: dν/dt (time t = η·step).
    - `loss`: L(θ); `predicted_loss`: RMSProp's time-averaged loss, L(θ) + ½Sσ².
    """

    sharpness: Float[Array, ""]
    effective_sharpness: Float[Array, ""]
    eigenvector: Float[Array, " P"]
    variance: Float[Array, ""]
    velocity: Float[Array, " P"]
    nu_rate: Float[Array, ""]
    loss: Float[Array, ""]
    predicted_loss: Float[Array, ""]


class RMSPropCentralFlow(eqx.Module):
    """The central flow of scalar RMSProp (Cohen, Damian et al., ICLR 2025, §4) and its stable
    flow, on the state y = (θ, ν) (the flat parameters and the scalar ν, one vector of P + 1
    entries), in time t = η·step like `CentralFlowField`.

    Scalar RMSProp (the paper's ordering): ν_{k+1} = β₂ν_k + (1 − β₂)‖∇L(θ_k)‖²,
    θ_{k+1} = θ_k − η∇L(θ_k)/(√ν_{k+1} + ε). With r = √ν + ε and c = (1 − β₂)/β₂ (the
    paper's 1/β₂ accounts for ν being updated before the step), the **stable flow** is

        dθ/dt = −∇L/r,    dν/dt = (c/η)(‖∇L‖² − ν),

    and the **central flow** adds the oscillation of variance σ² along the top unit Hessian
    eigenvector u (eigenvalue S): its third-derivative pull on θ and its contribution S²σ² to
    the mean squared gradient,

        dθ/dt = −(∇L + ½σ²∇S)/r,    dν/dt = (c/η)(‖∇L‖² + S²σ² − ν),    ∇S = ∇(uᵀHu),

    with σ² ≥ 0 the smallest oscillation that keeps the effective sharpness ηS/r at or below 2:
    with a = 2 − ηS/r, σ² = max(0, −q/b) where κa + da/dt = q + bσ² (b > 0; κ =
    `relaxation`/η, the same Baumgarte term as `CentralFlowField`). Below the edge σ² = 0 and
    the central flow is the stable flow. At the edge ν is held where η²S² = 4r², i.e. the
    oscillation raises ν instead of S being pushed down (the paper's "self-stabilisation via
    ν"). (The anchor's JAX code `central_flows_jax` uses U in place of HU in ν's oscillation
    term; its PyTorch code and the paper use HU, as here.)

    One eigenvalue at the edge (the paper's scalar-RMSProp analysis); eigenpairs and ∇S as in
    `CentralFlowField` (`eigensolver`, `lanczos_steps`).

    **Arguments:** `lr` η > 0, `beta2` β₂ in (0, 1), `eps` ε ≥ 0, `relaxation` κη > 0 (all
    traced: new values do not recompile); `eigensolver`, `lanczos_steps`.

    **Example:** `rmsprop_central_flow_comparison(objective, model, lr, steps, beta2=0.9)`
    integrates it (and the stable flow) next to discrete scalar RMSProp; by hand,
    `RMSPropCentralFlow(0.01, 0.9)(jax.grad(loss), jnp.append(theta, nu))` is dy/dt.
    """

    lr: Array = eqx.field(converter=jnp.asarray)
    beta2: Array = eqx.field(default=0.99, converter=jnp.asarray)
    eps: Array = eqx.field(default=0.0, converter=jnp.asarray)
    relaxation: Array = eqx.field(default=2.0, converter=jnp.asarray)
    eigensolver: str = eqx.field(default="auto", static=True)
    lanczos_steps: int = eqx.field(default=40, static=True)

    def __check_init__(self):
        _check_rmsprop(self.lr, self.beta2, self.eps, self.relaxation)
        choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        integer("lanczos_steps", self.lanczos_steps, minimum=1)

    def oscillation(self, grad: Callable, theta: Float[Array, " P"], nu: Float[Array, ""],
                    loss: Callable | None = None) -> RMSPropOscillation:
        """The central flow's quantities at the state (`theta`, `nu`) (`grad(theta)` =
        ∇L(θ); `loss(theta)` = L(θ), optional: without it the losses are NaN)."""
        eta = self.lr
        c = (1 - self.beta2) / self.beta2
        root = jnp.sqrt(nu)
        r = root + self.eps
        s, u = top_eigenpairs(_hvp(grad, theta), theta.shape[0], 1, self.eigensolver,
                              self.lanczos_steps)
        s, u = s[0], u[:, 0]
        grad_s = jax.grad(lambda z: jnp.vdot(u, _hvp(grad, z)(u)))(theta)  # u held fixed
        g = grad(theta)
        g2 = jnp.vdot(g, g)
        a = 2 - eta * s / r
        # a = 2 − ηS/r: da/dt = (ηS/r²)·ν̇/(2√ν) − (η/r)⟨∇S, θ̇⟩, linear in σ² through
        # ν̇ = (c/η)(‖g‖² − ν + S²σ²) and θ̇ = −(g + ½σ²∇S)/r.
        dr = eta * s / (2 * root * r**2) * (c / eta)  # ∂(da/dt)/∂(‖g‖² − ν + S²σ²)
        q = self.relaxation / eta * a + dr * (g2 - nu) + eta / r**2 * jnp.vdot(grad_s, g)
        b = dr * s**2 + eta / (2 * r**2) * jnp.vdot(grad_s, grad_s)
        variance = jnp.where(b > 0, jnp.maximum(0.0, -q / jnp.where(b > 0, b, 1.0)), 0.0)
        velocity = -(g + 0.5 * variance * grad_s) / r
        nu_rate = c / eta * (g2 + s**2 * variance - nu)
        value = jnp.asarray(jnp.nan) if loss is None else loss(theta)
        return RMSPropOscillation(s, eta * s / r, u, variance, velocity, nu_rate, value,
                                  value + 0.5 * s * variance)

    def __call__(self, grad: Callable, y: Float[Array, " P+1"]) -> Float[Array, " P+1"]:
        """dy/dt of the central flow at the state y = (θ, ν)."""
        o = self.oscillation(grad, y[:-1], y[-1])
        return jnp.append(o.velocity, o.nu_rate)

    def stable(self, grad: Callable, y: Float[Array, " P+1"]) -> Float[Array, " P+1"]:
        """dy/dt of the stable flow (no oscillation) at the state y = (θ, ν)."""
        theta, nu = y[:-1], y[-1]
        g = grad(theta)
        c = (1 - self.beta2) / self.beta2
        return jnp.append(-g / (jnp.sqrt(nu) + self.eps), c / self.lr * (jnp.vdot(g, g) - nu))


class RMSPropComparison(eqx.Module):
    """Discrete scalar RMSProp, its central flow and its stable flow from the same
    initialisations (`rmsprop_central_flow_comparison`). B members, T saves at t = η·step.

    - `t` (T,), `steps` (T,): the save times and the RMSProp steps they are.
    - `loss`, `loss_average` (B, T): RMSProp's loss at the saved steps and its centred moving
      average over `window` steps; `nu`, `effective_sharpness` (B, T): its ν_k and
      ηS(θ_k)/(√ν_k + ε).
    - `central_loss`, `central_predicted_loss` (L + ½Sσ², the time-averaged loss it
      predicts), `central_nu`, `central_effective_sharpness`, `variance` (σ²) (B, T).
    - `stable_loss`, `stable_nu`, `stable_effective_sharpness` (B, T).
    - `distance_central`, `distance_stable` (B, T): ‖θ_k − θ_CF(t)‖, ‖θ_k − θ_SF(t)‖;
      `midpoint_central`, `midpoint_stable`: the same from the second-order midpoint
      (θ_{k−1} + 2θ_k + θ_{k+1})/4 (θ_0 at the start).
    - `status`, `central_status`, `stable_status` (B,): codes of `STATUS_NAMES` (`success`
      only for a finite run; the flows' `max_steps`/`failed` from the solver).
    """

    t: Float[Array, " T"]
    steps: Array
    loss: Float[Array, "B T"]
    loss_average: Float[Array, "B T"]
    nu: Float[Array, "B T"]
    effective_sharpness: Float[Array, "B T"]
    central_loss: Float[Array, "B T"]
    central_predicted_loss: Float[Array, "B T"]
    central_nu: Float[Array, "B T"]
    central_effective_sharpness: Float[Array, "B T"]
    variance: Float[Array, "B T"]
    stable_loss: Float[Array, "B T"]
    stable_nu: Float[Array, "B T"]
    stable_effective_sharpness: Float[Array, "B T"]
    distance_central: Float[Array, "B T"]
    distance_stable: Float[Array, "B T"]
    midpoint_central: Float[Array, "B T"]
    midpoint_stable: Float[Array, "B T"]
    status: Array
    central_status: Array
    stable_status: Array
    window: int = eqx.field(static=True)


@eqx.filter_jit
def _rmsprop_run(flow, static, unravel, objective, y0, nu0, steps, ts, rtol, max_steps):
    """Discrete scalar RMSProp (steps + 1 steps, every iterate and ν_k kept) and the central
    and stable flows (saved at `ts`), for every row of `y0` (θ₀) and `nu0` (ν₀)."""
    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    grad = jax.grad(loss)

    def discrete(theta, nu):
        def step(carry, _):
            theta, nu = carry
            g = grad(theta)
            nu_next = flow.beta2 * nu + (1 - flow.beta2) * jnp.vdot(g, g)
            return (theta - flow.lr * g / (jnp.sqrt(nu_next) + flow.eps), nu_next), (theta, nu)

        _, (thetas, nus) = jax.lax.scan(step, (theta, nu), None, length=steps + 2)
        return thetas, nus

    def solve(field, y):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: field(grad, y)), dfx.Tsit5(), ts[0], ts[-1], None,
            y, saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            max_steps=max_steps, throw=False)
        ok = sol.result == dfx.RESULTS.successful
        status = jnp.where(ok, SUCCESS, jnp.where(
            sol.result == dfx.RESULTS.max_steps_reached, MAX_STEPS, FAILED))
        return sol.ys, status

    def member(theta0, nu0):
        thetas, nus = discrete(theta0, nu0)
        central, central_status = solve(flow, jnp.append(theta0, nu0))
        stable, stable_status = solve(flow.stable, jnp.append(theta0, nu0))
        return thetas, nus, central, central_status, stable, stable_status

    return jax.vmap(member)(y0, nu0)


@eqx.filter_jit
def _rmsprop_observe(flow, static, unravel, objective, ys):
    """The flow's `RMSPropOscillation` at every state of `ys` (B, N, P + 1), shaped (B, N)."""

    def loss(y):
        return objective(eqx.combine(unravel(y), static))

    grad = jax.grad(loss)
    b, n = ys.shape[:2]
    seen = jax.lax.map(lambda y: flow.oscillation(grad, y[:-1], y[-1], loss),
                       ys.reshape(b * n, -1))
    return jtu.tree_map(lambda x: x.reshape((b, n) + x.shape[1:]), seen)


def rmsprop_central_flow_comparison(
    objective: Objective,
    model: AbstractModel | Ensemble,
    lr: ScalarLike,
    steps: int,
    *,
    beta2: ScalarLike = 0.99,
    eps: ScalarLike = 0.0,
    nu0: ScalarLike | None = None,
    n_save: int = 101,
    relaxation: ScalarLike = 2.0,
    window: int = 8,
    rtol: ScalarLike = 1e-8,
    max_steps: int = 100_000,
    eigensolver: str = "auto",
) -> RMSPropComparison:
    """Run discrete scalar RMSProp (`steps` steps), its central flow and its stable flow
    (`RMSPropCentralFlow`) from every member of `model`, to t = `lr`·`steps`, and compare them
    at `n_save` saves.

    **Arguments:**

    - `objective`, `model`: as for `gradient_flow` (a model or an `Ensemble`).
    - `lr`: η > 0; `steps`: RMSProp steps, a multiple of `n_save` − 1 (saves fall on steps).
    - `beta2`, `eps`, `relaxation`, `eigensolver`: of the `RMSPropCentralFlow`.
    - `nu0`: the start ν₀ > 0 of every run (default: ‖∇L(θ₀)‖² of each member, so that ν
      starts at its stable-flow value instead of RMSProp's usual 0, whose first steps are
      of size η/√(1 − β₂) regardless of the loss).
    - `window`: steps in the moving average of RMSProp's loss (≥ 1).
    - `rtol`, `max_steps`: of the flows (Tsit5, atol = rtol).

    **Returns:** an `RMSPropComparison`. Keeps every RMSProp iterate (B·steps·P numbers):
    meant for small models.

    **Example:**

        cmp = rmsprop_central_flow_comparison(objective, net, lr=0.01, steps=300, beta2=0.9)
        cmp.central_effective_sharpness  # ≈ 2 once RMSProp is at the edge of stability
    """
    ensemble = as_ensemble(model)
    check_objective(objective)
    number("lr", lr, ">0", fix="the learning rate of scalar RMSProp")
    steps, n_save, window = _check_schedule(steps, n_save, window, "step")
    if nu0 is not None:
        number("nu0", nu0, ">0", fix="the start value of ν, or None (‖∇L(θ₀)‖²)")
    number("rtol", rtol, "rtol", fix="e.g. rtol=1e-8 (the default)")
    max_steps = integer("max_steps", max_steps, minimum=1)
    flow = RMSPropCentralFlow(lr, beta2, eps, relaxation, eigensolver)
    params, static = eqx.partition(ensemble.models, eqx.is_inexact_array)
    y0 = jax.vmap(lambda p: jfu.ravel_pytree(p)[0])(params)
    _, unravel = flat_member(params)
    if nu0 is None:
        start = jax.vmap(jax.grad(lambda y: objective(eqx.combine(unravel(y), static))))(y0)
        nus = jnp.sum(start**2, axis=1)
        if not bool(jnp.all(nus > 0)):
            raise ArgumentError("a member starts at a stationary point (‖∇L(θ₀)‖ = 0), where "
                                "ν₀ = ‖∇L(θ₀)‖² is 0; pass `nu0` > 0.")
    else:
        nus = jnp.full((ensemble.size,), float(nu0))
    ts = jnp.linspace(0.0, float(lr) * steps, n_save)
    thetas, nu_k, central, cstatus, stable, sstatus = _rmsprop_run(
        flow, static, unravel, objective, y0, nus, steps, ts, jnp.asarray(rtol, float),
        max_steps)

    def observe_all(ys):
        return _rmsprop_observe(flow, static, unravel, objective, ys)

    at = np.arange(n_save) * (steps // (n_save - 1))
    discrete = jnp.concatenate([thetas, nu_k[..., None]], axis=-1)
    seen_d = observe_all(discrete[:, at])
    seen_c, seen_s = observe_all(central), observe_all(stable)
    losses = jax.vmap(jax.vmap(lambda y: objective(eqx.combine(unravel(y), static))))(
        thetas[:, :steps + 1])
    theta_k, midpoint = _at_saves(thetas, at)
    finite = jnp.all(jnp.isfinite(thetas), axis=(1, 2)) & jnp.all(jnp.isfinite(losses), axis=1)
    status = mark_loss_increased(losses[:, at], jnp.where(finite, SUCCESS, DIVERGED))

    def flow_status(code, ys, seen):
        ok = jnp.all(jnp.isfinite(ys), axis=(1, 2)) & jnp.all(jnp.isfinite(seen.loss), axis=1)
        return mark_loss_increased(seen.loss, jnp.where((code == SUCCESS) & ~ok, DIVERGED,
                                                        code))

    return RMSPropComparison(
        t=ts, steps=jnp.asarray(at), loss=losses[:, at],
        loss_average=jnp.asarray(_moving_average(np.asarray(losses), window)[:, at]),
        nu=nu_k[:, at], effective_sharpness=seen_d.effective_sharpness,
        central_loss=seen_c.loss, central_predicted_loss=seen_c.predicted_loss,
        central_nu=central[..., -1], central_effective_sharpness=seen_c.effective_sharpness,
        variance=seen_c.variance, stable_loss=seen_s.loss, stable_nu=stable[..., -1],
        stable_effective_sharpness=seen_s.effective_sharpness,
        distance_central=jnp.linalg.norm(theta_k - central[..., :-1], axis=-1),
        distance_stable=jnp.linalg.norm(theta_k - stable[..., :-1], axis=-1),
        midpoint_central=jnp.linalg.norm(midpoint - central[..., :-1], axis=-1),
        midpoint_stable=jnp.linalg.norm(midpoint - stable[..., :-1], axis=-1),
        status=status, central_status=flow_status(cstatus, central, seen_c),
        stable_status=flow_status(sstatus, stable, seen_s), window=window)
