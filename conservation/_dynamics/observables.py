"""Observables: functions of (θ, data) evaluated per member at every save of a run, next to the
laws (functions of θ alone): the sharpness, the gradient norm, a held-out loss and the distance
of the empirical neural tangent kernel from its value at initialisation.

An observable is an `equinox.Module`. Its static fields (`k`, `iterations`, `name`) are part
of the compiled program; its array fields (`tol`, a held-out data set, probe inputs) are
traced, so new values reuse the program.
"""

import abc
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp

from .._custom_types import Array, Float, PyTree
from .._data.objective import Objective
from .._validation import ArgumentError, fail, integer, is_traced, number


def _flat(model):
    """(flat inexact parameters y, y ↦ model)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y, unravel = jfu.ravel_pytree(params)
    return y, lambda z: eqx.combine(unravel(z), static)


class AbstractObservable(eqx.Module):
    """A quantity of (θ, data) monitored at every save of a run (`gradient_flow(...,
    observables=...)`, `train(..., observables=...)`), per member, into
    `Result.observables[name]` of shape (B, T, *shape).

    Subclasses define `name` (a field or property: a unique label), `shape` (default ()),
    `__call__(objective, model, reference)` (the value at one model; `objective` is the run's
    objective) and, when the value compares with the start, `reference(objective, model)`
    (evaluated once per member at θ₀, default None).
    """

    # Whether `reference` is used: such an observable cannot continue a resumed run (its
    # reference at the original θ₀ is not kept in a `Result`).
    from_start = False

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short unique label (the key in `Result.observables`)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one value (one member, one save)."""
        return ()

    def reference(self, objective: Objective, model) -> PyTree:
        """What later values compare with, evaluated at θ₀ (default: nothing)."""
        del objective, model
        return None

    @abc.abstractmethod
    def __call__(self, objective: Objective, model, reference: PyTree) -> Array:
        """The value at `model` (one model, not an ensemble)."""


class Sharpness(AbstractObservable):
    """The top-`k` eigenvalues λ₁ ≥ … ≥ λ_k (largest algebraic) of the Hessian ∇²L(θ) of the
    run's objective, shape (k,), without ever forming the Hessian.

    A block Krylov method: blocks of b = min(k + 2, P) orthonormal vectors (P the parameter
    count; the block size lets an eigenvalue repeated up to b times appear as often as it is
    repeated), each the Hessian-vector products (`jax.jvp` of `jax.grad`) of the previous
    block, re-orthogonalised against the whole basis (twice); the Rayleigh-Ritz values of
    the basis after each block. It stops when every one of the top k Ritz pairs (θ_i, u_i)
    has residual ‖Hu_i − θ_i u_i‖ ≤ `tol` · max_j |θ_j| (estimated from the last block,
    then checked on the true residual), which bounds the error: some Hessian
    eigenvalue lies within that residual of θ_i (and within residual²/gap when θ_i is
    separated by `gap` from the rest of the spectrum). An eigenvalue whose pair has not
    converged after `iterations` blocks is NaN, never a silently inaccurate number: raise
    `iterations`. When the basis spans all P directions the values are exact.

    Memory: two copies of the basis, 2 · `iterations` · b · P numbers per member evaluated at
    once, e.g. 2 · 40 · 3 · 10⁵ · 8 B = 192 MB for P = 10⁵ and k = 1; never P².

    Not warm-started: every save starts from the same fixed random block (a diffrax save is a
    function of the state at that time only), so a value depends only on θ.

    **Arguments:** `k` (≥ 1, default 1); `iterations`: the most blocks (≥ 1, default 40);
    `tol`: the relative residual, in (0, 1) (default 1e-8; traced); `name` (default
    "sharpness").

    ```python
    observables = (cn.Sharpness(k=3), cn.GradientNorm())
    ```
    """

    k: int = eqx.field(default=1, static=True)
    iterations: int = eqx.field(default=40, static=True)
    tol: Array = eqx.field(default=1e-8, converter=jnp.asarray)
    name: str = eqx.field(default="sharpness", static=True)

    def __check_init__(self):
        integer("k", self.k, minimum=1, fix="the number of top Hessian eigenvalues")
        integer("iterations", self.iterations, minimum=1,
                fix="the most Krylov blocks (Hessian-vector products of k + 2 vectors each)")
        if not is_traced(self.tol):
            number("tol", self.tol.tolist(), "(0,1)",
                   fix="the relative residual of the eigenpairs, e.g. 1e-8")
        _check_name(self.name)

    @property
    def shape(self):
        return (self.k,)

    def __call__(self, objective, model, reference=None):
        del reference
        y, as_model = _flat(model)
        grad = jax.grad(lambda z: objective(as_model(z)))

        def hvp(v):
            return jax.jvp(grad, (y,), (v,))[1]

        return top_eigenvalues(hvp, y, self.k, self.iterations, self.tol)


