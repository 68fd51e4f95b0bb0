"""Loading a model folder for the command line: the folder checked before anything is read, the model, and the
tokenizer saved with it, only where there is one (every command that reads a tokenizer goes through
[`load_tokenizer`], so none copies or uses an empty one)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["check_model_dir", "importance_for_checkpoint", "load_model", "load_tokenizer"]


# What `from_pretrained` reads weights from in a local folder (one file, or an index of shards).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str, flag: str) -> None:
    """Refuse a model folder that does not exist, or a local folder that holds no model (no `config.json`, or no
    weights), before anything is loaded (transformers' errors are 30+ lines, or blame a `model_type` key of a
    `config.json` that is not there); a name that looks like a Hub id goes to the Hub.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: one line naming `flag` and the path.
    """
    from ..validation import check_local_path

    check_local_path(flag, path, "a model folder (config.json and weights)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file; pass the model folder that holds it")
    if not os.path.isdir(path):
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path} is not a model folder: it has no config.json; pass the folder "
                         "save_pretrained (or prune) wrote")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
        raise ValueError(f"{flag} {path} has a config.json but no weights ({', '.join(_WEIGHT_FILES)}); pass the "
                         "folder save_pretrained (or prune) wrote")


def load_model(model_dir: str, dtype: str = "auto", flag: str = "model_dir"):
    """`(model, tokenizer or None)` of a model folder or Hub id; a tokenizer that cannot be loaded is `None` too."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir, flag)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except OSError as e:  # transformers' multi-line "not a local folder and not a valid model identifier"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "" if os.path.exists(model_dir) else " (no such local folder; tried it as a Hub repo id)"
        raise OSError(f"{flag} {model_dir} could not be loaded as a model{where}: {first}") from None
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError, TypeError, ImportError):  # unloadable tokenizer files (older transformers: ImportError)
        tokenizer = None
    return model, tokenizer


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """
    The tokenizer saved with a model, or `None` when there is none: the one loader of every command that reads one.

    A local folder holds a tokenizer when it has a vocabulary file (`files.pruned_files.TOKENIZER_VOCAB_FILES`):
    `AutoTokenizer` would otherwise build an empty, 1-token `Qwen2Tokenizer` for a Qwen2/Qwen3 folder without one
    instead of raising, which a pruned copy would then save and a card tell users to load. A Hub id is asked for
    its file list (offline: loaded as it is).

    Args:
        model_dir (`str` or `os.PathLike`): a model folder or a Hub repo id.

    Returns:
        `PreTrainedTokenizerBase` or `None`.

    Raises:
        What `AutoTokenizer.from_pretrained` raises for tokenizer files it cannot load.
    """
    from transformers import AutoTokenizer

    from ..files.pruned_files import TOKENIZER_VOCAB_FILES, has_tokenizer

    if os.path.isdir(model_dir):
        if not has_tokenizer(model_dir):
            return None
    else:
        try:
            from huggingface_hub import list_repo_files

            files = set(list_repo_files(str(model_dir)))
        except Exception:  # offline, private, no such repo: from_pretrained says what it finds
            files = None
        if files is not None and not files & set(TOKENIZER_VOCAB_FILES):
            return None
    return AutoTokenizer.from_pretrained(model_dir)


def importance_for_checkpoint(importance, model_dir: str):
    """The importance to prune `model_dir` with. One that already has the checkpoint's shapes (statistics of this model,
    a recovery run's) is returned as is. One of a model before its structured prunes (a dense run's) is cut to the
    units each of those prunes kept (`Importance.select`), in order: from the prune whose input sizes the importance
    has, through the folders `earlier_prunes` records, to `model_dir`'s own. Any other is returned as is (`prune_`
    refuses the mismatch, naming `Importance.select`).

    Args:
        importance (`Importance`): as loaded.
        model_dir (`str`): the model folder (or Hub id) about to be pruned.

    Returns:
        `Importance`

    Raises:
        ValueError: the importance has the sizes of an earlier model of the chain whose folder (and so the units its
            prune kept) is gone.
    """
    from ..collect.selection import shape_sizes, sizes_fit
    from ..files.pruned_files import load_sparsity
    from ..files.safetensors_io import checkpoint_weights
    from ..publish.provenance import resolve_record

    try:
        payload = load_sparsity(model_dir)
    except (FileNotFoundError, ValueError):
        return importance
    record = payload.get("structured")
    if not isinstance(record, dict) or "axes" not in record:
        return importance
    try:
        checkpoint_weights(model_dir, importance.shapes)  # headers only: already this checkpoint's shapes?
        return importance
    except (ValueError, FileNotFoundError):
        pass
    chain = [(e, resolve_record(e.get("folder"), model_dir)) for e in payload.get("earlier_prunes") or []
             if isinstance(e, dict) and isinstance(e.get("config"), dict)]
    records: list[tuple[Any, Any]] = [*chain, ({"config": record.get("config")}, model_dir)]
    def fits(before: dict) -> bool:  # the sizes, head counts included where the record states the head size
        return sizes_fit(shape_sizes(importance.shapes, before), before)

    start = next((i for i, (entry, _) in enumerate(records) if fits(entry["config"].get("before") or {})),
                 len(records) - 1)
    for entry, folder in records[start:-1]:
        if not isinstance(folder, str) or not os.path.isdir(folder):
            raise ValueError(f"the importance has the sizes of the model before the {entry.get('structure')} prune "
                             f"of {folder}, which is gone: its kept units are needed to cut the statistics to "
                             f"{model_dir}; pass the importance of a later model of the chain")
        importance = importance.select(load_sparsity(folder)["structured"])
    print(f"{model_dir} was pruned structurally ({record.get('structure')}): using the importance of the units it kept"
          + (f", through {len(records) - 1 - start} earlier prune(s)" if start < len(records) - 1 else ""))
    return importance.select(record)

