"""Text loading, fixed-length token windows, a Trainer-compatible evaluation loss and a small BPE tokenizer.

Used by the demo, the sparsity sweep and the benchmarks. Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io_utils import plural
from ..perplexity import perplexity

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase


TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl")

# A blank line (possibly holding spaces) separates documents in a `.txt` file.
_BLANK_LINE_RE = re.compile(r"\n[ \t\r\f\v]*\n")
# Documents are tokenized in chunks of this many, so that `max_windows` can stop early on a large corpus.
_TOKENIZE_CHUNK = 256


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {_first_line(e)}") from e
    except OSError as e:
        raise ValueError(f"Could not read {path}: {_first_line(e)}") from e
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise ValueError(f"{path} is empty.")
    if _BLANK_LINE_RE.search(text):
        # Paragraph mode: each block between blank lines is one document; its inner newlines are kept.
        docs = [block.strip() for block in _BLANK_LINE_RE.split(text)]
    else:
        docs = [line.strip() for line in text.split("\n")]
    return [doc for doc in docs if doc]


def _text_column(dataset: Any, path: Path) -> list[str]:
    columns = getattr(dataset, "column_names", None) or []
    if "text" not in columns:
        raise ValueError(f"{path} has no 'text' field (found: {', '.join(map(str, columns)) or 'none'}).")
    texts = dataset["text"]
    if any(t is not None and not isinstance(t, str) for t in texts):
        raise ValueError(f"The 'text' field of {path} must hold strings.")
    return [t for t in texts if t is not None and t.strip()]


def _read_json(path: Path) -> list[str]:
    import datasets

    try:
        if not path.read_bytes().strip():
            raise ValueError(f"{path} is empty.")
    except OSError as e:
        raise ValueError(f"Could not read {path}: {_first_line(e)}") from e
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # the json builder raises several unrelated types for a malformed file
        raise ValueError(f"Could not read {path} as JSON: {_first_line(e)}") from e
    return _text_column(dataset, path)


def _read_saved_dataset(path: Path) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # missing state files, corrupt arrow data, a folder that is no dataset at all
        raise ValueError(f"Could not load a saved dataset from {path}: {_first_line(e)}") from e
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} holds a DatasetDict without a 'train' split ({', '.join(dataset)}).")
        dataset = dataset["train"]
    return _text_column(dataset, path)


def load_texts(path: str | os.PathLike) -> list[str]:
    """
    Loads a list of documents from a text file, a JSON file or a saved `datasets.Dataset`.

    Args:
        path (`str` or `os.PathLike`):
            One of:
            - a `.txt` file (UTF-8). If it contains a blank line, documents are the blocks separated by blank lines
              (newlines inside a block are kept); otherwise each non-empty line is a document.
            - a `.json` or `.jsonl` file with a `text` field, read with `datasets.load_dataset("json", ...)`.
            - a folder written by `datasets.Dataset.save_to_disk` (or a `DatasetDict` with a `train` split) with a
              `text` column.

    Returns:
        `list[str]`: the non-empty documents, in file order.

    Raises:
        `ValueError`: if the path is missing, the file is empty, the extension is unknown, there is no `text` field,
        or the file cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    if path.is_dir():
        texts = _read_saved_dataset(path)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        texts = _read_txt(path)
    elif path.suffix.lower() in JSON_SUFFIXES:
        texts = _read_json(path)
    else:
        known = ", ".join(TEXT_SUFFIXES + JSON_SUFFIXES)
        raise ValueError(f"Unknown file type {path.suffix!r} for {path}; expected {known} or a saved dataset folder.")
    if not texts:
        raise ValueError(f"{path} holds no non-empty text.")
    return texts


