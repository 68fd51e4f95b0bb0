"""hf-weightprune: importance of weights, watched while a Hugging Face Trainer trains.

The public names are imported on first use (PEP 562 `__getattr__`, as transformers' `_LazyModule` does), so
`import hf_weightprune` and `hf-weightprune --help` do not import torch. `from hf_weightprune import X` works for
every name in `__all__`; type checkers see the real imports through `TYPE_CHECKING`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__  # re-exported: `hf_weightprune.__version__`

# Public name -> the submodule that defines it. The only list to extend when a name is added.
_LAZY_IMPORTS = {
    "DistillConfig": "distill",
    "Importance": "importance",
    "ImportanceCallback": "callback",
    "ImportanceConfig": "config",
    "PruneConfig": "config",
    "PruneSchedule": "schedule",
    "PruningReport": "pruner",
    "load_importance": "state",
    "load_sparsity": "pruned_files",
    "merge_and_unload_sparse": "lora",
    "oneshot_importance": "oneshot",
    "prune_": "pruner",
    "prune_checkpoint": "export",
    "push_pruned_to_hub": "hub",
    "save_pruned": "export",
    "sweep": "sweep",
}

# A literal list (type checkers and linters read it); tests/test_cli.py checks it equals `_LAZY_IMPORTS`.
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

if TYPE_CHECKING:
    from .callback import ImportanceCallback
    from .config import ImportanceConfig, PruneConfig
    from .distill import DistillConfig
    from .export import prune_checkpoint, save_pruned
    from .hub import push_pruned_to_hub
    from .importance import Importance
    from .lora import merge_and_unload_sparse
    from .oneshot import oneshot_importance
    from .pruned_files import load_sparsity
    from .pruner import PruningReport, prune_
    from .schedule import PruneSchedule
    from .state import load_importance
    from .sweep import sweep


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


class _Package(types.ModuleType):
    """This package, with `sweep` always the function: importing the `sweep` submodule binds the module object to
    the package attribute of the same name, which would shadow the lazy function (the eager `__init__` rebound it)."""

    @property
    def sweep(self):
        return __getattr__("sweep")

    @sweep.setter
    def sweep(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            globals()["sweep"] = value


sys.modules[__name__].__class__ = _Package
