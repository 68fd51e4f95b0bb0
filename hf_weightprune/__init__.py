"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains.

The public names are imported on first use (PEP 562 `__getattr__`, as transformers' `_LazyModule` does), so
`import hf_weightprune` and `hf-weightprune --help` do not import torch. `from hf_weightprune import X` works for
every name in `__all__`; type checkers see the real imports through `TYPE_CHECKING`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__  # re-exported: `hf_weightprune.__version__`

# Public name -> the submodule that defines it. The only list to extend when a name is added.
_LAZY_IMPORTS = {
    "DistillConfig": "train.distill",
    "Importance": "collect.importance",
    "ImportanceCallback": "train.callback",
    "ImportanceConfig": "config",
    "PruneConfig": "config",
    "PruneSchedule": "train.schedule",
    "PruningReport": "prune.report",
    "load_importance": "files.importance_files",
    "load_sparsity": "files.pruned_files",
    "merge_and_unload_sparse": "prune.lora",
    "oneshot_importance": "prune.oneshot",
    "prune_": "prune.pruner",
    "prune_checkpoint": "publish.export",
    "push_pruned_to_hub": "publish.hub",
    "render_model_card": "publish.card",
    "save_pruned": "publish.export",
    "search_structures": "tools.search",
    "sweep": "tools.sweep",
    "write_model_card": "publish.card",
}

# A literal list (type checkers and linters read it); tests/tools/test_cli.py checks it equals `_LAZY_IMPORTS`.
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
    "render_model_card",
    "save_pruned",
    "search_structures",
    "sweep",
    "write_model_card",
]

if TYPE_CHECKING:
    from .collect.importance import Importance
    from .config import ImportanceConfig, PruneConfig
    from .files.importance_files import load_importance
    from .files.pruned_files import load_sparsity
    from .prune.lora import merge_and_unload_sparse
    from .prune.oneshot import oneshot_importance
    from .prune.pruner import prune_
    from .prune.report import PruningReport
    from .publish.card import render_model_card, write_model_card
    from .publish.export import prune_checkpoint, save_pruned
    from .publish.hub import push_pruned_to_hub
    from .tools.search import search_structures
    from .tools.sweep import sweep
    from .train.callback import ImportanceCallback
    from .train.distill import DistillConfig
    from .train.schedule import PruneSchedule


def __getattr__(name: str) -> Any:
    # Only for names not yet in the module dict: the first access imports the submodule and caches the value.
    module = _LAZY_IMPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