def _stream_chunks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Iterable[list[list[int]]]:
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start : start + _TOKENIZE_CHUNK])
        # `verbose=False`: documents longer than `model_max_length` are expected here, they are cut into windows.
        yield tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def make_windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    seq_len: int,
    max_windows: int | None = None,
    stride: int | None = None,
) -> datasets.Dataset:
    """
    Tokenizes documents into one stream and cuts it into fixed-length windows for causal language modeling.

    The documents are tokenized without special tokens and joined with `tokenizer.eos_token_id` between consecutive
    documents. Window `i` covers tokens `[i * stride, i * stride + seq_len)`; the tail shorter than `seq_len` is
    dropped.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer with an `eos_token`.
        texts (`Sequence[str]`):
            Documents, for example from [`load_texts`].
        seq_len (`int`):
            Number of tokens in every window (at least 2).
        max_windows (`int`, *optional*):
            Keep only the first `max_windows` windows; documents past them are not tokenized.
        stride (`int`, *optional*, defaults to `seq_len`):
            Distance between the starts of two windows. Smaller than `seq_len` gives overlapping windows.

    Returns:
        `datasets.Dataset`: columns `input_ids` and `labels` (a copy of `input_ids`; the model shifts them), each
        a list of exactly `seq_len` token ids.
    """
    import datasets

    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of documents, not a single string.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}.")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}.")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("The tokenizer has no eos_token; it is needed to separate documents.")

    needed = None if max_windows is None else (max_windows - 1) * stride + seq_len
    stream: list[int] = []
    for ids_per_doc in _stream_chunks(tokenizer, texts):
        for ids in ids_per_doc:
            if stream:
                stream.append(eos_id)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break

    if len(stream) < seq_len:
        raise ValueError(f"The texts give {plural(len(stream), 'token')}, fewer than seq_len={seq_len}.")
    starts = range(0, len(stream) - seq_len + 1, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    windows = [stream[s : s + seq_len] for s in starts]
    return datasets.Dataset.from_dict({"input_ids": windows, "labels": [list(w) for w in windows]})


def evaluate_loss(
    model: torch.nn.Module,
    windows: datasets.Dataset,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, float]:
    """
    Mean next-token loss of a causal LM over token windows, equal to `Trainer.evaluate(windows)["eval_loss"]`.

    Like [`~transformers.Trainer.evaluate`] with `per_device_eval_batch_size=batch_size` on one process, each batch
    mean loss is weighted by the number of windows in the batch, so a smaller last batch counts per sample. For
    windows of equal length without `-100` labels (as from [`make_windows`]) this is the mean over all predicted
    tokens. Unlike the Trainer, non-finite batch losses are not filtered out: a diverged model reports `nan`/`inf`.

    Args:
        model (`torch.nn.Module`):
            A causal LM whose forward takes `input_ids` and `labels` and returns `.loss`. It is put in eval mode
            for the call and back in its previous mode afterwards.
        windows (`datasets.Dataset`):
            Columns `input_ids` and optionally `labels` (defaults to `input_ids`), rows of equal length.
        batch_size (`int`, *optional*, defaults to 8):
            Windows per forward pass.
        max_batches (`int`, *optional*):
            Stop after this many batches (the first `max_batches * batch_size` windows).

    Returns:
        `dict`: `loss` (`float`), `perplexity` (`float`, `exp(loss)`; `None` where it overflows a float, past a loss
        of ~709.78: `hf_weightprune.perplexity`) and `tokens` (`int`, the number of predicted tokens).
    """
    import torch

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}.")
    columns = getattr(windows, "column_names", None) or []
    if "input_ids" not in columns:
        raise ValueError("windows must be a datasets.Dataset with an 'input_ids' column.")
    n = len(windows)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if n == 0:
        raise ValueError("windows is empty.")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    weighted_sum, samples, tokens = 0.0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = windows[start : min(start + batch_size, n)]
                input_ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
                labels = torch.tensor(batch.get("labels", batch["input_ids"]), dtype=torch.long, device=device)
                loss = model(input_ids=input_ids, labels=labels).loss
                rows = input_ids.shape[0]
                # Same weighting as Trainer.evaluation_loop: each batch mean is repeated once per sample.
                weighted_sum += loss.float().item() * rows
                samples += rows
                # The model shifts labels by one: position 0 is never a target.
                tokens += int((labels[:, 1:] != -100).sum().item())
    finally:
        model.train(was_training)

    mean = weighted_sum / samples
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": tokens}
