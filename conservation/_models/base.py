"""The model contract and ensembles of models.

A model is an `equinox.Module` whose inexact-array leaves are its parameters θ. Every model
knows its forward pass and its architecture-induced conservation laws. A *tensorizable* model
also exposes the factorisation f(θ, x) = ψ(x) Φ(θ) of the seed paper (arXiv 2606.10913, §2):
a parameter-free feature map ψ(x) ∈ R^{rows×p} and a parameter map Φ(θ) ∈ R^{p×m}, so that the
output (reshaped to rows×m) is the matrix product ψ(x) Φ(θ). Vector-output models have
rows = 1; Lightning Attention has one row per token.
"""

import abc
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu

from .._custom_types import Array, Float, Key
from .._memory import check_members
from .._validation import ArgumentError, fail, integer, model_parameters, prng_key


class AbstractModel(eqx.Module):
    """A network f(θ, x) whose array leaves are the trainable parameters θ."""

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """The output f(θ, x) for one input `x`."""

    @abc.abstractmethod
    def laws(self) -> tuple[Any, ...]:
        """The architecture-induced conservation laws (valid for every data set and loss)."""


class AbstractTensorizableModel(AbstractModel):
    """A model with f(θ, x) = ψ(x) Φ(θ), ψ parameter-free (the seed paper's Ψ, Φ)."""

    @abc.abstractmethod
    def features(self, x: Array) -> Float[Array, "rows p"]:
        """ψ(x): the parameter-free features of one input (independent of θ)."""

    @abc.abstractmethod
    def tensorize(self) -> Float[Array, "p m"]:
        """Φ(θ): the parameters mapped into the intermediate representation."""

    @property
    @abc.abstractmethod
    def feature_degrees(self) -> tuple[int, ...]:
        """ψ(x)'s columns are blocks x^{⊗k} (tensor powers of the last input axis, flattened)
        for these k, in order: a rotation of that axis by g acts on block k as g^{⊗k}."""

    def tensorized_call(self, x: Array) -> Array:
        """f(θ, x) computed as ψ(x) Φ(θ); equals `self(x)` to round-off."""
        out = self.features(x) @ self.tensorize()
        return out.reshape(jax.eval_shape(self, x).shape)


def flat_parameters(model) -> Float[Array, " D"]:
    """The trainable parameters of `model` as one vector (ravel_pytree order)."""
    return jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


class Ensemble(eqx.Module):
    """A batch of models of one architecture, stacked along a leading axis of every parameter.

    Dynamics and monitors are `vmap`ped over this axis, so a whole ensemble of initialisations
    runs as one compiled program.
    """

    models: eqx.Module
    size: int = eqx.field(static=True)

    @classmethod
    def init(cls, factory: Callable[[Key], eqx.Module], key: Key, size: int) -> "Ensemble":
        """`size` models `factory(k)` built from independent keys split from `key` (any
        `equinox.Module` factory, e.g. `lambda k: eqx.nn.MLP(2, 1, 8, 1, key=k)`). Parameters
        of another float dtype are converted to float64 (with a warning)."""
        if not callable(factory):
            raise fail("factory", factory, "must be a function key -> model",
                       "e.g. lambda k: conservation.DeepLinear.random([3, 2], key=k)")
        prng_key("key", key)
        size = integer("size", size, minimum=1)
        check_members(factory, key, size)  # refuse before any member is built
        # Vectorised eagerly, not compiled as one program: XLA would fuse a factory's steps and
        # may round some parameters of a user's factory differently in the last bit. The
        # models' own `random`s are one compiled program each, which vmap runs batched: one
        # program per architecture, reused by every later factory of that architecture.
        # (`jax.vmap`, not `eqx.filter_vmap`: that moves each output's axis 0 to 0 eagerly, a
        # compiled program for every parameter shape.)
        static = []

        def arrays(k):
            params, rest = eqx.partition(factory(k), eqx.is_array)
            static.append(rest)
            return params

        models = eqx.combine(jax.vmap(arrays)(jax.random.split(key, size)), static[0])
        return cls(model_parameters(models, "factory(key)"), size)

    @classmethod
    def stack(cls, models: Sequence[eqx.Module]) -> "Ensemble":
        """Stack models of identical architecture into an ensemble (parameters of another
        float dtype are converted to float64, with a warning)."""
        if isinstance(models, eqx.Module | str) or not hasattr(models, "__iter__"):
            raise fail("models", models, "must be a list of models",
                       "wrap a single model as [model] or use `conservation.as_ensemble(model)`")
        models = list(models)
        if not models:
            raise ArgumentError("`models` is empty: an ensemble needs at least one model.")
        for i, m in enumerate(models):
            if not isinstance(m, eqx.Module):
                raise fail(f"models[{i}]", m, "must be an `equinox.Module`")
        params = [eqx.filter(m, eqx.is_array) for m in models]
        static = eqx.filter(models[0], eqx.is_array, inverse=True)
        for i, m in enumerate(models[1:], 1):
            if not eqx.tree_equal(eqx.filter(m, eqx.is_array, inverse=True), static):
                raise ArgumentError(f"`models[{i}]` has a different architecture from "
                                    "`models[0]`; an ensemble stacks models of one architecture.")
        shapes = [[jnp.shape(x) for x in jtu.tree_leaves(p)] for p in params]
        for i, s in enumerate(shapes[1:], 1):
            if s != shapes[0]:
                raise ArgumentError(f"`models[{i}]` has parameters of other shapes than "
                                    "`models[0]`; an ensemble stacks models of one "
                                    "architecture.")
        stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *params)
        return cls(model_parameters(eqx.combine(stacked, static), "models"), len(models))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> eqx.Module:
        params, static = eqx.partition(self.models, eqx.is_array)
        try:
            i = operator.index(i)
        except TypeError:  # a slice or an index array: a sub-ensemble's stacked parameters
            return eqx.combine(jtu.tree_map(lambda x: x[i], params), static)
        if not -self.size <= i < self.size:
            raise IndexError(f"member {i} of an ensemble of {self.size}")
        # One compiled program per architecture for every member (eager indexing compiled a
        # slice and a squeeze for each parameter shape); a slice is exact either way.
        return eqx.combine(_take(params, i % self.size), static)


