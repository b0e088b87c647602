"""Multilayer perceptrons with the symmetries of "Neural Mechanics" (Kunin et al., 2021).

- **rescale**: a homogeneous activation (ReLU, leaky ReLU, linear) lets every hidden neuron
  trade scale between its incoming weights + bias and its outgoing weights;
- **scale**: normalising a layer's pre-activations makes the loss invariant under scaling that
  layer's weights + bias;
- **translation**: a softmax over the logits (the cross-entropy loss) is invariant under adding
  the same number to every logit, i.e. to a column of the last layer's [W b].

Each symmetry's law is linear (translation) or a signed sum of squares (scale, rescale) of
parameter entries; `mask` exposes those coefficients, which the exact discrete identities of
`conservation.track_mechanics` need.
"""

import abc
import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp

from .._custom_types import Array, Float, Key
from .._laws.base import AbstractLaw, law_mismatch
from .._validation import ArgumentError, choice, integer, number, prng_key
from .base import AbstractModel, flat_parameters, standard_normals
from .linear import _check_widths

ACTIVATIONS_MLP = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.1),
    "linear": lambda z: z,
}


class MLP(AbstractModel):
    """x ↦ W_L φ(⋯ φ(N(W_1 x + b_1)) ⋯) + b_L with a homogeneous activation φ.

    `normalize=True` divides the first layer's pre-activations by their root mean square
    (an RMS/layer norm without gain): the loss becomes invariant under scaling (W_1, b_1).
    Outputs are logits; with `CrossEntropy` the last layer has the translation symmetry.
    `biases=None` is the bias-free network x ↦ W_L φ(⋯ φ(W_1 x)) (Marcotte et al.'s
    convention); every law then involves the weights only.
    """

    weights: tuple[Float[Array, "out in"], ...]
    biases: tuple[Float[Array, " out"], ...] | None
    activation: str = eqx.field(static=True, default="relu")
    normalize: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS_MLP:
            raise ArgumentError(f"unknown `activation` {self.activation!r}; choose one of "
                                f"{sorted(ACTIVATIONS_MLP)} (homogeneous activations).")
        if not isinstance(self.normalize, bool):
            raise ArgumentError(f"`normalize` must be True or False, got {self.normalize!r}.")
        if (not isinstance(self.weights, tuple | list) or len(self.weights) < 2
                or (self.biases is not None and (not isinstance(self.biases, tuple | list)
                                                 or len(self.weights) != len(self.biases)))):
            raise ArgumentError("`weights` and `biases` need the same number (≥ 2) of layers; "
                                "pass `biases=None` for a bias-free network.")

    @classmethod
    def random(cls, widths: Sequence[int], *, key: Key, activation: str = "relu",
               normalize: bool = False, init_scale: float = 1.0, bias: bool = True) -> "MLP":
        """He-style Gaussian weights (std `init_scale`·√(2/fan_in)) and small biases
        (`bias=False`: none; the weights are drawn from the same keys either way)."""
        widths = _check_widths(widths, minimum_layers=2)
        prng_key("key", key)
        choice("activation", activation, sorted(ACTIVATIONS_MLP))
        number("init_scale", init_scale, ">0")
        for name, flag in (("normalize", normalize), ("bias", bias)):
            if not isinstance(flag, bool):
                raise ArgumentError(f"`{name}` must be True or False, got {flag!r}.")
        weights, biases = _random_layers(widths, bias, key, init_scale)
        return cls(weights, biases, activation, normalize)

    @property
    def has_bias(self) -> bool:
        return self.biases is not None

    def preactivations(self, x: Float[Array, " d"]) -> tuple[Float[Array, " n"], ...]:
        """The hidden layers' pre-activations z_l (after the normalisation, if any): neuron i
        of hidden layer l is active at x iff z_l[i] > 0."""
        phi = ACTIVATIONS_MLP[self.activation]
        h, out = x, []
        for layer, w in enumerate(self.weights[:-1]):
            z = w @ h if self.biases is None else w @ h + self.biases[layer]
            if layer == 0 and self.normalize:
                z = z / jnp.sqrt(jnp.mean(z**2))
            out.append(z)
            h = phi(z)
        return tuple(out)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " m"]:
        phi = ACTIVATIONS_MLP[self.activation]
        h = phi(self.preactivations(x)[-1])
        out = self.weights[-1] @ h
        return out if self.biases is None else out + self.biases[-1]

    def laws(self):
        """Rescale laws of every hidden layer whose neurons are individually rescalable, and
        the scale law of the normalised first layer. (Translation depends on the loss: add
        `TranslationLaw()` for cross-entropy, or use `mechanics_laws`.)"""
        first = 1 if self.normalize else 0
        laws = [RescaleLaw(layer) for layer in range(first, len(self.weights) - 1)]
        if self.normalize:
            laws.insert(0, ScaleLaw(0))
        return tuple(laws)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_layers(widths, bias, key, init_scale):
    """He-style weights and small biases (None when not `bias`) for `widths` (a tuple): one
    compiled program per (widths, bias), `init_scale` traced (barriers: see
    `linear._random_weights`)."""
    keys = jax.random.split(key, 2 * (len(widths) - 1))
    shapes = list(zip(widths[1:], widths[:-1]))
    if bias:  # keys alternate: layer i's weights from keys[2i], its biases from keys[2i + 1]
        draws = standard_normals(keys, [s for shape in shapes for s in (shape, shape[:1])])
        weights, biases = draws[0::2], draws[1::2]
    else:
        weights, biases = standard_normals(keys[0::2], shapes), None
    weights, biases = jax.lax.optimization_barrier((weights, biases))
    stds, bias_scale = jax.lax.optimization_barrier(
        ([init_scale * jnp.sqrt(2.0 / n_in) for _, n_in in shapes], 0.1 * init_scale))
    weights = tuple(std * w for std, w in zip(stds, weights))
    return weights, None if biases is None else tuple(bias_scale * b for b in biases)


