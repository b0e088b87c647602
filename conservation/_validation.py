"""The validation layer: one exception type and the rules every public function checks its
arguments with, at the boundary (the API and the config alike).

Everything behind the boundary trusts typed, checked objects. A rule raises `ArgumentError`,
whose message names the argument, the value it got and the fix. `ArgumentError` subclasses both
`ValueError` and `TypeError`, so code that caught either before keeps working.
"""

import numbers
import warnings

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


class ArgumentError(ValueError, TypeError):
    """A bad argument to a public function (or a bad config value): the message names the
    argument, the value and how to fix it. The CLI turns it into one line and exit status 2."""


# Tolerances at or above this cannot give a meaningful drift: a relative local error of 1 %
# per step moves a conserved quantity by more than any law's drift could reveal, and the
# adaptive controller no longer keeps the flow near the exact one (a loss that should fall
# rises). Shared with the config (`dynamics.rtol`, `dynamics.atol`).
MAX_RTOL = 1e-2


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(name: str, value, must: str, fix: str = "") -> ArgumentError:
    """The error for argument `name`: "`name` must …, got value[; fix]." (returned, to be
    raised by the caller so that tracebacks point at the boundary)."""
    tail = f"; {fix}" if fix else ""
    return ArgumentError(f"`{name}` {must}, got {_shown(value)}{tail}.")


