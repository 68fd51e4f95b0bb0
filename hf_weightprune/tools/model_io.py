"""Loading a model folder for the command line: the folder checked before anything is read, the model, and the
tokenizer saved with it, only where there is one (every command that reads a tokenizer goes through
[`load_tokenizer`], so none copies or uses an empty one)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["check_model_dir", "load_model", "load_tokenizer"]


def check_model_dir(path: str, flag: str) -> None:
    """Refuse a model folder that does not exist before anything is loaded (transformers' error is 30+ lines); a
    name that looks like a Hub id goes to the Hub."""
    from ..validation import check_local_path

    check_local_path(flag, path, "a model folder (config.json and weights)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file; pass the model folder that holds it")


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