class AbstractMechanicsLaw(AbstractLaw):
    """A law that is linear (Q_c = ⟨m_c, θ⟩) or a signed sum of squares (Q_c = Σ m_c θ²)
    in the parameters, with coefficient masks m_c given by `mask`."""

    quadratic: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def mask(self, model) -> Float[Array, "c D"]:
        """Coefficients m_c over the flattened trainable parameters (ravel_pytree order)."""

    def __call__(self, model) -> Float[Array, " c"]:
        self.check(model)
        flat = flat_parameters(model)
        return self.mask(model) @ (flat**2 if self.quadratic else flat)

    def scale(self, model) -> Array:
        self.check(model)
        flat = flat_parameters(model)
        # Natural size: Σ |m| θ² for quadratic laws, the norm of the involved entries else.
        if self.quadratic:
            return jnp.abs(self.mask(model)) @ flat**2
        return jnp.sqrt(jnp.abs(self.mask(model)) @ flat**2)


def _check_mlp(law, model, last: int) -> None:
    """`model` has `weights` (with a layer `last`) and `biases` (a tuple or None), as `MLP`."""
    weights = getattr(model, "weights", None)
    if not isinstance(weights, tuple | list) or not hasattr(model, "biases"):
        fix = ("for a DeepLinear use BalanceLaw(l) (whose diagonal this is)"
               if isinstance(weights, tuple | list) else
               "find the laws of another architecture with conservation.find_symmetries")
        raise law_mismatch(law, model, "it reads the `weights` and `biases` of a "
                                       "conservation.MLP, which the model does not have", fix)
    if last >= len(weights):
        raise law_mismatch(law, model, f"it reads layer {last} but the model has "
                                       f"{len(weights)} layers (0 to {len(weights) - 1})")


def _zeros(model):
    """Zeros shaped like the trainable parameters (a mask to fill in)."""
    return jax.tree_util.tree_map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))


