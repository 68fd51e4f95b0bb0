"""`save_pruned` and `prune_checkpoint`: a standard HF checkpoint plus `sparsity.json` and a model card, written
atomically (`io_utils.atomic_folder`); the output-folder rule ([`check_output_dir`]). The `sparsity.json` format
(payload, writer, reader, `load_masks`) is `files/pruned_files.py`'s."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as D
from ..collect.importance import Importance
from ..config import PruneConfig
from ..files import safetensors_io as sio
from ..files.pruned_files import SPARSITY_NAME, sparsity_dict, write_sparsity
from ..io_utils import atomic_folder, check_arg_type
from ..moe import stored_slice_name
from ..prune.report import PruningReport
from .measure import check_baseline, measure_model, measured_section
from .recipe import distillation_dict, schedule_dict, training_dict

if TYPE_CHECKING:
    from ..train.distill import DistillConfig
    from ..train.schedule import PruneSchedule

logger = logging.getLogger(__name__)


def _same_or_inside(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep)


_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


def check_output_dir(output_dir: str | os.PathLike, *, input_dirs: Iterable[str | os.PathLike | None] = (),
                     importance_dirs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                     require_empty: bool = True, arg: str = "output_dir", overwrite_hint: str = "overwrite=True"
                     ) -> None:
    """The one rule for where hf-weightprune writes an output folder (`save_pruned`, `prune_checkpoint`, `sweep`, the
    CLI): checked before any work, and `overwrite` never lifts the first four refusals.

    A fresh (absent or empty) folder is accepted anywhere else, including a subfolder of the training output_dir or
    model folder that is read (`out/pruned` for `out`): the inputs' own files are never modified. Refused, in order:
    1. the input folder itself;
    2. the importance folder, or a folder inside it;
    3. an existing Trainer `checkpoint-N` folder, or a folder inside one (the Trainer rotates and resumes from them);
    4. a folder that holds an input or the importance (replacing it would delete them);
    5. a non-empty folder, unless `overwrite`.
    Writers that only replace their own named files in the folder (`sweep`) pass `require_empty=False`: 4 and 5 do
    not apply to them.

    Args:
        output_dir (`str` or `os.PathLike`): the folder to write.
        input_dirs (`Iterable[str | os.PathLike | None]`, *optional*, defaults to `()`): folders read; `None` and
            paths that are not local folders (Hub ids) are skipped.
        importance_dirs (`Iterable[str | os.PathLike | None]`, *optional*, defaults to `()`): importance folders read.
        overwrite (`bool`, *optional*, defaults to `False`): a non-empty `output_dir` may be replaced.
        require_empty (`bool`, *optional*, defaults to `True`): the output is published as a whole folder (refusals 4
            and 5 apply).
        arg (`str`, *optional*, defaults to `"output_dir"`): how the message names the output (`"--output_dir"` for
            the CLI).
        overwrite_hint (`str`, *optional*, defaults to `"overwrite=True"`): how the message names the overwrite switch.

    Then the OS rules, which would otherwise fail after the work: `output_dir` (or a parent) is an existing file, or
    the folder that receives it is not writable.

    Raises:
        ValueError: refusals 1-4.
        FileExistsError: refusal 5.
        NotADirectoryError: `output_dir` or one of its parents is a file.
        PermissionError: the folder that receives `output_dir` is not writable.
    """
    out = os.path.realpath(output_dir)
    shown = os.fspath(output_dir)
    inputs = [os.fspath(d) for d in input_dirs if d is not None and os.path.isdir(d)]
    importances = [os.fspath(d) for d in importance_dirs if d is not None and os.path.isdir(d)]
    for src in inputs:
        if out == os.path.realpath(src):
            raise ValueError(f"Refusing to write into the input checkpoint {src}: {arg} is that folder; choose a new "
                             f"folder such as {os.path.join(src, 'pruned')}")
    for imp in importances:
        if _same_or_inside(out, imp):
            raise ValueError(f"Refusing to write into the importance folder {imp}: {arg} {shown} is inside it; "
                             "choose a folder outside it")
    folder = out
    while True:  # the output or one of its parents is an existing checkpoint-N folder
        if _CHECKPOINT_NAME.fullmatch(os.path.basename(folder)) and os.path.isdir(folder):
            raise ValueError(f"Refusing to write into the Trainer checkpoint {folder} ({arg} {shown}): the Trainer "
                             "rotates and resumes from checkpoint-N folders; choose a folder outside it")
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for src in inputs + importances if require_empty else []:  # a writer of named files (sweep) replaces no folder
        if _same_or_inside(src, out):
            raise ValueError(f"Refusing to write into {shown}: it holds the input {src}, which {arg} would replace; "
                             "choose a new folder")
    if require_empty and os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{arg} {shown} exists and is not empty; pass {overwrite_hint} to replace it, or "
                              "choose a new folder")
    _check_writable(out, shown, arg, require_empty)


def _check_writable(out: str, shown: str, arg: str, whole_folder: bool) -> None:
    """Refuse, before any work, an output the OS would refuse after it: a file in the way, or a folder this process
    cannot write in (a whole-folder writer creates its temporary folder beside `out`, in its parent)."""
    folder = out if os.path.isdir(out) and not whole_folder else os.path.dirname(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{arg} {shown} is a file; choose a folder (a new one such as {shown}-out)")
    while not os.path.exists(folder):  # makedirs creates the missing parents in the nearest existing one
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{arg} {shown}: {folder} is a file, not a folder; choose another {arg}")
    try:  # a real try, not os.access: root on a read-only mount, ACLs and quotas all answer here
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".hf-weightprune-probe-"))
    except OSError as e:
        raise PermissionError(f"{arg} {shown}: cannot write in {folder} ({e.strerror}); choose a folder you can "
                              "write to") from None


def _write_sparsity_and_card(folder: str, output_dir: str, payload: dict[str, Any], base_model: str | None,
                             write_card: bool, source: str | None = None) -> None:
    """Write `sparsity.json` and the card into the temporary `folder` that becomes `output_dir`; the payload is
    completed from the model's `source` and local paths made relative to `output_dir` first (`provenance`)."""
    from .provenance import complete_payload

    payload = complete_payload(payload, output_dir, source=source)
    write_sparsity(folder, payload)
    if write_card:
        from .card import write_model_card

        # The card is named after the folder it will be published as, not the temporary one it is written in.
        write_model_card(folder, base_model=payload.get("base_model") or base_model, license=payload.get("license"),
                         repo_id=os.path.basename(os.path.abspath(output_dir)), sparsity=payload)


