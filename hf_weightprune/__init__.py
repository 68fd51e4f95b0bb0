"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains."""

from ._version import __version__ as __version__  # re-exported: `hf_weightprune.__version__`
from .callback import ImportanceCallback
from .config import ImportanceConfig, PruneConfig
from .distill import DistillConfig
from .export import load_sparsity, prune_checkpoint, save_pruned
from .hub import push_pruned_to_hub
from .importance import Importance
from .lora import merge_and_unload_sparse
from .oneshot import oneshot_importance
from .pruner import PruningReport, prune_
from .schedule import PruneSchedule
from .state import load_importance
from .sweep import sweep

__all__ = [
    "DistillConfig",
    "Importance",
    "ImportanceCallback",
    "ImportanceConfig",
    "PruneConfig",
    "PruneSchedule",
    "PruningReport",
    "load_importance",
    "load_sparsity",
    "merge_and_unload_sparse",
    "oneshot_importance",
    "prune_",
    "prune_checkpoint",
    "push_pruned_to_hub",
    "save_pruned",
    "sweep",
]
