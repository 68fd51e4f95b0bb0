"""Sampled statistics of importance scores: what the callback logs and what `hf-weightprune inspect` prints.

Both sample each tensor's scores (seeded, so repeated calls agree), pool the samples, each sampled value standing
for `numel / len(sample)` values of its tensor, take one quantile of the pool (the global threshold at the pruning
target, or the median) and count what lies below it, per module type (logs) or per tensor (`inspect`). Memory stays
at one tensor's scores plus the samples, whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..matching import parse_param_name
from .importance import Importance

__all__ = ["is_raw", "layer_stats", "pooled_quantile", "sample_indices", "type_summary"]


def sample_indices(numel: int, k: int, generator: torch.Generator) -> Tensor | None:
    """
    `k` flat indices of a tensor of `numel` elements, drawn uniformly with replacement.

    Args:
        numel (`int`): elements of the tensor.
        k (`int`): values to draw.
        generator (`torch.Generator`): a CPU generator, so the sample is reproducible.

    Returns:
        `torch.LongTensor` sorted (a gather then walks the tensor in memory order), or `None` when `k >= numel`: take
        every element.
    """
    if k >= numel:
        return None
    return torch.randint(numel, (k,), generator=generator).sort().values


def pooled_quantile(samples: Sequence[Tensor], numels: Sequence[int], q: float) -> float | None:
    """
    The `q`-quantile of all the values the samples stand for: each value of `samples[i]` counts for
    `numels[i] / len(samples[i])` values of its tensor. With every element sampled it is exactly the
    `ceil(q * n)`-th smallest value (the lower median for `q = 0.5`).

    Args:
        samples (`Sequence[torch.Tensor]`): one flat sample per tensor.
        numels (`Sequence[int]`): the size of the tensor each sample was drawn from.
        q (`float`): in `[0, 1]`.

    Returns:
        `float`, or `None` when no sample holds a finite value (NaN and +-inf are left out).
    """
    values, weights = [], []
    for sample, numel in zip(samples, numels):
        sample = sample.reshape(-1)
        finite = sample[torch.isfinite(sample)]
        if finite.numel():
            values.append(finite.double())
            weights.append(torch.full((finite.numel(),), numel / sample.numel(), dtype=torch.float64))
    if not values:
        return None
    pooled = torch.cat(values)
    order = pooled.argsort(stable=True)
    cumulative = torch.cat(weights)[order].cumsum(0)
    position = torch.tensor([q * cumulative[-1].item()], dtype=torch.float64)
    return pooled[order][torch.searchsorted(cumulative, position).clamp(max=len(pooled) - 1)].item()


def draw_indices(numels: Mapping[str, int], sample_size: int, seed: int) -> dict[str, Tensor | None]:
    """A seeded sample of flat indices per tensor, `sample_size` in all, shared in proportion to the tensors' sizes
    (`None`: every element, when all of them fit in `sample_size`)."""
    gen, total = torch.Generator().manual_seed(seed), sum(numels.values())
    return {name: sample_indices(n, n if total <= sample_size else max(1, round(n * sample_size / total)), gen)
            for name, n in numels.items()}


def sampled_scores(scorer, states: Mapping[str, Tensor], weights: Mapping[str, Tensor], meta: Mapping[str, Any],
                   picks: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """The scores of the sampled elements (`picks`, see [`draw_indices`]) of each tensor, from the raw statistics.

    Args:
        scorer (`Scorer`): the criterion's scorer.
        states (`Mapping[str, Tensor]`): raw statistic per weight (this rank's).
        weights (`Mapping[str, Tensor]`): the weights, `[out, in]`.
        meta (`Mapping[str, Any]`): the accumulator's scalars (`num_samples`, `weight_sum`, `tokens`).
        picks (`Mapping[str, Tensor | None]`): flat indices per weight.

    Returns:
        `dict[str, Tensor]`: flat float32 scores on CPU; a weight with no sample yet is left out.
    """
    out = {}
    for name, weight in weights.items():
        state, idx = states[name], picks[name]
        flat_w = weight.reshape(-1) if idx is None else weight.reshape(-1)[idx.to(weight.device)]
        kwargs = {"num_samples": meta["num_samples"], "weight_sum": float(meta["weight_sum"]),
                  "tokens": int(meta["tokens"].get(name, 0))}
        try:
            if scorer.source != "activations":  # elementwise: the score of a sample is the sample's score
                flat_s = state.reshape(-1) if idx is None else state.reshape(-1)[idx.to(state.device)]
                score = scorer.score(flat_s, weight=flat_w, **kwargs)
            else:  # wanda's |W_ij| * ||x_j||, also for a Hessian (no Cholesky per log step)
                cols = torch.arange(weight.numel(), device=state.device) if idx is None else idx.to(state.device)
                score = flat_w.float().abs() * scorer.input_norms(state, **kwargs)[cols % weight.shape[-1]].to(
                    flat_w.device)
        except ValueError:  # no sample yet (gradient criteria before their first step, no tokens)
            continue
        out[name] = score.reshape(-1).float().cpu()
    return out


def type_summary(scores: Mapping[str, Tensor], numels: Mapping[str, int], target: float) -> dict[str, float]:
    """
    Per module type (`q_proj`, `down_proj`, ...), the mean score and the fraction of scores under the one threshold
    that would prune the fraction `target` of all weights: the scalars the callback logs.

    Args:
        scores (`Mapping[str, torch.Tensor]`): a flat sample of each tensor's scores, by parameter name.
        numels (`Mapping[str, int]`): the size of each tensor.
        target (`float`): the pruning target the threshold is taken at.

    Returns:
        `dict[str, float]`: `importance/<type>/mean` and `importance/<type>/frac_below`; empty without finite scores.
    """
    threshold = pooled_quantile(list(scores.values()), [numels[n] for n in scores], target)
    if threshold is None:
        return {}
    groups: dict[str, list[Tensor]] = {}
    for name, score in scores.items():
        groups.setdefault(parse_param_name(name).module_name, []).append(score.reshape(-1))
    values = {}
    for kind, parts in groups.items():
        joined = torch.cat(parts)
        values[f"importance/{kind}/mean"] = float(joined.double().mean())
        values[f"importance/{kind}/frac_below"] = float((joined < threshold).double().mean())
    return values


def layer_stats(importance: Importance, *, sample_size: int = 8192, seed: int = 0) -> list[dict[str, Any]]:
    """
    Summarises every tracked tensor of an importance: what `hf-weightprune inspect` prints and plots.

    Scores are read one tensor at a time, so memory stays at one tensor's scores plus a small sample of each.

    Args:
        importance ([`Importance`]):
            Loaded or live importance. One whose scores need the weights (`Scorer.raw_label`: `wanda`, `sparsegpt`)
            and that is not bound to a model has no scores; its raw statistics are summarised instead.
        sample_size (`int`, *optional*, defaults to 8192):
            Values drawn per tensor (uniformly, with replacement; all of them for smaller tensors) to find the global
            median. The `below_median` fraction of a larger tensor is then exact to about `0.5 / sqrt(sample_size)`.
        seed (`int`, *optional*, defaults to 0):
            Seed of that sample, so repeated calls give the same numbers.

    Returns:
        `list[dict]`: one dict per tracked tensor, in `importance.names` order, with `name` (`str`), `shape` (`str`, e.g.
        `"64x32"`), `numel` (`int`), `mean`, `std`, `min`, `max` (`float`, in the units of the criterion's score) and
        `below_median` (`float` in `[0, 1]`): the fraction of the tensor's values strictly below the median of all
        tracked values, each tensor weighted by its size. That is about the share a 50% global prune would remove
        from this tensor; 0.5 everywhere means a global prune would prune every tensor alike.

    Raises:
        `ValueError`: when `sample_size < 1` or the importance tracks no tensor.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be a positive number of values, got {sample_size}.")
    if not importance.names:
        raise ValueError("This importance tracks no tensor; there is nothing to summarise.")
    raw = is_raw(importance)
    generator = torch.Generator().manual_seed(seed)
    stats: list[dict[str, Any]] = []
    samples = []
    for name in importance.names:
        values = (importance.state(name) if raw else importance.score(name)).detach().float().reshape(-1)
        numel = values.numel()
        index = sample_indices(numel, sample_size, generator)
        samples.append(values if index is None else values[index])
        stats.append({"name": name, "shape": "x".join(map(str, importance.shapes[name])), "numel": numel,
                      "mean": values.mean().item(), "std": values.std().item() if numel > 1 else 0.0,
                      "min": values.min().item(), "max": values.max().item()})
    median = pooled_quantile(samples, [row["numel"] for row in stats], 0.5)
    for sample, row in zip(samples, stats):
        row["below_median"] = math.nan if median is None else float((sample < median).double().mean())
    return stats


def is_raw(importance: Importance) -> bool:
    """Whether [`layer_stats`] summarises the raw statistics: the scores need weights the importance is not bound to."""
    return importance.scorer.raw_label is not None and importance.weights is None