def warn_cross_input(model_dir: str | os.PathLike, config: PruneConfig) -> None:
    """Warn, before any work, when `cross_alpha` prunes a folder that is already pruned (it holds a `sparsity.json`):
    the cross term pairs the dense teacher's inputs with the pruned student's, so the asymmetric sweep is meant for
    that teacher, and the run's own (pruned) output is the usual mistake. Not refused: a run's teacher may itself be
    a pruned checkpoint (a gradual run started from one, to prune further), and then pruning it is the intended use.

    Args:
        model_dir (`str` or `os.PathLike`): the folder about to be pruned (a Hub id is not checked).
        config (`PruneConfig`): the prune's config.
    """
    if config.cross_alpha is None or not os.path.isfile(os.path.join(model_dir, SPARSITY_NAME)):
        return
    # In the keyword's words: the command line's log handler names the flag (`--cross_alpha 0.25`), on both its paths.
    logger.warning("cross_alpha=%g: %s is already pruned (it holds %s), and the cross term pairs the dense teacher's "
                   "inputs with the pruned student's: unless this folder is the run's teacher, prune the model the run "
                   "distilled from (a gradual run's default: the model it started from)", config.cross_alpha,
                   os.fspath(model_dir), SPARSITY_NAME)


def _check_common(fn: str, output_dir, base_model, overwrite, write_card) -> None:
    check_arg_type(fn, "output_dir", output_dir, (str, os.PathLike), "a folder path (str or os.PathLike)")
    check_arg_type(fn, "base_model", base_model, (str, type(None)), "a Hub id (str) or None")
    check_arg_type(fn, "overwrite", overwrite, bool, "a bool")
    check_arg_type(fn, "write_card", write_card, bool, "a bool")