def top_eigenvalues(hvp, y: Float[Array, " P"], k: int, iterations: int,
                    tol) -> Float[Array, " k"]:
    """The top-`k` eigenvalues (largest first) of the symmetric operator `hvp` on vectors like
    `y`, by the block Krylov / Rayleigh-Ritz iteration `Sharpness` describes (NaN where a pair
    did not converge to `tol`)."""
    n = y.size
    k_eff = min(k, n)
    b = min(n, k + 2)
    # The last block of a basis that reaches all n directions keeps only the vectors left.
    blocks = max(1, min(iterations, -(-n // b)))
    size = blocks * b
    x0 = jax.random.normal(jax.random.PRNGKey(0), (n, b), y.dtype)
    basis = jnp.zeros((size, n), y.dtype).at[:b].set(jnp.linalg.qr(x0)[0].T)
    images = jnp.zeros((size, n), y.dtype)
    gram = jnp.zeros((size, size), y.dtype)
    index = jnp.arange(size)

    def ritz(gram, filled):
        # The Rayleigh-Ritz pairs of the first `filled` basis vectors (coefficients in the
        # basis). The unfilled block of the projected matrix is decoupled and set below
        # every filled Ritz value (whose magnitudes are ≤ its Frobenius norm), at the same
        # scale so that `eigh` keeps the filled block's accuracy.
        active = index < filled
        g = jnp.where(active[:, None] & active[None, :], 0.5 * (gram + gram.T), 0.0)
        pad = -2.0 * jnp.sqrt(jnp.sum(g * g))
        theta, s = jnp.linalg.eigh(g + jnp.diag(jnp.where(active, 0.0, pad)))
        scale = jnp.max(jnp.where(active, jnp.abs(theta), 0.0))
        return theta[::-1][:k_eff], s[:, ::-1][:, :k_eff], scale

    def body(state):
        j, basis, images, gram, _ = state
        start = j * b
        x = jax.lax.dynamic_slice_in_dim(basis, start, b)
        w = jax.vmap(hvp)(x)  # (b, n): H applied to the block
        images = jax.lax.dynamic_update_slice_in_dim(images, w, start, 0)
        column = basis @ w.T  # (size, b): Vᵀ H x (unfilled rows are 0)
        gram = jax.lax.dynamic_update_slice(gram, column, (0, start))
        gram = jax.lax.dynamic_update_slice(gram, column.T, (start, 0))
        filled = jnp.minimum(start + b, n)
        top, s, scale = ritz(gram, filled)
        # The next block: H x orthogonalised against the whole basis, twice (one pass loses
        # orthogonality once the Krylov space nearly closes), each followed by a QR:
        # (I − VVᵀ) H x = Z R with Z the new block and R = R₂R₁ (b × b).
        z, r = w - column.T @ basis, jnp.eye(b, dtype=y.dtype)
        for _ in range(2):
            if _:
                z = z - (z @ basis.T) @ basis
            q, r_pass = jnp.linalg.qr(z.T)
            z, r = q.T, r_pass @ r
        # With the basis orthonormal, the residual H u − θu of a Ritz vector u = V s lies
        # outside the basis, where only the last block's images reach: it is Zᵀ R s_last,
        # of norm ‖R s_last‖ (checked on the true residual at the end).
        s_last = jax.lax.dynamic_slice_in_dim(s, start, b)
        estimate = jnp.linalg.norm(r @ s_last, axis=0)
        converged = (estimate <= tol * scale) | (filled >= n)
        # Past n directions there are none left: those vectors are 0 (no Ritz values).
        z = jnp.where((filled + jnp.arange(b) < n)[:, None], z, 0.0)
        if blocks > 1:  # (after the last block the loop ends: what it writes is not read)
            basis = jax.lax.dynamic_update_slice_in_dim(
                basis, z, jnp.minimum(start + b, size - b), 0)
        return j + 1, basis, images, gram, jnp.all(converged)

    def cond(state):
        j, *_, converged = state
        return (j < blocks) & ~converged

    j, basis, images, gram, _ = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), basis, images, gram, jnp.asarray(False)))
    # The true residuals of the pairs found, ‖H u − θ u‖ (one pass over the basis), decide.
    filled = jnp.minimum(j * b, n)
    top, s, scale = ritz(gram, filled)
    residual = jnp.linalg.norm(s.T @ images - top[:, None] * (s.T @ basis), axis=1)
    top = jnp.where((residual <= tol * scale) | (filled >= n), top, jnp.nan)
    if k_eff < k:  # a model with fewer parameters than k: no more eigenvalues
        top = jnp.concatenate([top, jnp.full(k - k_eff, jnp.nan, y.dtype)])
    return top


class GradientNorm(AbstractObservable):
    """‖∇L(θ)‖₂ of the run's objective, over all parameters (without weight decay).

    ```python
    observables = (cn.GradientNorm(),)
    ```
    """

    name: str = eqx.field(default="gradient_norm", static=True)

    def __check_init__(self):
        _check_name(self.name)

    def __call__(self, objective, model, reference=None):
        del reference
        y, as_model = _flat(model)
        return jnp.linalg.norm(jax.grad(lambda z: objective(as_model(z)))(y))


