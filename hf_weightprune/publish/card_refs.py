"""The References and the Hub tags of a pruned model's card: the papers of the methods its `sparsity.json` records,
listed exactly when the card's text names or uses the method, and tags that say what was done (a card cites and tags
what its model was made with, nothing else)."""

from __future__ import annotations

from . import card_text as T
from .card_schedule import schedule_context

OBS_REFERENCE = "SparseGPT (OBS reconstruction): Frantar & Alistarh 2023, [arXiv:2301.00774](https://arxiv.org/abs/2301.00774)"
EXPERTS_REFERENCE = ("whole experts removed by routing frequency: Lu et al. 2024, \"Not All Experts are Equal\", "
                     "[arXiv:2402.14800](https://arxiv.org/abs/2402.14800)")
OWL_REFERENCE = "OWL (outlier-weighted layerwise sparsity): Yin et al. 2023, [arXiv:2310.05175](https://arxiv.org/abs/2310.05175)"
GRADUAL_REFERENCE = "Gradual pruning (cubic schedule): Zhu & Gupta 2017, [arXiv:1710.01878](https://arxiv.org/abs/1710.01878)"
DEPTH_REFERENCE = "Layer removal by block influence (ShortGPT): Men et al. 2024, [arXiv:2403.03853](https://arxiv.org/abs/2403.03853)"
MEAN_REFERENCE = "Mean-activation bias compensation of the removed units (FLAP): An et al. 2024, [arXiv:2312.11983](https://arxiv.org/abs/2312.11983)"
REFIT_REFERENCE = "Least-squares re-fit of the pruned units' consumers (structured OBS, SlimGPT): Ling et al. 2024, [arXiv:2412.18110](https://arxiv.org/abs/2412.18110)"
SEARCH_REFERENCE = ("Candidate shapes ranked by their loss (Minitron): Muralidharan et al. 2024, "
                    "[arXiv:2407.14679](https://arxiv.org/abs/2407.14679)")
DISTILL_REFERENCE = "Knowledge distillation: Hinton et al. 2015, [arXiv:1503.02531](https://arxiv.org/abs/1503.02531)"
SQUAREHEAD_REFERENCE = "SquareHead distillation: Kurtic et al. 2023, [arXiv:2310.06927](https://arxiv.org/abs/2310.06927)"
# The asymmetric (dense-to-pruned) objective of `PruneSchedule(cross_term=True)`, from the cross term
GPTAQ_REFERENCE = ("Asymmetric calibration against the dense model's outputs (GPTAQ): Li et al. 2025, "
                   "[arXiv:2504.02692](https://arxiv.org/abs/2504.02692)")
QEP_REFERENCE = ("Error propagation with a tunable strength alpha (QEP): Arai & Ichikawa 2025, "
                 "[arXiv:2504.09629](https://arxiv.org/abs/2504.09629)")


# One tag per kind of unit a structured prune removed (only the axes whose size changed).
_UNIT_TAGS = {"neurons": "neuron-pruning", "heads": "attention-head-pruning", "hidden": "hidden-channel-pruning",
              "layers": "depth-pruning", "experts": "expert-pruning"}


def ranked_by_criterion(sparsity: dict) -> bool:
    """Whether the criterion's scores chose what was removed: unit statistics rank structured units and routing
    statistics whole experts; the criterion's statistic may then still have served a re-fit or a reconstruction."""
    return sparsity.get("structure") != "experts" and not T.unit_ranking_text(sparsity.get("structured"))