def save_pruned(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    report: PruningReport,
    tokenizer=None,
    base_model: str | None = None,
    eval_results: dict | None = None,
    schedule: PruneSchedule | dict | None = None,
    distillation: DistillConfig | dict | None = None,
    training: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    write_card: bool = True,
    measure_speed: bool = False,
    baseline: nn.Module | str | os.PathLike | None = None,
) -> str:
    """Save a pruned model as a standard HF checkpoint with `sparsity.json` and a `README.md` model card.

    Args:
        model (`nn.Module`): the pruned model (`prune_` already applied).
        output_dir (`str` or `os.PathLike`): a new or empty folder, e.g. `out/pruned` beside the training run; the
            rule is [`check_output_dir`] (never the input checkpoint itself, the importance folder, a `checkpoint-N`).
        report (`PruningReport`): what `prune_` returned.
        tokenizer (*optional*): saved beside the model.
        base_model (`str`, *optional*): Hub id or path of the dense model (card front matter); defaults to
            `model.config._name_or_path` when that looks like a Hub id.
        eval_results (`dict`, *optional*): `{"dense_loss", "pruned_loss", "dataset", "tokens", "step"}` for the card
            (losses in nats per token; `tokens` evaluated, training `step` of both models). The card compares the
            dense loss only when the dense model was evaluated the same way (`dense_step` / `dense_tokens` /
            `dense_dataset`, when given, must equal the shared values): `dataset` and `tokens` stated, and the same
            `step` when either states one (a one-shot prune evaluated on the same windows states none). A local
            `dataset` file is recorded by its name. `input_sparsity` (a float in [0, 1]: `measure_input(model)` before
            `prune_`, `prune.report`) names the model `dense_loss` is of: "Dense" at 0, else "Input model (50.0%
            sparse)"; without it, a model pruned from a pruned folder (`earlier_prunes`) is "the input model".
        schedule (`PruneSchedule` or `dict`, *optional*): the gradual schedule the model was trained with (the object,
            or its `to_dict()`); recorded in `sparsity.json` and described in the card. A `mode="hold"` schedule is
            described as a recovery fine-tune with the mask held.
        distillation (`DistillConfig` or `dict`, *optional*): the distillation the model was trained with
            (`ImportanceCallback(distill=...)`'s config or its `to_dict()`); recorded in `sparsity.json` (teacher,
            alpha, temperature, hidden_weight, teacher_dtype) and described in the card.
        training (`dict`, *optional*): how long the model was trained after (or while) pruning, as measured by the
            callback: `ImportanceCallback.training_record()` (`{"steps", "tokens"}`: optimizer steps, real training
            tokens); recorded in `sparsity.json` and stated on the card's training line.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        max_shard_size (`str` or `int`, *optional*, defaults to `"5GB"`): passed to `save_pretrained`.
        write_card (`bool`, *optional*, defaults to `True`): write `README.md` (named after `output_dir`).
        measure_speed (`bool`, *optional*, defaults to `False`): measure the written checkpoint's prefill and decode
            tokens/s and peak memory on this machine, beside `baseline` when given ([`measure.measure_model`], its
            defaults; seconds for a small model, as long as the runs for a large one), for `sparsity.json` and the
            card.
        baseline (`PreTrainedModel`, `str` or `os.PathLike`, *optional*): the dense model this one was pruned from,
            with the same vocabulary: a local folder (its weight files' size is recorded beside this one's) or, with
            `measure_speed`, a model in memory.

    Returns:
        `str`: `output_dir`, which now holds the checkpoint, `sparsity.json` and the card. `sparsity.json` always
        records the bytes of the written weight files (`measured`). A hold recovery's
        `sparsity.json` records the criterion, statistics, scope and reconstruction of the prune its masks came from;
        local folders (importance, `masks_from`, teacher) are recorded relative to `output_dir`. A warning is logged
        when `output_dir` lies inside a Trainer `output_dir`, which `trainer.push_to_hub()` uploads whole.

    Raises:
        TypeError: an argument has the wrong type (checked before any work).
        ValueError: `schedule` is a dict without the schedule's fields (e.g. `MaskHolder.state_dict()`),
            `distillation` a dict with a value `DistillConfig` refuses, `training` a dict other than
            `{"steps", "tokens"}` with integers >= 1, `eval_results["input_sparsity"]` outside [0, 1], or
            `output_dir` is refused by [`check_output_dir`] (the input checkpoint, the importance folder, ...), or
            a `baseline` that is not a causal LM or has another vocabulary (a model in memory without
            `measure_speed`).
        FileNotFoundError: a `baseline` folder without `config.json` or safetensors weights.
        FileExistsError: `output_dir` is not empty and `overwrite=False`, or another process wrote it meanwhile
            (nothing of this call is kept then).
    """
    _check_common("save_pruned", output_dir, base_model, overwrite, write_card)
    check_arg_type("save_pruned", "model", model, nn.Module, "the pruned model (torch.nn.Module)")
    check_arg_type("save_pruned", "report", report, PruningReport, "the PruningReport that prune_ returned")
    check_arg_type("save_pruned", "eval_results", eval_results, (dict, type(None)),
                   'a dict {"dense_loss", "pruned_loss", "dataset"} or None')
    share = (eval_results or {}).get("input_sparsity")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
        raise ValueError(f"save_pruned: eval_results['input_sparsity'] must be a share of zeros in [0, 1]; got {share!r}")
    check_arg_type("save_pruned", "max_shard_size", max_shard_size, (str, int), 'a size such as "5GB" or bytes')
    schedule, distillation = schedule_dict(schedule), distillation_dict(distillation)
    training = training_dict(training)
    dense_folder = check_baseline("save_pruned", model, baseline, measure_speed)
    output_dir = os.fspath(output_dir)
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    check_output_dir(output_dir, input_dirs=[source], importance_dirs=[(report.importance or {}).get("path")],
                     overwrite=overwrite)
    if base_model is None and source and not os.path.isdir(source):
        base_model = source
    from .provenance import warn_if_inside_trainer_output

    warn_if_inside_trainer_output(output_dir)

    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        speed = None
        if measure_speed:  # the files just written, not the module: the figures describe the checkpoint
            speed = measure_model(tmp, baseline, device=next(model.parameters()).device)
        payload = sparsity_dict(report, base_model=base_model, schedule=schedule, distillation=distillation,
                                training=training, eval_results=eval_results,
                                measured=measured_section(tmp, dense_folder=dense_folder, speed=speed))
        _write_sparsity_and_card(tmp, output_dir, payload, base_model, write_card, source=source or None)
    logger.info("Saved pruned model to %s (%s)", output_dir, report.summary())
    return output_dir


