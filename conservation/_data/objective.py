"""The training objective L(θ) = mean_i ℓ(f(θ, x_i), y_i), and its moment fast path.

For MSE on a tensorizable model f = ψ(x) Φ(θ), the risk depends on the data only through the
Gram matrix of [Ψ Y] (M = mean ψᵀψ, B = mean ψᵀY, C = mean YᵀY, c = tr C):

    L(θ) = tr(Φᵀ M Φ) − 2 tr(Bᵀ Φ) + c = ‖R [Φ; −I]‖²,   RᵀR = [[M, B], [Bᵀ, C]],

whose cost does not grow with the number of (augmented) samples. The loss is evaluated in
the factored form ‖FΦ − Z‖² (F, Z the column blocks of R): never negative, and — with R from
a QR of the data — accurate relative to L itself down to L ≈ 1e-20 · c, where the expanded
form above loses all digits once L < ulp(c).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar
from .._memory import check_moments
from .._models.base import AbstractModel, AbstractTensorizableModel, Ensemble
from .._validation import ArgumentError, fail, integer, model_parameters
from .augmentation import Augmentation, _check_dims, as_augmentation
from .dataset import Dataset, check_model_data, targets_fit
from .losses import MSE, AbstractLoss


class Moments(eqx.Module):
    """Data moments of a tensorizable model's features, and a factor of their Gram matrix.

    - `M` (p×p) = mean ψᵀψ, `B` (p×m) = mean ψᵀY, `C` (m×m) = mean YᵀY, `c` = tr C.
    - `R` (k×(p+m)): RᵀR = [[M, B], [Bᵀ, C]]. From data (`from_data`) it is the R factor of a
      QR of [Ψ Y]/√n (TSQR over chunks), so `risk` keeps its relative accuracy near a perfect
      fit; from moments alone (`from_gram`, e.g. after exact O(d) symmetrisation) it comes from
      an eigendecomposition, and `risk` has an absolute error ~1e-16 · (‖M‖‖Φ‖² + c).
    """

    M: Float[Array, "p p"]
    B: Float[Array, "p m"]
    C: Float[Array, "m m"]
    R: Float[Array, "k p+m"]
    n: int = eqx.field(static=True)

    @property
    def c(self) -> Scalar:
        """mean ‖Y‖² = tr C."""
        return jnp.trace(self.C)

    @classmethod
    def from_data(
        cls, model: AbstractTensorizableModel, data: Dataset, *, chunk_size: int = 1024
    ) -> "Moments":
        """Accumulate the moments of `data` under `model.features`, `chunk_size` samples at a
        time (memory O(chunk_size · rows · p + p²), not O(N)), through a QR of [Ψ Y]/√n."""
        if isinstance(model, Ensemble):
            model = model[0]
        if not isinstance(model, AbstractTensorizableModel):
            raise ArgumentError(f"`model` ({type(model).__name__}) is not tensorizable: no "
                                "moment fast path; evaluate the loss per sample.")
        if not isinstance(data, Dataset):
            raise fail("data", data, "must be a `conservation.Dataset`")
        chunk_size = integer("chunk_size", chunk_size, minimum=1)
        check_model_data(model, data)
        return _accumulate_moments(model, data, min(chunk_size, len(data)))

    @classmethod
    def from_gram(cls, M: Float[Array, "p p"], B: Float[Array, "p m"],
                  C: Float[Array, "m m"], n: int) -> "Moments":
        """Moments from (M, B, C) alone, with R from an eigendecomposition of the (symmetrised)
        Gram matrix, negative round-off eigenvalues set to 0 (so `risk` ≥ 0; its absolute
        error is ~1e-16 · ‖[[M, B], [Bᵀ, C]]‖ · ‖[Φ; −I]‖², as for the expanded form)."""
        n = integer("n", n, minimum=1)
        M, B, C = (jnp.asarray(a) for a in (M, B, C))
        if not (M.ndim == B.ndim == C.ndim == 2 and M.shape == (B.shape[0],) * 2
                and C.shape == (B.shape[1],) * 2):
            raise ArgumentError(f"`M`, `B`, `C` must have shapes (p, p), (p, m), (m, m), got "
                                f"{M.shape}, {B.shape}, {C.shape}.")
        M = 0.5 * (M + M.T)
        C = 0.5 * (C + C.T)
        return cls(M, B, C, _gram_factor(M, B, C), n)

    def risk(self, phi: Float[Array, "p m"]) -> Scalar:
        """L = ‖FΦ − Z‖² with [F Z] = R (= tr(ΦᵀMΦ) − 2 tr(BᵀΦ) + c, never negative)."""
        p = self.M.shape[0]
        residual = self.R[:, :p] @ phi - self.R[:, p:]
        return jnp.sum(residual * residual)


def _gram_factor(M, B, C):
    gram = jnp.block([[M, B], [B.T, C]])
    lam, vectors = jnp.linalg.eigh(gram)
    return jnp.sqrt(jnp.maximum(lam, 0.0))[:, None] * vectors.T


def _qr_r(a):
    return jnp.linalg.qr(a, mode="r")


@eqx.filter_jit
def _accumulate_moments(model, data, chunk_size):
    n = len(data)
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    # Padded samples weigh 0; every row carries 1/√n so that RᵀR is the mean, not the sum.
    weight = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(n_chunks, chunk_size)
    weight = weight / math.sqrt(n)

    def chunked(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n_chunks, chunk_size, *a.shape[1:])

    psi0 = model.features(data.x[0])
    rows, p = psi0.shape
    m = data.y[0].size // rows

    def step(r, chunk):
        x, y, w = chunk
        psi = jax.vmap(model.features)(x) * w[:, None, None]
        y = y.reshape(chunk_size, rows, m) * w[:, None, None]
        a = jnp.concatenate([psi.reshape(-1, p), y.reshape(-1, m)], axis=1)
        # TSQR: the R factor of [R_old; A_chunk] is that of all rows so far (backward
        # stable, unlike summing ψᵀψ, so the factored loss keeps its digits near a fit).
        return _qr_r(jnp.concatenate([r, a]))[: p + m], None

    zero = jnp.zeros((p + m, p + m), psi0.dtype)
    r, _ = jax.lax.scan(step, zero, (chunked(data.x), chunked(data.y), weight))
    gram = r.T @ r
    return Moments(gram[:p, :p], gram[:p, p:], gram[p:, p:], r, n)


class Objective(eqx.Module):
    """L(θ) = mean over `data` of `loss`, evaluated through `moments` when they are given.

    An `Objective` is a pytree: passing a new data set of the same shapes to a compiled run
    does not recompile.
    """

    loss: AbstractLoss
    data: Dataset
    moments: Moments | None = None
    augmentation: Augmentation | None = None

    def __call__(self, model: AbstractModel) -> Scalar:
        """L(θ) of one model (not an ensemble: `jax.vmap` over its members, or index it).
        Parameters of another float dtype are converted to float64, with a warning."""
        model = _member(model)
        if self.moments is not None:
            if not isinstance(model, AbstractTensorizableModel):
                raise ArgumentError(
                    f"`model` ({type(model).__name__}) is not tensorizable but this objective "
                    "evaluates through the moments of a tensorizable model: build the "
                    "objective for this model with make_objective(loss, data, model).")
            phi = model.tensorize()
            if phi.shape != self.moments.B.shape:
                raise ArgumentError(
                    f"`model` ({type(model).__name__}) has a parameter map Φ of shape "
                    f"{phi.shape} but this objective's moments are for shape "
                    f"{self.moments.B.shape}: it was built for another architecture; build "
                    "it for this model with make_objective(loss, data, model).")
            return self.moments.risk(phi)
        return self._sample_risk(model)

    def sample_risk(self, model: AbstractModel) -> Scalar:
        """The per-sample evaluation mean_i ℓ(f(θ, x_i), y_i) over the (augmented) data,
        never using the moments."""
        return self._sample_risk(_member(model))

    def _sample_risk(self, model):
        data = self.data if self.augmentation is None else self.augmentation.apply(self.data)
        try:
            predictions = jax.vmap(model)(data.x)
        except ArgumentError:
            raise
        except Exception as e:  # noqa: BLE001 — shapes are static: a failure here is a mismatch
            raise ArgumentError(
                f"`model` ({type(model).__name__}) cannot take this objective's inputs of shape "
                f"{tuple(data.x.shape[1:])} ({type(e).__name__}: {str(e)[:200]}); the "
                "objective was built for another architecture or data.") from None
        if not targets_fit(predictions.shape[1:], data.y.shape[1:], self.loss):
            # Broadcasting would silently give another number.
            raise ArgumentError(
                f"`model` ({type(model).__name__}) outputs shape {predictions.shape[1:]} but "
                f"this objective's targets have shape {data.y.shape[1:]}; the objective was "
                "built for another architecture or data.")
        return jnp.mean(jax.vmap(self.loss)(predictions, data.y))

    def on(self, index: Array) -> "Objective":
        """The per-sample objective on the base samples at `index` (a minibatch), each with
        its whole orbit when the data are augmented."""
        return Objective(self.loss, self.data.subset(index), augmentation=self.augmentation)


def make_objective(
    loss: AbstractLoss,
    data: Dataset,
    model: AbstractModel | Ensemble | None = None,
    *,
    moments: bool | str = "auto",
    augment=None,
) -> Objective:
    """Build the objective of `loss` on `data` for models like `model`.

    **Arguments:**

    - `loss`: e.g. `conservation.MSE()`.
    - `data`: a `conservation.Dataset`.
    - `model`: a model (or ensemble) of the architecture to be trained; needed for the
      moment fast path.
    - `moments`: `"auto"` uses the moment fast path whenever it is exact (MSE on a tensorizable
      model); `True` demands it; `False` always evaluates per sample.
    - `augment`: a group (or `conservation.Augmentation`) to augment `data` by. On the moment
      path the moments of `data` are symmetrised exactly (cost independent of the orbit size;
      exact O(d) allowed); otherwise every evaluation averages over the orbits.

    **Returns:** an `Objective`, callable as `objective(model) -> L(θ)`.
    """
    if not isinstance(loss, AbstractLoss):
        raise ArgumentError(f"`loss` must be a conservation loss such as `MSE()`, got "
                            f"{loss!r}.")
    if not isinstance(data, Dataset):
        raise ArgumentError(f"`data` must be a `conservation.Dataset`, got "
                            f"{type(data).__name__}; build one with Dataset(x, y).")
    if not (isinstance(moments, bool) or (isinstance(moments, str) and moments == "auto")):
        raise fail("moments", moments, "must be 'auto', True or False")
    member = model[0] if isinstance(model, Ensemble) else model
    if member is not None:
        member = _member(member)
        check_model_data(member, data, loss)
    possible = isinstance(loss, MSE) and isinstance(member, AbstractTensorizableModel)
    if moments is True and not possible:
        raise ArgumentError(
            "`moments=True` needs the MSE loss and a tensorizable model (DeepLinear, "
            f"PolynomialNet, LightningAttention); got loss {loss.name!r} and model "
            f"{type(member).__name__}. Use `moments='auto'`."
        )
    augmentation = as_augmentation(augment)
    if possible and moments is not False:
        check_moments(member, data, symmetrized=augment is not None)  # before building them
        base = Moments.from_data(member, data)
        if augmentation is not None:
            _check_dims(augmentation, data)
            base = augmentation.symmetrize(base, member)
        return Objective(loss, data, base, augmentation)
    if augmentation is not None:
        augmentation.apply(data.subset(jnp.arange(1)))  # fail now, not inside a run
    return Objective(loss, data, augmentation=augmentation)


def _member(model):
    """One model, in float64: the checks an objective needs of what it is evaluated on (static
    structure and dtypes: at trace time, inside `jit` as well)."""
    if isinstance(model, Ensemble):
        raise ArgumentError(
            f"`model` is an Ensemble of {model.size}; an objective evaluates one model: "
            "pass ensemble[i], or jax.vmap the objective over ensemble.models.")
    if not isinstance(model, eqx.Module):
        raise fail("model", model, "must be an `equinox.Module`",
                   "wrap a function f(params, x) as conservation.FunctionModel(f, params)")
    return model_parameters(model)