class TranslationLaw(AbstractMechanicsLaw):
    """Column sums Σ_c [W_L b_L]_{c, j} of the last layer (one per input unit and the bias;
    without biases, of W_L only): conserved by gradient flow of a softmax (cross-entropy)
    loss."""

    quadratic = False

    @property
    def name(self) -> str:
        return "translation"

    def check(self, model) -> None:
        _check_mlp(self, model, 0)

    def mask(self, model):
        self.check(model)
        w = model.weights[-1]
        if model.biases is None:
            def column(j):
                mask = eqx.tree_at(lambda m: m.weights[-1], _zeros(model),
                                   jnp.zeros_like(w).at[:, j].set(1.0))
                return jfu.ravel_pytree(mask)[0]

            return jnp.stack([column(j) for j in range(w.shape[1])])
        b = model.biases[-1]

        def one(j):  # column j of [W b]: every class's weight from input j (j = in: bias)
            column = jnp.zeros(w.shape[1] + 1).at[j].set(1.0)
            mask = eqx.tree_at(lambda m: (m.weights[-1], m.biases[-1]), _zeros(model),
                               (jnp.broadcast_to(column[:-1], w.shape),
                                jnp.full_like(b, column[-1])))
            return jfu.ravel_pytree(mask)[0]

        return jnp.stack([one(j) for j in range(w.shape[1] + 1)])


class ScaleLaw(AbstractMechanicsLaw):
    """‖W_l‖² + ‖b_l‖² (‖W_l‖² without biases) of a layer whose pre-activations are
    normalised."""

    layer: int = eqx.field(static=True)
    quadratic = True

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)

    @property
    def name(self) -> str:
        return f"scale[{self.layer}]"

    def check(self, model) -> None:
        _check_mlp(self, model, self.layer)

    def mask(self, model):
        self.check(model)
        if model.biases is None:
            ones = eqx.tree_at(lambda m: m.weights[self.layer], _zeros(model),
                               jnp.ones_like(model.weights[self.layer]))
            return jfu.ravel_pytree(ones)[0][None, :]
        ones = eqx.tree_at(lambda m: (m.weights[self.layer], m.biases[self.layer]), _zeros(model),
                           (jnp.ones_like(model.weights[self.layer]),
                            jnp.ones_like(model.biases[self.layer])))
        return jfu.ravel_pytree(ones)[0][None, :]


class RescaleLaw(AbstractMechanicsLaw):
    """Per hidden neuron i of layer `layer`: ‖W_l[i,:]‖² + b_l[i]² − ‖W_{l+1}[:, i]‖²
    (no b_l[i]² without biases)."""

    layer: int = eqx.field(static=True)
    quadratic = True

    def __check_init__(self):
        integer("layer", self.layer, minimum=0)

    @property
    def name(self) -> str:
        return f"rescale[{self.layer}]"

    def check(self, model) -> None:
        _check_mlp(self, model, self.layer + 1)  # a hidden layer feeds the next one

    def mask(self, model):
        self.check(model)
        l = self.layer
        w_in, w_out = model.weights[l], model.weights[l + 1]
        if model.biases is None:
            def unbiased(i):
                signs = eqx.tree_at(
                    lambda m: (m.weights[l], m.weights[l + 1]), _zeros(model),
                    (jnp.zeros_like(w_in).at[i].set(1.0),
                     jnp.zeros_like(w_out).at[:, i].set(-1.0)))
                return jfu.ravel_pytree(signs)[0]

            return jnp.stack([unbiased(i) for i in range(w_in.shape[0])])
        b_in = model.biases[l]

        def one(i):
            signs = eqx.tree_at(
                lambda m: (m.weights[l], m.biases[l], m.weights[l + 1]), _zeros(model),
                (jnp.zeros_like(w_in).at[i].set(1.0), jnp.zeros_like(b_in).at[i].set(1.0),
                 jnp.zeros_like(w_out).at[:, i].set(-1.0)))
            return jfu.ravel_pytree(signs)[0]

        return jnp.stack([one(i) for i in range(w_in.shape[0])])


def mechanics_laws(model, loss=None) -> tuple[AbstractMechanicsLaw, ...]:
    """`model.laws()` plus the translation law when `loss` is a softmax cross-entropy over
    ≥ 2 classes."""
    from .._data.losses import CrossEntropy

    if not isinstance(model, MLP):
        raise ArgumentError(f"`model` must be a conservation.MLP, got {type(model).__name__}; "
                            "find the laws of other models with conservation.find_symmetries.")
    laws = tuple(model.laws())
    if isinstance(loss, CrossEntropy) and model.weights[-1].shape[0] >= 2:
        laws += (TranslationLaw(),)
    return laws
