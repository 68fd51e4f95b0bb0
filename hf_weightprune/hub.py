"""Model card and Hub publishing for pruned checkpoints.

A pruned output folder (written by `save_pruned`) holds a standard Transformers checkpoint plus `sparsity.json`.
This module renders a model card from it and uploads the folder to the Hugging Face Hub.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token

from . import __version__
from .io_utils import atomic_write_text

SPARSITY_FILE = "sparsity.json"
IMPORTANCE_DIR = "importance"
CARD_FILE = "README.md"
CARD_TEMPLATE = "pruned_model_card.md"
SWEEP_PLOT = "sweep.png"
SWEEP_TABLE = "sweep.json"

# One line per importance criterion: the formula shown in the card, and where it comes from.
CRITERIA: dict[str, tuple[str, str | None]] = {
    "temporal_magnitude": (
        "`imp_i = sum_t t*|w_i(t)| / sum_t t`, the magnitude averaged over training with later steps weighted more",
        "arXiv:2502.17071",
    ),
    "magnitude": ("`|w|`, the magnitude of the final weight", None),
    "movement": ("`-sum_t w*g`, weights moving away from zero are kept", "Sanh et al. 2020"),
    "taylor": ("`sum_t |w*g|`, first-order Taylor estimate of the loss change when the weight is removed", None),
    "fisher": ("`sum_t g^2`, diagonal empirical Fisher information", None),
    "wanda": ("`|W_ij| * ||x_j||_2`, weight magnitude times the norm of its input activation", "Sun et al. 2023"),
}

_STRUCTURES = {
    "unstructured": ("unstructured sparsity", "unstructured-sparsity", "any individual weight can be zeroed"),
    "2:4": ("2:4 semi-structured sparsity", "2:4-sparsity", "two of every four consecutive weights in a row are zero"),
    "neurons": ("structured pruning of MLP neurons", "structured-pruning", "whole MLP neurons are removed"),
    "heads": ("structured pruning of attention heads", "structured-pruning", "whole attention heads are removed"),
}

_SCOPES = {
    "global": "one threshold for all prunable tensors",
    "layer": "the same sparsity in every tensor",
    "row": "the same sparsity in every row of every tensor",
}

_STRUCTURED_ROWS = {
    "intermediate_size": "MLP intermediate size",
    "num_attention_heads": "Attention heads",
    "num_key_value_heads": "Key/value heads",
    "num_parameters": "Parameters",
}


def _template_path() -> Path:
    """The card template, from the installed package data or, in a source checkout, the top-level `model_cards/`."""
    with contextlib.suppress(ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        candidate = resources.files("hf_weightprune").joinpath("model_cards", CARD_TEMPLATE)
        if candidate.is_file():
            return Path(str(candidate))
    candidate = Path(__file__).resolve().parent.parent / "model_cards" / CARD_TEMPLATE
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"Model card template {CARD_TEMPLATE!r} is missing from the hf_weightprune installation.")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _load_sparsity(output_dir: str | os.PathLike) -> tuple[Path, dict]:
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Pruned model folder {str(folder)!r} does not exist.")
    sparsity_path = folder / SPARSITY_FILE
    if not sparsity_path.is_file():
        raise ValueError(f"{str(folder)!r} is not a pruned checkpoint: it has no {SPARSITY_FILE}.")
    sparsity = _read_json(sparsity_path)
    if not isinstance(sparsity, dict) or "structure" not in sparsity or "tensors" not in sparsity:
        raise ValueError(f"{sparsity_path} is not a valid hf-weightprune sparsity report.")
    return folder, sparsity


def _existing_card_data(folder: Path) -> dict:
    """Front matter of an existing README.md (e.g. copied from the base model), or `{}`."""
    readme = folder / CARD_FILE
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:
        # A README without valid front matter simply carries no metadata
        return {}


def _module_type(tensor_name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `mlp.down_proj`."""
    parts = tensor_name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts[-2:])


def _module_table(tensors: dict[str, dict]) -> list[dict]:
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, info in tensors.items():
        numel = int(info.get("numel") or math.prod(info.get("shape") or [0]))
        row = groups.setdefault(
            _module_type(name), {"module": _module_type(name), "tensors": 0, "numel": 0, "zeros": 0.0}
        )
        row["tensors"] += 1
        row["numel"] += numel
        row["zeros"] += float(info.get("sparsity", 0.0)) * numel
    rows = []
    for row in groups.values():
        row["sparsity"] = row.pop("zeros") / row["numel"] if row["numel"] else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: r["module"])


def _structured_rows(structured: dict | None) -> list[dict]:
    if not structured:
        return []
    rows = []
    for key, label in _STRUCTURED_ROWS.items():
        value = structured.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            before, after = value
            if isinstance(before, int) and isinstance(after, int) and key == "num_parameters":
                before, after = f"{before:,}", f"{after:,}"
            rows.append({"name": label, "before": before, "after": after})
    return rows


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    # exp overflows past ~709; an infinite perplexity is the honest value there
    return math.exp(loss) if loss < 709 else float("inf")


