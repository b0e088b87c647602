"""Kunin et al.'s "Neural Mechanics" experiment on a real data set: scikit-learn's 8×8 digits.

A small conv net whose first convolution is normalised per channel without a gain (scale
symmetry of each channel's weights and bias), with ReLU hidden units (rescale symmetry of each
channel / neuron against what it feeds) and a softmax cross-entropy head (translation symmetry
of the logits layer's columns), trained by SGD, SGD + weight decay and heavy ball + weight
decay. The symmetries are not declared: `conservation.find_symmetries` finds them. Each law
is then compared with its exact per-step identity (round-off) and its continuous-time theory
(O(η)), as in the paper's figures.

Run: `python -m conservation.examples.digits --out results/kunin_digits` (writes
`mechanics.png`, `summary.json`, `symmetries.txt`).
"""

import argparse
import json
import pathlib
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float, Key


def digits_data() -> tuple[Float[np.ndarray, "1797 1 8 8"], Float[np.ndarray, "1797 10"]]:
    """scikit-learn's 8×8 handwritten digits (shipped with the package: no download).

    **Returns:** `(x, y)`: images scaled to [0, 1], shape (1797, 1, 8, 8), and one-hot labels,
    shape (1797, 10), both float64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data need scikit-learn: `pip install scikit-learn`.") \
            from error
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float64)[:, None, :, :]
    y = np.eye(10, dtype=np.float64)[digits.target]
    return x, y


class ChannelNorm(eqx.Module):
    """z_c ↦ z_c / RMS_{h,w}(z_c) per channel, with no gain and no ε: exactly invariant under
    scaling one channel's pre-activations, hence under scaling that channel's weights + bias.
    (RMS rather than standardisation: subtracting the mean would cancel the bias exactly and
    leave it a dead parameter.)"""

    def __call__(self, z: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        return z / jnp.sqrt(jnp.mean(z**2, axis=(1, 2), keepdims=True))


class ConvNet(eqx.Module):
    """conv 3×3 → ChannelNorm → ReLU → conv 3×3 stride 2 → ReLU → flatten → [Linear → ReLU]
    → Linear logits, for inputs of shape (1, 8, 8)."""

    conv1: eqx.nn.Conv2d
    norm: ChannelNorm
    conv2: eqx.nn.Conv2d
    hidden: eqx.nn.Linear | None
    head: eqx.nn.Linear

    def __call__(self, x: Float[Array, "1 8 8"]) -> Float[Array, " 10"]:
        h = jax.nn.relu(self.norm(self.conv1(x)))
        h = jax.nn.relu(self.conv2(h)).reshape(-1)  # channel-major flatten
        if self.hidden is not None:
            h = jax.nn.relu(self.hidden(h))
        return self.head(h)


def convnet(key: Key, channels: Sequence[int] = (8, 8), hidden: int | None = 32,
            classes: int = 10, size: int = 8) -> ConvNet:
    """A `ConvNet` for (1, `size`, `size`) inputs with `channels` = (c1, c2) convolution
    channels, an optional `hidden` ReLU layer and `classes` logits (equinox's default
    initialisation)."""
    channels = tuple(int(c) for c in channels)
    if len(channels) != 2 or min(channels) < 1:
        raise ValueError(f"`channels` must be two positive ints (c1, c2), got {channels!r}.")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    c1, c2 = channels
    flat = c2 * ((size + 1) // 2) ** 2
    hid = None if not hidden else eqx.nn.Linear(flat, int(hidden), key=k3)
    return ConvNet(
        eqx.nn.Conv2d(1, c1, 3, padding=1, key=k1),
        ChannelNorm(),
        eqx.nn.Conv2d(c1, c2, 3, stride=2, padding=1, key=k2),
        hid,
        eqx.nn.Linear(int(hidden) if hidden else flat, classes, key=k4),
    )


DYNAMICS = (
    # label, lr, weight decay, momentum
    ("sgd", 0.05, 0.0, 0.0),
    ("sgd + weight decay", 0.05, 0.01, 0.0),
    ("heavy ball + weight decay", 0.01, 0.01, 0.9),
)


def run(out=None, *, steps: int = 400, batch_size: int = 64, channels=(8, 8), hidden=32,
        seed: int = 0, n: int | None = None, dynamics=DYNAMICS) -> dict:
    """The whole experiment: find the symmetries, then `track_mechanics` under each of
    `dynamics` (label, lr, weight decay, momentum; the heavy-ball runs take 5× the steps so
    that all cover similar time). Writes `mechanics.png`, `summary.json` and `symmetries.txt`
    into `out` when given.

    **Returns:** the summary: per run, each law's discrete-identity and continuous-theory
    errors (relative), and the symmetry search's accepted/rejected counts.
    """
    import conservation as cn

    x, y = digits_data()
    if n is not None:
        x, y = x[:n], y[:n]
    data = cn.Dataset(jnp.asarray(x), jnp.asarray(y))
    loss = cn.CrossEntropy()
    key = jax.random.PRNGKey(seed)
    k_model, k_find, k_run = jax.random.split(key, 3)
    model = convnet(k_model, channels=channels, hidden=hidden)
    found = cn.find_symmetries(model, loss, data, key=k_find)
    objective = cn.make_objective(loss, data, model)
    summary = {"laws": {law.name: law.components for law in found.laws},
               "accepted": len(found.accepted), "rejected": len(found.rejected),
               "parameters": found.parameters, "runs": {}}
    entries = []
    for label, lr, wd, beta in dynamics:
        n_steps = steps * (5 if beta else 1)
        mech = cn.track_mechanics(objective, model, found.laws, lr=lr, steps=n_steps,
                                  weight_decay=wd, momentum=beta, batch_size=batch_size,
                                  key=k_run)
        entries.append((label, mech))
        summary["runs"][label] = {
            "lr": lr, "weight_decay": wd, "momentum": beta, "steps": n_steps,
            "batch_size": batch_size,
            "discrete_identity_error": mech.discrete_error(),
            "continuous_theory_error": mech.continuous_error(),
        }
    if out is not None:
        from .._experiments.plot import plot_mechanics

        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_mechanics(entries, out / "mechanics.png",
                       title="Neural mechanics on sklearn digits (conv net, found symmetries)")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "symmetries.txt").write_text(found.describe() + "\n")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kunin_digits")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
