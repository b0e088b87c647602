"""Shape-annotated aliases shared by the public signatures (jaxtyping)."""

from typing import Any

from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

Scalar = Float[Array, ""]
ScalarLike = Real[ArrayLike, ""]
Key = PRNGKeyArray
PyTree = Any

__all__ = ["Array", "ArrayLike", "Float", "Int", "Key", "PyTree", "Scalar", "ScalarLike"]