# Files of a model folder that a pruned copy keeps (config, shard index, tokenizer, custom code); not weights, not
# README.md, not a Trainer checkpoint's optimizer or state.
_KEEP_FILES = ("config.json", sio.INDEX_NAME, "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
               "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*", "preprocessor_config.json",
               "*.py")


class _StoredWeights(Mapping):
    """`sio.CheckpointWeights` under the importance's names: each read (one tensor) goes to the name the file uses
    (`stored[name]`, e.g. Mixtral's `block_sparse_moe.experts.3.w1.weight` for `mlp.experts.3.gate_proj.weight`)."""

    def __init__(self, model_dir: str, weight_map: dict[str, str], stored: dict[str, str]):
        self._stored = stored
        self._file = sio.CheckpointWeights(model_dir, weight_map, list(stored.values()))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file[self._stored[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


def prune_checkpoint(
    model_dir: str | os.PathLike,
    importance: Importance,
    config: PruneConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    write_card: bool = True,
    progress: bool = True,
) -> PruningReport:
    """Prune a safetensors checkpoint file to file: the same result as `from_pretrained` + `prune_` + `save_pruned`,
    without building the model.

    Unstructured and N:M only (structured pruning changes shapes: load the model and use `prune_`). MoE experts too
    when the file stores each expert's projections as tensors of their own (Qwen2/3-MoE, OLMoE, Mixtral's
    `block_sparse_moe.experts.N.w1`): each is read once and pruned as its slice; experts stored fused (gpt-oss files)
    are refused before any work (load the model instead). The model is
    built on the meta device (no memory) to validate the importance and find tied weights; global thresholds
    stream over the importance; then each shard is copied with its pruned tensors masked on the way (same file
    names, header and index), through one reused buffer the size of the largest tensor. Config, tokenizer and
    custom-code files are copied; `sparsity.json` and a model card are added. Written to a temporary folder, then
    renamed.

    Args:
        model_dir (`str`): a local folder with `config.json` and safetensors weights. Never modified.
        importance (`Importance`): from `load_importance()`.
        config (`PruneConfig`, *optional*): defaults to `PruneConfig()`; the same place as in `prune_`.
        output_dir (`str` or `os.PathLike`): a new or empty folder, e.g. `model_dir/pruned` (required); the rule is
            [`check_output_dir`] (never `model_dir` itself, the importance folder, a `checkpoint-N`).
        base_model (`str`, *optional*): Hub id of the dense model, for `sparsity.json` and the card; defaults to
            the config's `_name_or_path` when that is a Hub id.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        write_card (`bool`, *optional*, defaults to `True`): write `README.md` (named after `output_dir`).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over the shards.

    Returns:
        `PruningReport`: what was pruned, as `prune_` returns it (the same content as `sparsity.json`, which also
        records the bytes of the written weight files and of `model_dir`'s).

    Raises:
        TypeError: an argument has the wrong type (checked before any work).
        ValueError: a structured `config` (`neurons`/`heads`), `output_dir` refused by [`check_output_dir`] (the
            input folder, the importance folder, ...), importance that does not match the checkpoint, or a corrupt shard.
        FileNotFoundError: `model_dir` holds no safetensors weights.
        FileExistsError: `output_dir` is not empty and `overwrite=False`, or another process wrote it meanwhile.
    """
    from fnmatch import fnmatch

    from transformers import AutoConfig, AutoModelForCausalLM

    from ..matching import select_names
    from ..prune.plan import PruningPlan
    from ..prune.pruner import refuse_tied

    if output_dir is None:
        raise TypeError("prune_checkpoint: output_dir is required (a new or empty folder)")
    _check_common("prune_checkpoint", output_dir, base_model, overwrite, write_card)
    check_arg_type("prune_checkpoint", "model_dir", model_dir, (str, os.PathLike), "a local folder (str or os.PathLike)")
    check_arg_type("prune_checkpoint", "importance", importance, Importance,
                   "an Importance from load_importance(path) or ImportanceCallback.importance()")
    check_arg_type("prune_checkpoint", "config", config, (PruneConfig, type(None)), "a PruneConfig or None")
    check_arg_type("prune_checkpoint", "progress", progress, bool, "a bool")
    config = config or PruneConfig()
    if config.shrinks:
        raise ValueError(f"structure={config.structure!r} changes tensor shapes and cannot be applied file to "
                         "file: load the model, call prune_ and save_pruned")
    warn_cross_input(model_dir, config)  # the run's own output, a likely mistake
    model_dir, output_dir = os.fspath(model_dir), os.fspath(output_dir)
    check_output_dir(output_dir, input_dirs=[model_dir], importance_dirs=[importance.path], overwrite=overwrite)

    weight_map = sio.weight_map(model_dir)
    for shard in sorted(set(weight_map.values())):  # a cut-short shard fails here, before the model is built
        sio.check_complete(os.path.join(model_dir, shard))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    stored = {n: stored_slice_name(n, weight_map) for n in importance.names}
    importance.bind(skeleton, weights=_StoredWeights(model_dir, weight_map, {n: k for n, k in stored.items() if k}))
    names = select_names(importance.names, config.target_modules, config.exclude_modules)
    missing = [n for n, key in stored.items() if key is None]
    if missing:
        tied = " (tied to the input embedding: tie_word_embeddings)" if missing[0].endswith("lm_head.weight") else ""
        # An expert slice stored as a tensor of its own (`moe.stored_slice_name`) is pruned like any tensor; one
        # inside a fused tensor of the file (gpt-oss) would be read whole per slice: refused, in memory it works
        experts = (": an expert's slice of a fused MoE parameter; load the model, call prune_ and save_pruned"
                   if importance.sections.get("router") else "")
        raise ValueError(f"{missing[0]}{tied} is tracked by the importance but not stored in {model_dir}{experts}")
    name_of = {key: n for n, key in stored.items()}  # the file's tensor name -> the importance's
    params = dict(skeleton.named_parameters())
    # expert slices are stored as tensors of their own here: never tied to anything
    refuse_tied(skeleton, params, [n for n in names if n in params])
    report = PruningReport.for_config(importance, config)
    plan = PruningPlan.build(importance, config, names)
    selected = set(names)

    def mask_of(stored_key: str, shape: list[int]):
        key = name_of.get(stored_key, stored_key)
        edit = plan.edit(key) if key in selected else None
        if edit is None:
            return None
        if list(importance.shapes[key]) != list(shape):
            raise ValueError(f"{key}: importance shape {importance.shapes[key]} != stored shape {shape}")

        def apply(tensor: torch.Tensor) -> None:  # the shard buffer's view of the tensor, edited in place
            report.add_mask(key, edit(tensor))

        return apply

    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        shards = sorted(set(weight_map.values()))
        buffer = bytearray()  # one buffer reused for every pruned tensor: no fresh memory to fault in
        for shard in tqdm(shards, desc=f"pruning {len(shards)} shard(s)", disable=not D.show_progress(progress)):
            buffer = sio.copy_shard_masked(os.path.join(model_dir, shard), os.path.join(tmp, shard), mask_of, buffer)
        for entry in os.listdir(model_dir):
            src = os.path.join(model_dir, entry)
            if entry == sio.INDEX_NAME and shards == [sio.SAFETENSORS_NAME]:
                continue  # a stale index beside the model.safetensors that was read: its shards were not written
            if os.path.isfile(src) and any(fnmatch(entry, pattern) for pattern in _KEEP_FILES):
                shutil.copy2(src, os.path.join(tmp, entry))
        report.tensors = {n: report.tensors[n] for n in names if n in report.tensors}  # model order, as prune_
        report.finalize(sum(p.numel() for p in skeleton.parameters()))
        report.record_plan(plan)
        if base_model is None:
            source = getattr(skeleton.config, "_name_or_path", "") or ""
            base_model = source if source and not os.path.isdir(source) and source != model_dir else None
        payload = sparsity_dict(report, base_model=base_model, measured=measured_section(tmp, dense_folder=model_dir))
        _write_sparsity_and_card(tmp, output_dir, payload, base_model, write_card, source=model_dir)
    logger.info("Saved pruned checkpoint to %s (%s)", output_dir, report.summary())
    return report