def is_traced(value) -> bool:
    """True inside jit / vmap / eval_shape, where values cannot be inspected."""
    return any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(value))


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
            fix: str = "") -> int:
    """A Python or numpy integer (not a bool, not a float such as 3.0) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(name, value, "must be an int" + _bounds_text(minimum, maximum), fix)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(name, value, "must be an int" + _bounds_text(minimum, maximum), fix)
    return value


def _bounds_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" ≥ {minimum}"
    if maximum is not None:
        return f" ≤ {maximum}"
    return ""


# The bounds every number rule checks, the API's and the config's (`config._num`) alike.
INTERVALS = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, "≥ 0"),
    # `&`, not chained comparisons: `v` may be an array (`number(..., array=True)`).
    "(0,1]": (lambda v: (0 < v) & (v <= 1), "in (0, 1]"),
    "[0,1)": (lambda v: (0 <= v) & (v < 1), "in [0, 1)"),
    "(0,1)": (lambda v: (0 < v) & (v < 1), "in (0, 1)"),
    ">=2": (lambda v: v >= 2, "≥ 2"),
    "rtol": (lambda v: (0 < v) & (v < MAX_RTOL),
             f"in (0, {MAX_RTOL:g}) (a tolerance of {MAX_RTOL:g} or more cannot give a "
             "meaningful drift)"),
    "atol": (lambda v: (0 <= v) & (v < MAX_RTOL), f"in [0, {MAX_RTOL:g})"),
    "": (lambda v: True, ""),
}


def number(name: str, value, bound: str = "", *, fix: str = "", array: bool = False):
    """A real, finite number (Python, numpy or a 0-d JAX array; with `array=True` any array,
    checked entry-wise) satisfying `bound` (a key of `INTERVALS`: '>0', '>=0', '(0,1]',
    '[0,1)', '(0,1)', '>=2', 'rtol', 'atol', ''). Returns it unchanged. Traced values pass
    unchecked."""
    predicate, text = INTERVALS[bound]
    must = "must be a finite real number" + (f" {text}" if text else "")
    if is_traced(value):
        return value
    if isinstance(value, bool) or isinstance(value, str | bytes):
        raise fail(name, value, must, fix)
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 — anything numpy cannot read is not a number
        raise fail(name, value, must, fix) from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number)) or np.iscomplexobj(a):
        raise fail(name, value, must, fix)
    if a.ndim and not array:
        raise fail(name, value, "must be a scalar" + (f" {text}" if text else ""), fix)
    if not (np.all(np.isfinite(a)) and np.all(predicate(a))):
        raise fail(name, value, must, fix)
    return value


def choice(name: str, value, options) -> str:
    """One of `options` (strings)."""
    if not isinstance(value, str) or value not in options:
        raise fail(name, value, f"must be one of {list(options)}")
    return value


def model_parameters(model, name: str = "model"):
    """`model` with every floating-point parameter in float64 (conservation's precision).

    Parameters of another float dtype (float32, float16, bfloat16) are converted, with one
    warning naming the dtypes: conservation compares drifts with tolerances far below float32
    resolution, so a silent float32 run would report its round-off as physics. Complex
    parameters are refused (gradient flow on them is not defined by `jax.grad`).
    """
    leaves = [x for x in jtu.tree_leaves(model) if isinstance(x, jax.Array | np.ndarray)]
    if any(jnp.iscomplexobj(x) for x in leaves):
        raise ArgumentError(
            f"`{name}` has complex parameters; conservation trains real parameters only: "
            "split each complex array into its real and imaginary parts.")
    others = sorted({str(x.dtype) for x in leaves
                     if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float64})
    if not others:
        return model
    if not jax.config.jax_enable_x64:
        raise ArgumentError(
            f"`{name}` has {'/'.join(others)} parameters and JAX's float64 mode is off; "
            "enable it with jax.config.update('jax_enable_x64', True) (importing "
            "conservation does) before building the model.")
    warnings.warn(
        f"`{name}` has {'/'.join(others)} parameters; converted to float64 (conservation's "
        "drifts need float64: build the model after importing conservation, or cast it with "
        "jax.tree.map(lambda x: x.astype('float64'), model)).", stacklevel=3)

    def cast(x):
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, jnp.float64)
        return x

    return jtu.tree_map(cast, model)


def prng_key(name: str, value, *, optional: bool = False):
    """A JAX PRNG key: `jax.random.PRNGKey(seed)` (uint32, shape (2,)) or `jax.random.key(seed)`
    (a scalar typed key); None passes when `optional`. Traced keys pass unchecked."""
    if value is None and optional:
        return value
    if is_traced(value):
        return value
    fix = "make one with jax.random.PRNGKey(0)"
    if not isinstance(value, jax.Array | np.ndarray):
        raise fail(name, value, "must be a JAX PRNG key", fix)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        if value.ndim:
            raise fail(name, value, "must be a single PRNG key (shape ())", fix)
        return value
    if value.dtype != np.uint32 or value.shape != (2,):
        raise fail(name, value, "must be a JAX PRNG key (uint32, shape (2,))", fix)
    return value


def shape(name: str, value, *, minimum: int = 1, fix: str = "") -> tuple[int, ...]:
    """A shape: a tuple (or list) of ints ≥ `minimum` (not a bare int, not floats)."""
    fix = fix or "give a tuple of ints such as (3,)"
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
        raise fail(name, value, "must be a tuple of ints", fix)
    for n in value:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
            raise fail(name, value, f"must be a tuple of ints ≥ {minimum}", fix)
    return tuple(int(n) for n in value)


def is_posinf(value) -> bool:
    """`value` is the number +inf (a concrete scalar; traced values, arrays and strings are
    not): e.g. `divergence=inf`, "never diverge by norm"."""
    if isinstance(value, str | bytes | bool) or is_traced(value) or np.ndim(value) != 0:
        return False
    try:
        return bool(np.isposinf(float(value)))
    except (TypeError, ValueError):
        return False


def as_float64(value):
    """`value` (a number, a numpy or JAX array, or a tracer) as a float64 JAX array, with
    the numbers of `jnp.asarray(value, float)` (float64 is the package's default float).

    A host value is transferred (`jax.device_put`) and a float64 JAX array returned as it
    is: `jnp.asarray` runs a compiled program for each new signature (`stage`,
    `convert_element_type`), which a first call pays in tracing, lowering and a cache
    look-up each (first-call latency)."""
    if (isinstance(value, jax.Array) and not is_traced(value) and value.dtype == np.float64
            and not value.weak_type):  # (a weak type would promote differently)
        return value
    if isinstance(value, numbers.Real | np.ndarray | np.generic) and not isinstance(value, bool):
        return jax.device_put(np.asarray(value, np.float64))
    return jnp.asarray(value, float)