class HeldOutLoss(AbstractObservable):
    """The loss of another objective (held-out data, another loss) at θ: `objective(model)`.

    **Arguments:** `objective`: from `conservation.make_objective` on the held-out data (a
    pytree: new data of the same shapes reuse the compiled run); `name` (default
    "held_out_loss").

    ```python
    held_out = cn.make_objective(cn.MSE(), test_data, model)
    observables = (cn.HeldOutLoss(held_out),)
    ```
    """

    objective: Objective
    name: str = eqx.field(default="held_out_loss", static=True)

    def __check_init__(self):
        if not isinstance(self.objective, Objective):
            raise fail("objective", self.objective,
                       "must come from `conservation.make_objective(...)`",
                       "the objective on the held-out data")
        _check_name(self.name)

    def __call__(self, objective, model, reference=None):
        del objective, reference
        return self.objective(model)


class KernelDistance(AbstractObservable):
    """The distance of the empirical neural tangent kernel on the probe inputs from its value
    at initialisation, 1 − ⟨K₀, K⟩_F / (‖K₀‖_F ‖K‖_F) (Fort et al. 2020; Kunin et al. 2024:
    ≈ 0 in lazy training, grows in rich training), in [0, 2].

    K = J Jᵀ, J = ∂f(θ, x_probe)/∂θ the Jacobian of all outputs on the probe batch
    ((N · outputs) × P): K is (N · outputs)², its memory N · outputs · P per member
    evaluated. Computed as ½‖K₀/‖K₀‖ − K/‖K‖‖²_F (equal to the expression above), so a
    small distance keeps its relative accuracy instead of the ~1e-16 absolute of 1 − cos.
    NaN where a kernel is 0 (no direction to compare: e.g. every parameter 0).

    **Arguments:** `x_probe`: inputs, shape (N, *input shape) (traced: new probes of the
    same shape reuse the program); `name` (default "kernel_distance").

    ```python
    observables = (cn.KernelDistance(data.x[:16]),)
    ```
    """

    x_probe: Array = eqx.field(converter=jnp.asarray)
    name: str = eqx.field(default="kernel_distance", static=True)
    from_start = True

    def __check_init__(self):
        if self.x_probe.ndim < 1 or self.x_probe.shape[0] < 1:
            raise fail("x_probe", self.x_probe.shape,
                       "must be a batch of at least one input (shape (N, ...))")
        if not is_traced(self.x_probe):
            number("x_probe", self.x_probe.tolist() if self.x_probe.size <= 16 else
                   self.x_probe, array=True)
        _check_name(self.name)

    def kernel(self, model) -> Float[Array, "NO NO"]:
        """The empirical NTK J Jᵀ on `x_probe` (outputs flattened)."""
        y, as_model = _flat(model)

        def outputs(z):
            return jax.vmap(as_model(z))(self.x_probe).reshape(-1)

        jac = jax.jacrev(outputs)(y)
        return jac @ jac.T

    def reference(self, objective, model):
        del objective
        return self.kernel(model)

    def __call__(self, objective, model, reference):
        del objective
        k0, k = reference, self.kernel(model)
        a = k0 / jnp.linalg.norm(k0)
        b = k / jnp.linalg.norm(k)
        return 0.5 * jnp.sum((a - b) ** 2)


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise fail("name", name, "must be a non-empty string")


def check_observables(observables) -> tuple[AbstractObservable, ...]:
    """`observables`: a sequence of `AbstractObservable`s with unique names (or None / ())."""
    if observables is None:
        return ()
    if isinstance(observables, AbstractObservable):
        observables = (observables,)
    if isinstance(observables, str | bytes) or not isinstance(observables, Iterable):
        raise fail("observables", observables, "must be a sequence of observables",
                   "e.g. (conservation.Sharpness(k=3), conservation.GradientNorm())")
    observables = tuple(observables)
    for o in observables:
        if not isinstance(o, AbstractObservable):
            raise fail("observables", o, "must hold only conservation observables",
                       "e.g. conservation.Sharpness(k=3), conservation.GradientNorm()")
    names = [o.name for o in observables]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ArgumentError(f"`observables` repeat the names {repeated}; give each its own "
                            "`name=`.")
    return observables


class ObservableMonitor(eqx.Module):
    """Evaluates a fixed tuple of observables on one model (inside a run)."""

    observables: tuple[AbstractObservable, ...]
    objective: Objective

    def reference(self, model) -> dict[str, PyTree]:
        return {o.name: o.reference(self.objective, model) for o in self.observables}

    def values(self, model, reference) -> dict[str, Array]:
        return {o.name: jnp.asarray(o(self.objective, model, reference[o.name]), float)
                for o in self.observables}



def check_resumed_observables(resume, observables) -> None:
    """A resumed run (`resume=`) goes on with the observables of the run it continues, none of
    which compares with the start (its reference at the original θ₀ is not in a Result)."""
    names = sorted(o.name for o in observables)
    if names != sorted(resume.observables):
        raise ArgumentError(
            f"`observables` {names} differ from the resumed run's "
            f"{sorted(resume.observables)}; resume with the same observables.")
    started = [o.name for o in observables if o.from_start]
    if started:
        raise ArgumentError(
            f"`observables` {started} compare with the start of the run, which a resumed run "
            "does not keep; run to the final time at once to monitor them.")
