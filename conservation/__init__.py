"""conservation: conservation laws of neural-network training dynamics, simulated in JAX.

Importing this package turns on JAX's float64 mode (`jax_enable_x64`): conservation work
compares drifts with tolerances far below float32 resolution. `Dataset` stores its arrays in
this default float dtype whatever they arrive as (integer, float32, ...).
"""

import importlib.metadata

import jax


jax.config.update("jax_enable_x64", True)

from ._attention import LightningAttention as LightningAttention
from ._augmentation import Augmentation as Augmentation
from ._closed_forms import saxe_balanced_mode as saxe_balanced_mode
from ._counting import (
    LawCount as LawCount,
    PolynomialLaws as PolynomialLaws,
    count_laws as count_laws,
    find_polynomial_laws as find_polynomial_laws,
)
from ._config import (
    Config as Config,
    ConfigError as ConfigError,
    config_schema as config_schema,
    load_config as load_config,
    parse_config as parse_config,
)
from ._data import (
    Dataset as Dataset,
    gaussian_inputs as gaussian_inputs,
    teacher_dataset as teacher_dataset,
    whiten as whiten,
)
from ._discovery import (
    AbstractMaskLaw as AbstractMaskLaw,
    Candidate as Candidate,
    LinearMaskLaw as LinearMaskLaw,
    QuadraticMaskLaw as QuadraticMaskLaw,
    SymmetrySearch as SymmetrySearch,
    find_symmetries as find_symmetries,
)
from ._flow import (
    AbstractVectorField as AbstractVectorField,
    GradientField as GradientField,
    ModifiedGradientField as ModifiedGradientField,
    gradient_flow as gradient_flow,
)
from ._groups import (
    AbstractFiniteGroup as AbstractFiniteGroup,
    AbstractGroup as AbstractGroup,
    CyclicShift as CyclicShift,
    Icosahedral as Icosahedral,
    Octahedral as Octahedral,
    OrthogonalGroup as OrthogonalGroup,
    Permutations as Permutations,
    PlanarRotations as PlanarRotations,
    SignFlips as SignFlips,
)
from ._laws import (
    AbstractGramLaw as AbstractGramLaw,
    AbstractLaw as AbstractLaw,
    AttentionKVLaw as AttentionKVLaw,
    AttentionQKLaw as AttentionQKLaw,
    AttentionVOLaw as AttentionVOLaw,
    BalanceLaw as BalanceLaw,
    FunctionLaw as FunctionLaw,
    NeuronRescaleLaw as NeuronRescaleLaw,
    pointwise_check as pointwise_check,
)
from ._linear import DeepLinear as DeepLinear
from ._losses import (
    MSE as MSE,
    AbstractLoss as AbstractLoss,
    CrossEntropy as CrossEntropy,
    LogCosh as LogCosh,
    Quartic as Quartic,
)
from ._mechanics import MechanicsResult as MechanicsResult, track_mechanics as track_mechanics
from ._mlp import (
    MLP as MLP,
    AbstractMechanicsLaw as AbstractMechanicsLaw,
    RescaleLaw as RescaleLaw,
    ScaleLaw as ScaleLaw,
    TranslationLaw as TranslationLaw,
    mechanics_laws as mechanics_laws,
)
from ._model import (
    AbstractModel as AbstractModel,
    AbstractTensorizableModel as AbstractTensorizableModel,
    Ensemble as Ensemble,
    as_ensemble as as_ensemble,
    default_laws as default_laws,
)
from ._monitor import STATUS_NAMES as STATUS_NAMES, Result as Result
from ._objective import Moments as Moments, Objective as Objective, make_objective as make_objective
from ._polynomial import (
    ACTIVATIONS as ACTIVATIONS,
    Neuron as Neuron,
    PolynomialNet as PolynomialNet,
)
from ._solvers import (
    ROCK4 as ROCK4,
    SolverChoice as SolverChoice,
    choose_solver as choose_solver,
)
from ._sweep import run_sweep as run_sweep, shard_ensemble as shard_ensemble
from ._symmetry_laws import (
    AbstractSubspaceLaw as AbstractSubspaceLaw,
    AttentionRangeLaw as AttentionRangeLaw,
    CyclicRatioLaw as CyclicRatioLaw,
    EquivariantResidualLaw as EquivariantResidualLaw,
    EquivariantRowSumLaw as EquivariantRowSumLaw,
    FourierPhaseLaw as FourierPhaseLaw,
    RowSpaceLaw as RowSpaceLaw,
    augmentation_laws as augmentation_laws,
    isotypic_components as isotypic_components,
)
from ._train import optimizer as optimizer, train as train
from ._wrap import FunctionModel as FunctionModel


try:
    __version__ = importlib.metadata.version("conservation")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
