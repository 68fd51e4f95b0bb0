"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains."""

__version__ = "0.1.0"

from .callback import ImportanceCallback  # noqa: E402
from .config import ImportanceConfig, PruneConfig  # noqa: E402
from .distill import DistillConfig  # noqa: E402
from .export import load_sparsity, prune_checkpoint, save_pruned  # noqa: E402
from .hub import push_pruned_to_hub  # noqa: E402
from .importance import Importance  # noqa: E402
from .lora import merge_and_unload_sparse  # noqa: E402
from .oneshot import oneshot_importance  # noqa: E402
from .pruner import PruningReport, prune_  # noqa: E402
from .schedule import PruneSchedule  # noqa: E402
from .state import load_importance  # noqa: E402
from .sweep import sweep  # noqa: E402

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
