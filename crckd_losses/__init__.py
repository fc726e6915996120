"""crckd-losses: CRCKD (MICCAI 2021) losses for PyTorch.

Class-guided contrastive distillation, categorical relation preserving loss, momentum
memory banks and a mean teacher, exact to the method and fast.
"""

from . import functional, sampling
from ._checks import set_value_checks, value_checks
from .contrastive import CCDTerms, ClassGuidedContrastiveLoss
from .crckd import CRCKDLoss, CRCKDOutput
from .data import IndexedDataset
from .heads import EmbeddingHead
from .memory import MomentumMemoryBank
from .relation import CategoricalRelationLoss
from .teacher import EMATeacher, unwrap_model

__version__ = "0.3.0"

__all__ = [
    "CCDTerms",
    "CRCKDLoss",
    "CRCKDOutput",
    "CategoricalRelationLoss",
    "ClassGuidedContrastiveLoss",
    "EMATeacher",
    "EmbeddingHead",
    "IndexedDataset",
    "MomentumMemoryBank",
    "functional",
    "sampling",
    "set_value_checks",
    "value_checks",
    "unwrap_model",
    "__version__",
]
