"""`merge_and_unload_sparse`: merge LoRA adapters into a pruned base model without filling its zeros back in.

A plain merge adds `scale * B @ A`, which is dense, to every base weight: a 50%-sparse model comes back dense.
Here each merged weight is `(W + scale * B @ A) * M`, with `M = (W != 0)` of the base weight (or given masks).

Fused MoE expert parameters that peft targets with `LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])`
(its `ParamWrapper`, peft >= 0.17) are merged the same way: the mask of the fused parameter is `W != 0`, with the
masks given for its expert slices (`<experts>.<e>.gate_proj.weight`, as a schedule holds them) written into it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..matching import canonical_name
from ..moe import ExpertSlice, find_moe_blocks
from .masks import apply_mask_
from .report import PruningReport

logger = logging.getLogger(__name__)


def merge_and_unload_sparse(
    peft_model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    return_report: bool = False,
    safe_merge: bool = False,
) -> nn.Module | tuple[nn.Module, PruningReport]:
    """
    Merge LoRA into the base weights with peft's own `merge_and_unload`, then re-apply each base weight's mask, so
    a pruned model stays exactly as sparse (the merged weight is `(W + scale * B @ A) * M`).

    Args:
        peft_model (`peft.PeftModel`):
            A LoRA model whose base weights hold the pruned zeros. Mutated, as peft's `merge_and_unload` does.
        masks (`Mapping[str, torch.BoolTensor]`, *optional*):
            Keep-masks by canonical parameter name (e.g. a gradual schedule's `masks`), expert slices by their slice
            name; LoRA base weights not in it use `W != 0` of their base weight.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return a [`PruningReport`] of the merged LoRA weights.
        safe_merge (`bool`, *optional*, defaults to `False`):
            Passed to peft (checks the merged weights for NaNs).

    Returns:
        `nn.Module`: the plain base model; with `return_report=True`, `(model, report)`, where `report` is a
        [`PruningReport`] (structure `"unstructured"`) whose `tensors[name]["sparsity"]` is the fraction of zeros of
        each merged weight, measured on the merged weights, and `global_sparsity` the same over all of them.

    Raises:
        `ImportError`: without peft.
        `ValueError`, before anything is merged: not a peft model, no LoRA layer, a quantized (non-floating) base
        weight, or a mask whose shape differs from its weight.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise ImportError("merge_and_unload_sparse needs peft: pip install peft") from e
    if not hasattr(peft_model, "merge_and_unload"):
        raise ValueError(f"merge_and_unload_sparse expects a peft LoRA model; got {type(peft_model).__name__}")
    keep: dict[str, torch.Tensor] = {}
    slices: dict[str, list[ExpertSlice]] | None = None  # fused parameter name -> its expert slices, when needed
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        # peft's ParamWrapper (`target_parameters`) adapts one parameter of its base module, e.g. a fused expert one
        attr = getattr(module, "parameter_name", None) or "weight"
        weight = getattr(module.get_base_layer(), attr)
        if not weight.is_floating_point():
            raise ValueError(f"{name}: base weight of dtype {weight.dtype} (quantized?) cannot be merged sparsely")
        pname = f"{canonical_name(name)}.{attr}"
        mask = masks.get(pname) if masks is not None else None
        if mask is not None and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"masks[{pname!r}] has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}: "
                             "masks of another model?")
        keep[pname] = (weight.detach() != 0) if mask is None else mask.to(weight.device, torch.bool)
        if attr != "weight" and masks:
            if slices is None:
                slices = {}
                for block in find_moe_blocks(peft_model):
                    for s in block.slices():
                        slices.setdefault(s.param_name, []).append(s)
            for s in slices.get(pname, ()):
                if s.name in masks:
                    given = masks[s.name]
                    if tuple(given.shape) != tuple(s.shape):
                        raise ValueError(f"masks[{s.name!r}] has shape {tuple(given.shape)}, the expert slice "
                                         f"{tuple(s.shape)}: masks of another model?")
                    s.view(keep[pname]).copy_(given)
    if not keep:
        raise ValueError("merge_and_unload_sparse found no LoRA layer in the model")
    model = peft_model.merge_and_unload(safe_merge=safe_merge)
    params = dict(model.named_parameters())
    for pname, mask in keep.items():
        apply_mask_(params[pname], mask)
    # Measured on the merged weights (not the masks): what the saved checkpoint will hold.
    merged = {pname: params[pname].detach() != 0 for pname in keep}
    report = PruningReport.from_masks(merged, sum(p.numel() for p in model.parameters()))
    logger.info("merge_and_unload_sparse: %d merged weights, sparsity %.4f after merge", len(keep),
                report.global_sparsity)
    return (model, report) if return_report else model