def tags(sparsity: dict, criterion: str | None, structure_tag: str) -> list[str]:
    """The card's Hub tags: the library's, then what was done and nothing more.

    Unstructured and N:M sparsity: `sparsity`, the structure's tag and the criterion that chose the zeros. A
    structured prune (which leaves a smaller dense model, no zeros): `structured-pruning`, one tag per kind of unit
    it removed, and what ranked those units: the criterion only when its scores did (a `sparsegpt` importance that
    ranked nothing, its Hessians only re-fitting the consumers, is no tag), else the unit statistic, block influence
    or routing frequency.

    Args:
        sparsity (`dict`): the content of `sparsity.json`.
        criterion (`str`, *optional*): the recorded criterion (`None` or `"unknown"` when not recorded).
        structure_tag (`str`): the structure's tag from `card.structure_info` (`"unstructured-sparsity"`, `"2:4-sparsity"`).

    Returns:
        `list[str]`: the tags, without repeats.
    """
    criterion_tag = [criterion.replace("_", "-")] if criterion and criterion != "unknown" else []
    structure = str(sparsity.get("structure") or "")
    if structure == "unstructured" or ":" in structure:
        return list(dict.fromkeys(["pruned", "hf-weightprune", "sparsity", structure_tag, *criterion_tag]))
    structured = sparsity.get("structured")
    changed = T.changed_axes(structured, structure)
    units = [_UNIT_TAGS[p] for p in changed.split(",") if p in _UNIT_TAGS]
    if structure == "experts":
        ranked = ["routing-frequency"]  # the tokens the router sent each expert, whatever the criterion
    else:
        ranked = criterion_tag if ranked_by_criterion(sparsity) else T.unit_rankers(structured, changed)
    return list(dict.fromkeys(["pruned", "hf-weightprune", "structured-pruning", *units, *ranked]))


def references(criterion: str | None, sparsity: dict) -> list[str]:
    """The papers of the methods this model was made with, in the order they were applied."""
    refs = []
    # the criterion's paper only when its scores chose what went (the criterion's own statistic may still be cited
    # below, e.g. OBS)
    paper = T.criterion_text(criterion)[1] if ranked_by_criterion(sparsity) else None
    if paper and "2301.00774" in paper:  # sparsegpt: its saliency and its reconstruction are one paper
        refs.append(OBS_REFERENCE)
    elif paper:
        refs.append(f"`{criterion}` criterion: {_linked(paper)}")
    if sparsity.get("reconstruction") == "OBS":
        refs.append(OBS_REFERENCE)
    if sparsity.get("structure") == "experts":
        refs.append(EXPERTS_REFERENCE)
    parts = str(sparsity.get("structure") or "").split(",")
    depth = ((sparsity.get("structured") or {}).get("axes") or {}).get("layers") or {}
    if "layers" in parts and not (depth and depth.get("before") == depth.get("after")):  # a layer was removed
        refs.append(DEPTH_REFERENCE)
    compensation = (sparsity.get("structured") or {}).get("compensation")
    if compensation in ("refit", "refit,mean"):
        refs.append(REFIT_REFERENCE)
    if compensation in ("mean", "refit,mean"):
        refs.append(MEAN_REFERENCE)
    if sparsity.get("search"):
        refs.append(SEARCH_REFERENCE)
    if sparsity.get("allocation") == "owl":
        refs.append(OWL_REFERENCE)
    schedule = sparsity.get("schedule")
    if isinstance(schedule, dict) and schedule.get("mode") != "hold":
        refs.append(GRADUAL_REFERENCE)
    # exactly when the Schedule line (a run's own cross term) or the OBS line (PruneConfig(cross_alpha=...)) names them
    if (schedule_context(sparsity) or {}).get("cross_term") or T.offline_cross_context(sparsity):
        refs.extend([GPTAQ_REFERENCE, QEP_REFERENCE])
    distillation = sparsity.get("distillation")
    if isinstance(distillation, dict):
        refs.append(DISTILL_REFERENCE)
        if float(distillation.get("hidden_weight") or 0.0) > 0:
            refs.append(SQUAREHEAD_REFERENCE)
    return list(dict.fromkeys(refs))


def _linked(paper: str) -> str:
    """`"Sun et al. 2023, arXiv:2306.11695"` with the arXiv id as a link."""
    head, sep, arxiv = paper.rpartition("arXiv:")
    return f"{head}[arXiv:{arxiv}](https://arxiv.org/abs/{arxiv})" if sep else paper
