"""`merge_and_unload_sparse`: merge LoRA adapters into a pruned base model without filling its zeros back in.

A plain merge adds `scale * B @ A`, which is dense, to every base weight: a 50%-sparse model comes back dense.
Here each merged weight is `(W + scale * B @ A) * M`, with `M = (W != 0)` of the base weight (or given masks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .masks import apply_mask_
from .matching import canonical_name

logger = logging.getLogger(__name__)


def merge_and_unload_sparse(
    peft_model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    return_report: bool = False,
    safe_merge: bool = False,
) -> nn.Module | tuple[nn.Module, dict]:
    """Merge LoRA into the base weights with peft's own `merge_and_unload`, then re-apply each base weight's mask.

    Args:
        peft_model (`peft.PeftModel`): a LoRA model whose base weights hold the pruned zeros.
        masks (`dict[str, Tensor]`, *optional*): keep-masks by canonical parameter name (e.g.
            `PruneSchedule.masks`); weights not in it use `W != 0` of their base weight.
        return_report (`bool`, *optional*, defaults to `False`): also return `{"tensors": {name: density},
            "density": ...}` (fraction of non-zeros after the merge, over the merged weights).
        safe_merge (`bool`, *optional*, defaults to `False`): passed to peft (checks for NaNs).

    Returns:
        The plain base model (`nn.Module`), or `(model, report)` with `return_report=True`.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise ImportError("merge_and_unload_sparse needs peft: pip install peft") from e
    if not hasattr(peft_model, "merge_and_unload"):
        raise ValueError(f"merge_and_unload_sparse expects a peft LoRA model; got {type(peft_model).__name__}")
    keep: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        if not weight.is_floating_point():
            raise ValueError(f"{name}: base weight of dtype {weight.dtype} (quantized?) cannot be merged sparsely")
        pname = f"{canonical_name(name)}.weight"
        mask = masks.get(pname) if masks is not None else None
        keep[pname] = (weight.detach() != 0) if mask is None else mask.to(weight.device, torch.bool)
    if not keep:
        raise ValueError("merge_and_unload_sparse found no LoRA layer in the model")
    model = peft_model.merge_and_unload(safe_merge=safe_merge)
    params = dict(model.named_parameters())
    report: dict = {"tensors": {}}
    kept = total = 0
    for pname, mask in keep.items():
        apply_mask_(params[pname], mask)
        nonzero = int(params[pname].count_nonzero())
        report["tensors"][pname] = nonzero / mask.numel()
        kept, total = kept + nonzero, total + mask.numel()
    report["density"] = kept / total
    logger.info("merge_and_unload_sparse: %d merged weights, density %.4f after merge", len(keep), report["density"])
    return (model, report) if return_report else model
