"""One-shot baselines: importance from a trained model as it is, with no training run.

`magnitude` reads `|W|`; `wanda` forwards a few calibration windows through the callback's own forward-hook
collector (`activations.ActivationCollector`: real tokens only, q/k/v inputs reduced once). Both return the [`Importance`] type that
`ImportanceCallback.importance()` and `load_importance()` return, so `prune_` and the sweep treat trained and
one-shot importance alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..collect.activations import ActivationCollector
from ..collect.importance import Importance
from ..config import ImportanceConfig
from ..matching import find_tracked_weights
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
        target_modules / exclude_modules (*optional*): which Linear weights, with peft's rules.
        batch_size (`int`, *optional*, defaults to 8): windows per calibration forward.

    Scores are derived lazily from the weights the importance is bound to (the model given here, or the one
    passed to `bind` / `prune_`), so they always describe the weights being pruned.
    """
    if criterion not in ONESHOT_CRITERIA:
        raise ValueError(f"one-shot criterion must be one of {ONESHOT_CRITERIA}; got {criterion!r}")
    config = ImportanceConfig(criterion=criterion, target_modules=target_modules, exclude_modules=exclude_modules)
    tracked = find_tracked_weights(model, target_modules, exclude_modules)
    shapes = {t.name: list(t.param.shape) for t in tracked}
    weights = {t.name: t.param for t in tracked}
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
    collector = ActivationCollector(model, tracked, scorer.statistic, training_only=False)
    collector.register()
    collector.active = True
    was_training = model.training
    model.eval()
    sums = {t.name: torch.zeros(t.param.shape[-1], dtype=torch.float32, device=device) for t in tracked}
    tokens = dict.fromkeys(sums, 0)
    try:
        batches = _as_batches(calibration, batch_size)
        for ids in batches:
            model(input_ids=ids.to(device))
            step_sums, step_tokens = collector.pop()
            for name, value in step_sums.items():
                sums[name].add_(value.to(device))
                tokens[name] += step_tokens[name]
    finally:
        collector.remove()
        model.train(was_training)
    if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
        raise ValueError("one-shot wanda: the calibration forward produced non-finite activations")
    meta.update(num_samples=len(batches), tokens=tokens)
    return Importance(config, meta, shapes, sums.__getitem__, weights=weights)