def _importance_summary(importance: dict | None) -> str:
    if not importance:
        return "importance settings not recorded"
    bits = []
    if importance.get("num_samples") is not None:
        bits.append(f"{importance['num_samples']} snapshots")
    if importance.get("step") is not None:
        bits.append(f"up to step {importance['step']}")
    settings = importance.get("settings") or {}
    if settings.get("every_n_steps"):
        every = settings["every_n_steps"]
        bits.append("every step" if every == 1 else f"every {every} steps")
    if settings.get("window"):
        bits.append(f"window of {settings['window']} steps")
    return ", ".join(bits) or "importance settings not recorded"


def _target_text(target) -> str:
    """A float target, or per-module targets (`{regex: float}`) as a short list."""
    if isinstance(target, dict):
        return "per module: " + ", ".join(f"`{k}` {100 * float(v):.2f}%" for k, v in target.items())
    return f"{100 * float(target or 0.0):.2f}%"


def _tags(structure: str, criterion: str | None) -> list[str]:
    tags = ["pruned", "sparsity", "hf-weightprune", _STRUCTURES.get(structure, (None, f"{structure}-sparsity"))[1]]
    if criterion:
        tags.append(criterion.replace("_", "-"))
    return tags


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the model card of a pruned checkpoint.

    Reads `sparsity.json` and `config.json`, and `sweep.json` / `sweep.png` when a sweep wrote them.

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder written by `save_pruned`.
        base_model (`str`, *optional*):
            Hub id of the dense model. Defaults to `sparsity.json["base_model"]`, then to an existing README's.
        license (`str`, *optional*):
            License id. Defaults to the `license` of an existing README.md or of `config.json`, if any.
        repo_id (`str`, *optional*):
            Hub id the card is written for, used in the loading snippet. Defaults to the folder name.

    Returns:
        [`huggingface_hub.ModelCard`]: the rendered card.
    """
    folder, sparsity = _load_sparsity(output_dir)
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    existing = _existing_card_data(folder)

    base_model = base_model or sparsity.get("base_model") or existing.get("base_model")
    license = license or existing.get("license") or config.get("license")
    structure = sparsity["structure"]
    criterion = sparsity.get("criterion") or (sparsity.get("importance") or {}).get("criterion")
    repo_id = repo_id or folder.resolve().name
    model_name = repo_id.split("/")[-1]

    eval_ctx = None
    eval_results = None
    report = sparsity.get("eval")
    if report and report.get("pruned_loss") is not None:
        dataset = str(report.get("dataset") or "unknown")
        eval_ctx = {
            "dataset": dataset,
            "dense_loss": report.get("dense_loss"),
            "pruned_loss": report["pruned_loss"],
            "dense_perplexity": _perplexity(report.get("dense_loss")),
            "pruned_perplexity": _perplexity(report["pruned_loss"]),
        }
        common = {"task_type": "text-generation", "dataset_type": dataset, "dataset_name": dataset}
        eval_results = [
            EvalResult(
                **common, metric_type="loss", metric_value=report["pruned_loss"], metric_name="Eval loss (pruned)"
            ),
            EvalResult(
                **common,
                metric_type="perplexity",
                metric_value=eval_ctx["pruned_perplexity"],
                metric_name="Perplexity (pruned)",
            ),
        ]
        if report.get("dense_loss") is not None:
            eval_results += [
                EvalResult(
                    **common,
                    metric_type="dense_loss",
                    metric_value=report["dense_loss"],
                    metric_name="Eval loss (dense)",
                ),
                EvalResult(
                    **common,
                    metric_type="dense_perplexity",
                    metric_value=eval_ctx["dense_perplexity"],
                    metric_name="Perplexity (dense)",
                ),
            ]

    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(structure, criterion),
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )

    sweep_rows = []
    if (folder / SWEEP_TABLE).is_file():
        for row in _read_json(folder / SWEEP_TABLE) or []:
            if isinstance(row, dict) and row.get("loss") is not None and row.get("sparsity") is not None:
                perplexity = row.get("perplexity")
                sweep_rows.append(
                    {
                        "criterion": row.get("criterion", criterion),
                        "sparsity": float(row["sparsity"]),
                        "loss": float(row["loss"]),
                        "perplexity": float(perplexity) if perplexity is not None else _perplexity(float(row["loss"])),
                    }
                )

    structure_label, _, structure_detail = _STRUCTURES.get(structure, (structure, None, None))
    structured_rows = _structured_rows(sparsity.get("structured"))
    structured_summary = ", ".join(f"{r['name'].lower()} {r['before']} -> {r['after']}" for r in structured_rows)
    formula, reference = CRITERIA.get(criterion, (f"custom criterion `{criterion}`", None))
    has_tokenizer = any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )

    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        model_title=f"{model_name} ({structure_label})",
        repo_id=repo_id,
        library_version=sparsity.get("library_version") or __version__,
        format_version=sparsity.get("format_version", 1),
        structure=structure,
        structure_label=structure_label,
        structure_detail=structure_detail,
        structured=structured_rows,
        structured_summary=structured_summary,
        scope=sparsity.get("scope", "global"),
        scope_detail=_SCOPES.get(sparsity.get("scope"), "custom"),
        target_sparsity_text=_target_text(sparsity.get("target_sparsity")),
        global_sparsity=float(sparsity.get("global_sparsity") or 0.0),
        model_sparsity=float(sparsity.get("model_sparsity") or 0.0),
        criterion=criterion,
        criterion_formula=formula,
        criterion_reference=reference,
        criteria=[(name, info[0]) for name, info in CRITERIA.items()],
        importance_summary=_importance_summary(sparsity.get("importance")),
        schedule=sparsity.get("schedule"),
        module_table=_module_table(sparsity["tensors"]),
        eval=eval_ctx,
        sweep_rows=sweep_rows,
        has_plot=(folder / SWEEP_PLOT).is_file(),
        has_tokenizer=has_tokenizer,
    )


def write_model_card(output_dir: str | os.PathLike, **kwargs) -> Path:
    """Render the model card (see [`render_model_card`]) and write it atomically to `output_dir/README.md`.

    Returns:
        `Path`: the path of the written README.md.
    """
    card = render_model_card(output_dir, **kwargs)
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, str(card))
    return path


def _importance_folder(folder: Path, sparsity: dict) -> Path:
    local = folder / IMPORTANCE_DIR
    if local.is_dir():
        return local
    recorded = (sparsity.get("importance") or {}).get("path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    where = f"{str(local)!r}" + (f" nor {recorded!r}" if recorded else "")
    raise FileNotFoundError(f"include_importance=True but no importance folder was found: neither {where} exists.")


@contextlib.contextmanager
def _explain_auth_errors(repo_id: str, token: str | None):
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status not in (401, 403):
            raise
        if token is None and get_token() is None:
            hint = "no Hub token was found: pass `token=` or run `hf auth login`"
        else:
            hint = "check that the token is valid and has write access to this repo"
        message = f"The Hub refused access to {repo_id!r} (HTTP {status}): {hint}."
        # Paranoia: a server could echo the credential back in its error text
        if token:
            message = message.replace(token, "***")
        raise PermissionError(message) from None


def push_pruned_to_hub(
    output_dir: str | os.PathLike,
    *,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    include_importance: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a pruned checkpoint folder to the Hugging Face Hub.

    Creates the repo if needed, writes the model card when the folder has no README.md, and uploads the folder. The
    importance statistics are left out unless `include_importance=True`, in which case they go to `importance/`.

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder written by `save_pruned` (a Transformers checkpoint plus `sparsity.json`).
        repo_id (`str`):
            Target repo, e.g. `"username/llama-pruned-50"`.
        private (`bool`, *optional*):
            Visibility of the repo when it is created. Ignored if the repo exists.
        token (`str`, *optional*):
            Hub token with write access. Defaults to the saved token (`hf auth login`) or `HF_TOKEN`.
        revision (`str`, *optional*):
            Branch to push to, created from `main` if it does not exist. Defaults to `main`.
        include_importance (`bool`, *optional*, defaults to `False`):
            Also upload the importance folder (`output_dir/importance`, else the folder recorded in `sparsity.json`).
        commit_message (`str`, *optional*):
            Commit message. A summary of the pruning by default.

    Returns:
        `str`: the URL of the commit.
    """
    folder, sparsity = _load_sparsity(output_dir)
    importance = _importance_folder(folder, sparsity) if include_importance else None
    if not (folder / CARD_FILE).is_file():
        write_model_card(folder, repo_id=repo_id)

    if commit_message is None:
        commit_message = (
            f"Upload pruned model ({sparsity['structure']}, {100 * float(sparsity.get('global_sparsity') or 0):.1f}% "
            f"sparsity) with hf-weightprune"
        )

    # Temp files of interrupted atomic writes are never part of a checkpoint
    ignore_patterns = [".*.tmp", "*/.*.tmp"]
    local_importance = importance is not None and importance.resolve() == (folder / IMPORTANCE_DIR).resolve()
    if not local_importance:
        ignore_patterns += [IMPORTANCE_DIR, f"{IMPORTANCE_DIR}/*"]

    api = HfApi(token=token, library_name="hf-weightprune", library_version=__version__)
    with _explain_auth_errors(repo_id, token):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns,
        )
        if importance is not None and not local_importance:
            # Recorded elsewhere (e.g. a run's output folder): a second commit puts it under importance/
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=importance,
                path_in_repo=IMPORTANCE_DIR,
                revision=revision,
                commit_message=f"{commit_message} (importance)",
                ignore_patterns=[".*.tmp", "*/.*.tmp"],
            )
    return commit.commit_url
