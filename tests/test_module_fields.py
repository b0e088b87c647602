"""Every equinox Module of the package (public or private) keeps its structure out of its
leaves: a field holding a Python int, str, bool or function (or a tuple of such) is `static`, so the
Module's leaves are its arrays. `jax.jit`/`jax.vmap` over a model, law, field or solver
then see only numbers that are meant to be traced, and `jax.tree.map` over a model (a NaN
member, a rescaled copy) touches only its weights. A sizing int left as a leaf works under
`eqx.filter_jit` but becomes a tracer under `jax.jit` (`range(tracer)` fails) and a float
under `tree.map`."""

import collections.abc
import dataclasses
import importlib
import inspect
import pkgutil
import types
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import conservation as cn

SCALARS = (int, str, bool)


def _package_modules():
    """Every equinox Module the package defines: the public classes, their subclasses, and
    the private ones of every submodule (an optimizer's `_Init`, the lanes' state, ...)."""
    found, todo = {}, [getattr(cn, n) for n in cn.__all__]
    for info in pkgutil.walk_packages(cn.__path__, "conservation."):
        todo += list(vars(importlib.import_module(info.name)).values())
    todo = [c for c in todo if inspect.isclass(c) and issubclass(c, eqx.Module)]
    while todo:  # ... and every subclass defined in the package
        c = todo.pop()
        if c.__module__.startswith("conservation") and c not in found.values():
            found[f"{c.__module__}.{c.__qualname__}"] = c
            todo += c.__subclasses__()
    return found


def _declared_here(cls, name) -> bool:
    """Whether field `name` of `cls` is declared by a class of this package (a field
    inherited from optimistix or diffrax is theirs to declare)."""
    owner = next(c for c in cls.__mro__ if name in vars(c).get("__annotations__", {}))
    return owner.__module__.startswith("conservation")


def _callable(annotation) -> bool:
    return annotation is collections.abc.Callable or (
        typing.get_origin(annotation) is collections.abc.Callable)


def _structural(annotation) -> bool:
    if annotation in SCALARS or _callable(annotation):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # e.g. str | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in SCALARS or _callable(a) for a in args)
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return bool(args) and all(a in SCALARS + (float,) for a in args)
    return False


MODULES = _package_modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_structural_fields_are_static(name):
    cls = MODULES[name]
    hints = typing.get_type_hints(cls)
    leaves = [f.name for f in dataclasses.fields(cls)
              if _structural(hints.get(f.name, f.type)) and not f.metadata.get("static")
              and _declared_here(cls, f.name)]
    assert not leaves, f"{name}: {leaves} are ints/strings but pytree leaves"


def test_the_rule_sees_a_non_static_int():
    """Negative control: the check flags an int field that is a leaf, and `jax.jit` over such
    a Module fails where the static twin works."""

    class Leaf(eqx.Module):
        size: int

    class Static(eqx.Module):
        size: int = eqx.field(static=True)

    def total(m):
        return sum(jnp.ones(()) for _ in range(m.size))

    assert _structural(typing.get_type_hints(Leaf)["size"])
    assert not dataclasses.fields(Leaf)[0].metadata.get("static")
    assert float(jax.jit(total)(Static(3))) == 3.0
    with pytest.raises(TypeError):
        jax.jit(total)(Leaf(3))
    assert len(MODULES) > 100  # the walk found the package's Modules, not a handful
    assert "conservation._dynamics.train._Init" in MODULES  # private ones too
