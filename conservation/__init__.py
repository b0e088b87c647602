"""conservation: conservation laws of neural-network training dynamics, simulated in JAX.

Importing this package turns on JAX's float64 mode (`jax_enable_x64`): conservation work
compares drifts with tolerances far below float32 resolution. `Dataset` stores its arrays in
this default float dtype whatever they arrive as (integer, float32, ...). It also freezes
(`gc.freeze()`) the objects that exist once it is imported, JAX's modules most of them, so
that the garbage collector stops walking them (faster collections and exit); objects made
later are collected as usual, and `gc.unfreeze()` undoes it.
"""

import gc
import importlib
import importlib.metadata
from typing import TYPE_CHECKING

import jax

jax.config.update("jax_enable_x64", True)

from ._cache import enable_compilation_cache as enable_compilation_cache
from ._data.augmentation import Augmentation as Augmentation
from ._data.dataset import (
    Dataset as Dataset,
)
from ._data.dataset import (
    gaussian_inputs as gaussian_inputs,
)
from ._data.dataset import (
    teacher_dataset as teacher_dataset,
)
from ._data.dataset import (
    whiten as whiten,
)
from ._data.groups import (
    AbstractFiniteGroup as AbstractFiniteGroup,
)
from ._data.groups import (
    AbstractGroup as AbstractGroup,
)
from ._data.groups import (
    CyclicShift as CyclicShift,
)
from ._data.groups import (
    Icosahedral as Icosahedral,
)
from ._data.groups import (
    Octahedral as Octahedral,
)
from ._data.groups import (
    OrthogonalGroup as OrthogonalGroup,
)
from ._data.groups import (
    Permutations as Permutations,
)
from ._data.groups import (
    PlanarRotations as PlanarRotations,
)
from ._data.groups import (
    SignFlips as SignFlips,
)
from ._data.losses import (
    MSE as MSE,
)
from ._data.losses import (
    AbstractLoss as AbstractLoss,
)
from ._data.losses import (
    CrossEntropy as CrossEntropy,
)
from ._data.losses import (
    LogCosh as LogCosh,
)
from ._data.losses import (
    Quartic as Quartic,
)
from ._data.objective import Moments as Moments
from ._data.objective import Objective as Objective
from ._data.objective import make_objective as make_objective
from ._dynamics.flow import (
    AbstractVectorField as AbstractVectorField,
)
from ._dynamics.flow import (
    GradientField as GradientField,
)
from ._dynamics.flow import (
    ModifiedGradientField as ModifiedGradientField,
)
from ._dynamics.flow import (
    gradient_flow as gradient_flow,
)
from ._dynamics.monitor import STATUS_NAMES as STATUS_NAMES
from ._dynamics.monitor import Result as Result
from ._dynamics.observables import (
    AbstractObservable as AbstractObservable,
)
from ._dynamics.observables import (
    GradientNorm as GradientNorm,
)
from ._dynamics.observables import (
    HeldOutLoss as HeldOutLoss,
)
from ._dynamics.observables import (
    KernelDistance as KernelDistance,
)
from ._dynamics.observables import (
    Sharpness as Sharpness,
)
from ._dynamics.solvers import (
    RKC as RKC,
)
from ._dynamics.solvers import (
    ROCK4 as ROCK4,
)
from ._dynamics.solvers import (
    AbstractChebyshevSolver as AbstractChebyshevSolver,
)
from ._dynamics.solvers import (
    SolverChoice as SolverChoice,
)
from ._dynamics.solvers import (
    StabilizedRK as StabilizedRK,
)
from ._dynamics.solvers import (
    choose_solver as choose_solver,
)
from ._dynamics.solvers import (
    step_size_controller as step_size_controller,
)
from ._dynamics.train import optimizer as optimizer
from ._dynamics.train import train as train
from ._laws.base import (
    AbstractGramLaw as AbstractGramLaw,
)
from ._laws.base import (
    AbstractLaw as AbstractLaw,
)
from ._laws.base import (
    AttentionKVLaw as AttentionKVLaw,
)
from ._laws.base import (
    AttentionQKLaw as AttentionQKLaw,
)
from ._laws.base import (
    AttentionVOLaw as AttentionVOLaw,
)
from ._laws.base import (
    BalanceLaw as BalanceLaw,
)
from ._laws.base import (
    FunctionLaw as FunctionLaw,
)
from ._laws.base import (
    NeuronRescaleLaw as NeuronRescaleLaw,
)
from ._laws.base import (
    pointwise_check as pointwise_check,
)
from ._laws.phase_space import (
    AbstractPhaseSpaceLaw as AbstractPhaseSpaceLaw,
)
from ._laws.phase_space import (
    AngularMomentumLaw as AngularMomentumLaw,
)
from ._laws.phase_space import (
    FunctionPhaseLaw as FunctionPhaseLaw,
)
from ._laws.phase_space import (
    LrBalanceLaw as LrBalanceLaw,
)
from ._laws.phase_space import (
    MirrorBalanceLaw as MirrorBalanceLaw,
)
from ._laws.phase_space import (
    PhaseState as PhaseState,
)
from ._laws.phase_space import (
    phase_space_laws as phase_space_laws,
)
from ._memory import InsufficientMemory as InsufficientMemory
from ._models.base import (
    AbstractModel as AbstractModel,
)
from ._models.base import (
    AbstractTensorizableModel as AbstractTensorizableModel,
)
from ._models.base import (
    Ensemble as Ensemble,
)
from ._models.base import (
    as_ensemble as as_ensemble,
)
from ._models.base import (
    default_laws as default_laws,
)
from ._models.linear import DeepLinear as DeepLinear
from ._validation import ArgumentError as ArgumentError

