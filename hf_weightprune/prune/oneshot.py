"""One-shot baselines: importance from a trained model as it is, with no training run.

`magnitude` reads `|W|`; `wanda` forwards a few calibration windows through the callback's own forward-hook
collectors (`activations.ActivationCollector`: real tokens only, q/k/v inputs reduced once; for an MoE model
`router.RouterCollector`: each expert slice's inputs over the tokens the router sent it, and the router statistics).
The tracked weights are the callback's (`moe.find_weights`: Linears and expert slices), so both return the
[`Importance`] type that `ImportanceCallback.importance()` and `load_importance()` return, and `prune_` and the sweep
treat trained and one-shot importance alike, experts included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..collect.activations import ActivationCollector
from ..collect.importance import Importance
from ..collect.router import RouterCollector
from ..config import ImportanceConfig
from ..coverage import refuse_conv1d
from ..moe import ExpertSlice, find_moe_blocks, find_weights
from ..scorers import get_scorer

ONESHOT_CRITERIA = ("magnitude", "wanda")


def _as_batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    """Windows (`datasets.Dataset` with `input_ids`, a `[n, seq]` tensor, or a list of id lists) -> id batches."""
    if hasattr(calibration, "column_names"):
        if "input_ids" not in calibration.column_names:
            raise ValueError("calibration dataset needs an 'input_ids' column (e.g. from make_windows)")
        ids = calibration["input_ids"]
    else:
        ids = calibration
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration must be token windows of shape [n, seq_len]; got shape {list(ids.shape)}")
    return list(ids.split(batch_size))


@torch.no_grad()
def oneshot_importance(
    model: nn.Module,
    criterion: str = "magnitude",
    calibration: Any = None,
    *,
    target_modules: str | list[str] | None = "all-linear",
    exclude_modules: str | list[str] | None = None,
    batch_size: int = 8,
) -> Importance:
    """Importance of `model`'s current weights without training: a one-shot baseline.

    Args:
        model (`nn.Module`): the trained model to score.
        criterion (`str`, *optional*, defaults to `"magnitude"`):
            `"magnitude"` (`|W|`, Han et al. 2015) or `"wanda"` (`|W_ij| * ||x_j||_2` over the calibration
            tokens, Sun et al. 2023, arXiv 2306.11695).
        calibration (*optional*): token windows for `wanda`: a `datasets.Dataset` with `input_ids` (from
            `make_windows`), a `[n, seq_len]` tensor or a list of id lists. Forwarded once, in eval mode.
        target_modules / exclude_modules (*optional*): which weights, with peft's rules: Linears and, in an MoE
            model, expert slices (`model.layers.0.mlp.experts.3.down_proj`), as the training callback tracks them.
        batch_size (`int`, *optional*, defaults to 8): windows per calibration forward.

    Returns:
        [`Importance`]: over the same weights as the callback's. With `wanda` on an MoE model each expert slice's
        statistic sums the inputs of the calibration tokens its router sent it (a token counts once for each expert
        it went to), and the importance carries the calibration pass's router statistics (`sections["router"]`), so
        `PruneConfig(structure="experts")` can remove the experts it used least.

    Raises:
        `ValueError`: an unknown criterion, calibration given to `magnitude` or missing for `wanda`, malformed
        windows, a GPT-2 `Conv1D` model (refused by name, as the callback does), or non-finite activations.

    Scores are derived lazily from the weights the importance is bound to (the model given here, or the one
    passed to `bind` / `prune_`), so they always describe the weights being pruned.
    """
    if criterion not in ONESHOT_CRITERIA:
        raise ValueError(f"one-shot criterion must be one of {ONESHOT_CRITERIA}; got {criterion!r}")
    config = ImportanceConfig(criterion=criterion, target_modules=target_modules, exclude_modules=exclude_modules)
    refuse_conv1d(model)
    tracked = find_weights(model, target_modules, exclude_modules)
    shapes = {t.name: list(t.weight().shape) for t in tracked}
    # a Linear's own Parameter; an expert's live view into its fused parameter (as `Importance.bind` takes them)
    weights = {t.name: t.weight() if isinstance(t, ExpertSlice) else t.param for t in tracked}
    meta: dict[str, Any] = {"global_step": 0, "num_samples": 1, "weight_sum": 0.0, "tokens": {}, "oneshot": True}

    scorer = get_scorer(criterion)
    if scorer.source != "activations":  # a snapshot of the weights: |W|
        if calibration is not None:
            raise ValueError("one-shot magnitude uses no calibration data; pass calibration only for 'wanda'")
        imp: Importance

        def get_state(name: str) -> torch.Tensor:
            # Read through the bound weights so that `bind(other_model)` scores the other model.
            return imp.weights[name].detach().float().abs()

        imp = Importance(config, meta, shapes, get_state, weights=weights)
        return imp

    if calibration is None:
        raise ValueError("one-shot wanda needs calibration windows (e.g. make_windows(tokenizer, texts, ...))")
    device = next(model.parameters()).device
    slices = [t for t in tracked if isinstance(t, ExpertSlice)]
    # the training callback's own collectors: Linears by their forward hooks, experts by the tokens routed to them
    collectors = [ActivationCollector(model, [t for t in tracked if not isinstance(t, ExpertSlice)], scorer.statistic,
                                      training_only=False)]
    blocks = find_moe_blocks(model)
    router = None
    if blocks:
        router = RouterCollector(model, blocks, slices=slices, statistic=scorer.statistic if slices else None,
                                 training_only=False)
        collectors.append(router)
    for c in collectors:
        c.register()
        c.active = True
    was_training = model.training
    model.eval()
    sums = {t.name: torch.zeros(t.weight().shape[-1], dtype=torch.float32, device=device) for t in tracked}
    tokens = dict.fromkeys(sums, 0)
    try:
        batches = _as_batches(calibration, batch_size)
        for ids in batches:
            model(input_ids=ids.to(device))
            for c in collectors:
                step_sums, step_tokens = c.pop()
                for name, value in step_sums.items():
                    sums[name].add_(value.to(device))
                    tokens[name] += step_tokens[name]
        section = router.section() if router is not None else None
    finally:
        for c in collectors:
            c.remove()
        model.train(was_training)
    if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
        raise ValueError("one-shot wanda: the calibration forward produced non-finite activations")
    meta.update(num_samples=len(batches), tokens=tokens)
    return Importance(config, meta, shapes, sums.__getitem__, weights=weights,
                      sections={"router": section} if section else None)