@jax.jit
def _take(params, i):
    return jtu.tree_map(lambda x: x[i], params)


def standard_normals(keys, shapes) -> list[Array]:
    """`[jax.random.normal(k, s) for k, s in zip(keys, shapes)]`, bit for bit, with fewer
    copies of the sampler in the compiled program.

    Threefry's counter-based draws are elementwise in (key, flat index), so each draw is the
    first `prod(s)` values of one vmapped draw over the keys, reshaped. Each copy of the
    sampler costs ~0.3 s of XLA compilation, a multi-axis shape under vmap several times
    that. One vmapped draw is used when its padding wastes at most the largest draw (or 64k
    values), else one flat draw per shape. Keys of another PRNG implementation, or threefry
    without `jax_threefry_partitionable`, take the plain per-shape draws.
    """
    keys = keys if isinstance(keys, jax.Array) else jnp.stack(list(keys))
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(keys)) if typed else jax.config.jax_default_prng_impl
    if "threefry" not in impl or not jax.config.jax_threefry_partitionable:
        return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
    sizes = [math.prod(s) for s in shapes]
    most = max(sizes)
    if len(sizes) > 1 and len(sizes) * most - sum(sizes) <= max(most, 2**16):
        flat = jax.vmap(lambda k: jax.random.normal(k, (most,)))(keys)
        return [flat[i, :n].reshape(s) for i, (n, s) in enumerate(zip(sizes, shapes))]
    return [jax.random.normal(k, (n,)).reshape(s) for k, n, s in zip(keys, sizes, shapes)]


def as_ensemble(model: eqx.Module | Ensemble) -> Ensemble:
    """Wrap a single model as an ensemble of one; pass ensembles through.

    Any `equinox.Module` is a model (its inexact-array leaves are the parameters), e.g.
    `equinox.nn.MLP`; wrap a pure function `f(params, x)` as `conservation.FunctionModel`.
    Parameters of another float dtype (float32, float16) are converted to float64, with one
    warning; complex parameters are refused.
    """
    if isinstance(model, Ensemble):
        return model_parameters(model, "model")
    if isinstance(model, eqx.Module):
        if not jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array)):
            raise ArgumentError(f"`model` ({type(model).__name__}) has no floating-point array "
                                "leaves: there are no parameters to train.")
        return Ensemble.stack([model_parameters(model, "model")])
    if callable(model):
        raise ArgumentError(
            "`model` is a plain function; wrap it with its parameters as "
            "`conservation.FunctionModel(fn, params)` (fn(params, x) -> output)."
        )
    raise ArgumentError(
        f"`model` must be an `equinox.Module` or `Ensemble`, got {type(model).__name__}. "
        "Build one with e.g. `conservation.DeepLinear.random(widths, key=key)`."
    )


def default_laws(model) -> tuple[Any, ...]:
    """The laws monitored when none are given: `model.laws()` for conservation models, none
    for foreign modules (find them with `conservation.find_symmetries`)."""
    if isinstance(model, Ensemble):
        model = model[0]
    return tuple(model.laws()) if isinstance(model, AbstractModel) else ()