# Imported on first use (PEP 562 `__getattr__` below), not by `import conservation`: what a
# first flow or training run does not need (pydantic and the experiment runner, law
# counting and discovery, the central-flow and mechanics analyses, the other model
# families) would otherwise add ~0.5 s to every process. `from conservation import X`
# works for every name alike. Public name -> the module that defines it:
_LAZY = {
    "CentralFlowComparison": "._dynamics.central",
    "CentralFlowField": "._dynamics.central",
    "Oscillation": "._dynamics.central",
    "RMSPropCentralFlow": "._dynamics.central",
    "RMSPropComparison": "._dynamics.central",
    "RMSPropOscillation": "._dynamics.central",
    "central_flow_comparison": "._dynamics.central",
    "rmsprop_central_flow_comparison": "._dynamics.central",
    "saxe_balanced_mode": "._dynamics.closed_forms",
    "AbstractPhaseSpaceField": "._dynamics.fields",
    "MirrorField": "._dynamics.fields",
    "MomentumField": "._dynamics.fields",
    "NesterovField": "._dynamics.fields",
    "PreconditionedField": "._dynamics.fields",
    "SignField": "._dynamics.fields",
    "MechanicsResult": "._dynamics.mechanics",
    "track_mechanics": "._dynamics.mechanics",
    "Config": "._experiments.config",
    "ConfigError": "._experiments.config",
    "config_schema": "._experiments.config",
    "load_config": "._experiments.config",
    "parse_config": "._experiments.config",
    "run_sweep": "._experiments.sweep",
    "shard_ensemble": "._experiments.sweep",
    "GateRescaleLaw": "._laws.blocks",
    "MeanReadLaw": "._laws.blocks",
    "RotaryQKLaw": "._laws.blocks",
    "SubmodelLaw": "._laws.blocks",
    "LawCount": "._laws.counting",
    "PolynomialLaws": "._laws.counting",
    "count_laws": "._laws.counting",
    "find_polynomial_laws": "._laws.counting",
    "AbstractMaskLaw": "._laws.discovery",
    "Candidate": "._laws.discovery",
    "LinearMaskLaw": "._laws.discovery",
    "QuadraticMaskLaw": "._laws.discovery",
    "SymmetrySearch": "._laws.discovery",
    "find_symmetries": "._laws.discovery",
    "AbstractFlow": "._laws.flows",
    "GradientFlow": "._laws.flows",
    "MirrorFlow": "._laws.flows",
    "MomentumFlow": "._laws.flows",
    "NesterovFlow": "._laws.flows",
    "PreconditionedFlow": "._laws.flows",
    "SignFlow": "._laws.flows",
    "GeneratorLaw": "._laws.generators",
    "GeneratorNullSpace": "._laws.generators",
    "GeneratorSearch": "._laws.generators",
    "find_generators": "._laws.generators",
    "AbstractSubspaceLaw": "._laws.symmetry",
    "AttentionRangeLaw": "._laws.symmetry",
    "CyclicRatioLaw": "._laws.symmetry",
    "EquivariantResidualLaw": "._laws.symmetry",
    "EquivariantRowSumLaw": "._laws.symmetry",
    "FourierPhaseLaw": "._laws.symmetry",
    "RowSpaceLaw": "._laws.symmetry",
    "augmentation_laws": "._laws.symmetry",
    "isotypic_components": "._laws.symmetry",
    "LightningAttention": "._models.attention",
    "MLP": "._models.mlp",
    "AbstractMechanicsLaw": "._models.mlp",
    "RescaleLaw": "._models.mlp",
    "ScaleLaw": "._models.mlp",
    "TranslationLaw": "._models.mlp",
    "mechanics_laws": "._models.mlp",
    "ACTIVATIONS": "._models.polynomial",
    "Neuron": "._models.polynomial",
    "PolynomialNet": "._models.polynomial",
    "BlockStack": "._models.transformer",
    "FeedForward": "._models.transformer",
    "ResidualBlock": "._models.transformer",
    "SoftmaxAttention": "._models.transformer",
    "TransformerBlock": "._models.transformer",
    "FunctionModel": "._models.wrap",
}

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from ._dynamics.central import CentralFlowComparison as CentralFlowComparison
    from ._dynamics.central import CentralFlowField as CentralFlowField
    from ._dynamics.central import Oscillation as Oscillation
    from ._dynamics.central import RMSPropCentralFlow as RMSPropCentralFlow
    from ._dynamics.central import RMSPropComparison as RMSPropComparison
    from ._dynamics.central import RMSPropOscillation as RMSPropOscillation
    from ._dynamics.central import central_flow_comparison as central_flow_comparison
    from ._dynamics.central import (
        rmsprop_central_flow_comparison as rmsprop_central_flow_comparison,
    )
    from ._dynamics.closed_forms import saxe_balanced_mode as saxe_balanced_mode
    from ._dynamics.fields import AbstractPhaseSpaceField as AbstractPhaseSpaceField
    from ._dynamics.fields import MirrorField as MirrorField
    from ._dynamics.fields import MomentumField as MomentumField
    from ._dynamics.fields import NesterovField as NesterovField
    from ._dynamics.fields import PreconditionedField as PreconditionedField
    from ._dynamics.fields import SignField as SignField
    from ._dynamics.mechanics import MechanicsResult as MechanicsResult
    from ._dynamics.mechanics import track_mechanics as track_mechanics
    from ._experiments.config import Config as Config
    from ._experiments.config import ConfigError as ConfigError
    from ._experiments.config import config_schema as config_schema
    from ._experiments.config import load_config as load_config
    from ._experiments.config import parse_config as parse_config
    from ._experiments.sweep import run_sweep as run_sweep
    from ._experiments.sweep import shard_ensemble as shard_ensemble
    from ._laws.blocks import GateRescaleLaw as GateRescaleLaw
    from ._laws.blocks import MeanReadLaw as MeanReadLaw
    from ._laws.blocks import RotaryQKLaw as RotaryQKLaw
    from ._laws.blocks import SubmodelLaw as SubmodelLaw
    from ._laws.counting import LawCount as LawCount
    from ._laws.counting import PolynomialLaws as PolynomialLaws
    from ._laws.counting import count_laws as count_laws
    from ._laws.counting import find_polynomial_laws as find_polynomial_laws
    from ._laws.discovery import AbstractMaskLaw as AbstractMaskLaw
    from ._laws.discovery import Candidate as Candidate
    from ._laws.discovery import LinearMaskLaw as LinearMaskLaw
    from ._laws.discovery import QuadraticMaskLaw as QuadraticMaskLaw
    from ._laws.discovery import SymmetrySearch as SymmetrySearch
    from ._laws.discovery import find_symmetries as find_symmetries
    from ._laws.flows import AbstractFlow as AbstractFlow
    from ._laws.flows import GradientFlow as GradientFlow
    from ._laws.flows import MirrorFlow as MirrorFlow
    from ._laws.flows import MomentumFlow as MomentumFlow
    from ._laws.flows import NesterovFlow as NesterovFlow
    from ._laws.flows import PreconditionedFlow as PreconditionedFlow
    from ._laws.flows import SignFlow as SignFlow
    from ._laws.generators import GeneratorLaw as GeneratorLaw
    from ._laws.generators import GeneratorNullSpace as GeneratorNullSpace
    from ._laws.generators import GeneratorSearch as GeneratorSearch
    from ._laws.generators import find_generators as find_generators
    from ._laws.symmetry import AbstractSubspaceLaw as AbstractSubspaceLaw
    from ._laws.symmetry import AttentionRangeLaw as AttentionRangeLaw
    from ._laws.symmetry import CyclicRatioLaw as CyclicRatioLaw
    from ._laws.symmetry import EquivariantResidualLaw as EquivariantResidualLaw
    from ._laws.symmetry import EquivariantRowSumLaw as EquivariantRowSumLaw
    from ._laws.symmetry import FourierPhaseLaw as FourierPhaseLaw
    from ._laws.symmetry import RowSpaceLaw as RowSpaceLaw
    from ._laws.symmetry import augmentation_laws as augmentation_laws
    from ._laws.symmetry import isotypic_components as isotypic_components
    from ._models.attention import LightningAttention as LightningAttention
    from ._models.mlp import MLP as MLP
    from ._models.mlp import AbstractMechanicsLaw as AbstractMechanicsLaw
    from ._models.mlp import RescaleLaw as RescaleLaw
    from ._models.mlp import ScaleLaw as ScaleLaw
    from ._models.mlp import TranslationLaw as TranslationLaw
    from ._models.mlp import mechanics_laws as mechanics_laws
    from ._models.polynomial import ACTIVATIONS as ACTIVATIONS
    from ._models.polynomial import Neuron as Neuron
    from ._models.polynomial import PolynomialNet as PolynomialNet
    from ._models.transformer import BlockStack as BlockStack
    from ._models.transformer import FeedForward as FeedForward
    from ._models.transformer import ResidualBlock as ResidualBlock
    from ._models.transformer import SoftmaxAttention as SoftmaxAttention
    from ._models.transformer import TransformerBlock as TransformerBlock
    from ._models.wrap import FunctionModel as FunctionModel


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'conservation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# The public API: exactly the names re-exported above, eagerly or lazily (the API reference
# documents each).
__all__ = [
    "enable_compilation_cache", "Augmentation", "Dataset", "gaussian_inputs",
    "teacher_dataset", "whiten", "AbstractFiniteGroup", "AbstractGroup", "CyclicShift",
    "Icosahedral", "Octahedral", "OrthogonalGroup", "Permutations", "PlanarRotations",
    "SignFlips", "MSE", "AbstractLoss", "CrossEntropy", "LogCosh", "Quartic", "Moments",
    "Objective", "make_objective", "CentralFlowComparison", "CentralFlowField",
    "Oscillation", "RMSPropCentralFlow", "RMSPropComparison", "RMSPropOscillation",
    "central_flow_comparison", "rmsprop_central_flow_comparison", "saxe_balanced_mode",
    "AbstractPhaseSpaceField",
    "MirrorField", "MomentumField", "NesterovField", "PreconditionedField", "SignField",
    "AbstractVectorField",
    "GradientField", "ModifiedGradientField", "gradient_flow", "MechanicsResult",
    "track_mechanics", "STATUS_NAMES", "Result", "AbstractObservable", "GradientNorm",
    "HeldOutLoss", "KernelDistance", "Sharpness", "RKC", "ROCK4", "AbstractChebyshevSolver",
    "SolverChoice", "StabilizedRK", "choose_solver", "step_size_controller", "optimizer",
    "train", "Config", "ConfigError", "config_schema", "load_config", "parse_config",
    "run_sweep", "shard_ensemble", "AbstractGramLaw", "AbstractLaw", "AttentionKVLaw",
    "AttentionQKLaw", "AttentionVOLaw", "BalanceLaw", "FunctionLaw", "NeuronRescaleLaw",
    "pointwise_check", "LawCount", "PolynomialLaws", "count_laws", "find_polynomial_laws",
    "AbstractMaskLaw", "Candidate", "LinearMaskLaw", "QuadraticMaskLaw", "SymmetrySearch",
    "find_symmetries", "GeneratorLaw", "GeneratorNullSpace", "GeneratorSearch",
    "find_generators", "AbstractFlow", "GradientFlow", "MirrorFlow", "MomentumFlow",
    "NesterovFlow", "PreconditionedFlow", "SignFlow", "AbstractPhaseSpaceLaw",
    "AngularMomentumLaw", "FunctionPhaseLaw", "LrBalanceLaw", "MirrorBalanceLaw", "PhaseState",
    "phase_space_laws",
    "AbstractSubspaceLaw", "AttentionRangeLaw", "CyclicRatioLaw",
    "EquivariantResidualLaw", "EquivariantRowSumLaw", "FourierPhaseLaw", "RowSpaceLaw",
    "augmentation_laws", "isotypic_components", "InsufficientMemory", "LightningAttention",
    "AbstractModel", "AbstractTensorizableModel", "Ensemble", "as_ensemble", "default_laws",
    "DeepLinear", "MLP", "AbstractMechanicsLaw", "RescaleLaw", "ScaleLaw", "TranslationLaw",
    "mechanics_laws", "ACTIVATIONS", "Neuron", "PolynomialNet", "FunctionModel",
    "ArgumentError", "GateRescaleLaw", "MeanReadLaw", "RotaryQKLaw", "SubmodelLaw",
    "BlockStack", "FeedForward", "ResidualBlock", "SoftmaxAttention", "TransformerBlock",
]

try:
    __version__ = importlib.metadata.version("conservation")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

# What is imported by now (JAX, equinox, diffrax, optax, this package: over 100 000 objects
# the cyclic collector tracks) lives as long as the process. Frozen, the collector no longer
# walks it: not in the full collections that tracing triggers during a run, nor in the ones
# the interpreter makes at exit, a large part of a short script's time
# (docs/guides/first_call.md). Reference counting still frees these objects; only a cycle
# among them would stay uncollected, and modules and their functions live to the end
# anyway. `gc.unfreeze()` undoes it.
gc.freeze()
