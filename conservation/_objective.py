"""The training objective L(θ) = mean_i ℓ(f(θ, x_i), y_i), and its moment fast path.

For MSE on a tensorizable model f = ψ(x) Φ(θ), the risk depends on the data only through the
moments M = mean ψᵀψ, B = mean ψᵀY, c = mean ‖Y‖²:

    L(θ) = tr(Φᵀ M Φ) − 2 tr(Bᵀ Φ) + c,

whose cost does not grow with the number of (augmented) samples.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from ._augmentation import Augmentation, _check_dims, as_augmentation
from ._custom_types import Array, Float, Scalar
from ._data import Dataset, check_model_data
from ._losses import MSE, AbstractLoss
from ._model import AbstractModel, AbstractTensorizableModel, Ensemble


class Moments(eqx.Module):
    """Data moments (M, B, c) of a tensorizable model's features."""

    M: Float[Array, "p p"]
    B: Float[Array, "p m"]
    c: Scalar
    n: int = eqx.field(static=True)

    @classmethod
    def from_data(
        cls, model: AbstractTensorizableModel, data: Dataset, *, chunk_size: int = 1024
    ) -> "Moments":
        """Accumulate the moments of `data` under `model.features`, `chunk_size` samples at a
        time (memory O(chunk_size · rows · p), not O(N))."""
        if isinstance(model, Ensemble):
            model = model[0]
        if not isinstance(model, AbstractTensorizableModel):
            raise TypeError(f"{type(model).__name__} is not tensorizable: no moment fast path.")
        return _accumulate_moments(model, data, min(chunk_size, len(data)))

    def risk(self, phi: Float[Array, "p m"]) -> Scalar:
        """tr(ΦᵀMΦ) − 2 tr(BᵀΦ) + c."""
        return jnp.sum(phi * (self.M @ phi - 2.0 * self.B)) + self.c


@eqx.filter_jit
def _accumulate_moments(model, data, chunk_size):
    n = len(data)
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    weight = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(n_chunks, chunk_size)

    def chunked(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n_chunks, chunk_size, *a.shape[1:])

    psi0 = model.features(data.x[0])
    rows, p = psi0.shape
    m = data.y[0].size // rows

    def step(acc, chunk):
        x, y, w = chunk
        psi = jax.vmap(model.features)(x) * w[:, None, None]  # padded samples weigh 0
        y = y.reshape(chunk_size, rows, m)
        M, B, c = acc
        M = M + jnp.einsum("nrp,nrq->pq", psi, psi)
        B = B + jnp.einsum("nrp,nrm->pm", psi, y)
        c = c + jnp.sum(w * jnp.sum(y**2, axis=(1, 2)))
        return (M, B, c), None

    zero = (jnp.zeros((p, p), psi0.dtype), jnp.zeros((p, m), psi0.dtype), jnp.zeros((), psi0.dtype))
    (M, B, c), _ = jax.lax.scan(step, zero, (chunked(data.x), chunked(data.y), weight))
    return Moments(M / n, B / n, c / n, n)


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
        if self.moments is not None:
            return self.moments.risk(model.tensorize())
        return self.sample_risk(model)

    def sample_risk(self, model: AbstractModel) -> Scalar:
        """The per-sample evaluation mean_i ℓ(f(θ, x_i), y_i) over the (augmented) data,
        never using the moments."""
        data = self.data if self.augmentation is None else self.augmentation.apply(self.data)
        predictions = jax.vmap(model)(data.x)
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
        raise TypeError(f"`loss` must be a conservation loss such as `MSE()`, got {loss!r}.")
    if not isinstance(data, Dataset):
        raise TypeError(f"`data` must be a `conservation.Dataset`, got {type(data).__name__}.")
    if moments not in ("auto", True, False):
        raise ValueError(f"`moments` must be 'auto', True or False, got {moments!r}.")
    member = model[0] if isinstance(model, Ensemble) else model
    if member is not None:
        check_model_data(member, data)
    possible = isinstance(loss, MSE) and isinstance(member, AbstractTensorizableModel)
    if moments is True and not possible:
        raise ValueError(
            "`moments=True` needs the MSE loss and a tensorizable model (DeepLinear, "
            f"PolynomialNet, LightningAttention); got loss {loss.name!r} and model "
            f"{type(member).__name__}. Use `moments='auto'`."
        )
    augmentation = as_augmentation(augment)
    if possible and moments is not False:
        base = Moments.from_data(member, data)
        if augmentation is not None:
            _check_dims(augmentation, data)
            base = augmentation.symmetrize(base, member)
        return Objective(loss, data, base, augmentation)
    if augmentation is not None:
        augmentation.apply(data.subset(jnp.arange(1)))  # fail now, not inside a run
    return Objective(loss, data, augmentation=augmentation)
