"""The one mask dispatch (`plan.compute_masks`), its gradual-pruning semantics, the shared validators and the one
report shape."""

import math

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, PruningReport, prune_
from hf_weightprune.matching import select_names
from hf_weightprune.prune.masks import check_nm_shapes, nm_capped_mask, nm_mask, num_to_prune
from hf_weightprune.prune.plan import compute_masks
from hf_weightprune.prune.pruner import refuse_tied
from hf_weightprune.testing import tiny_llama, tiny_phi3
from hf_weightprune.validation import check_sparsity, parse_nm
from tests.helpers import train


@pytest.fixture(scope="module")
def importances(tmp_path_factory):
    """Importance of a briefly trained tiny Phi-3, with float32 and with bfloat16 state."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_phi3(seed=21)
        cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", state_dtype=dtype))
        train(model, [cb], tmp_path_factory.mktemp(dtype), max_steps=3)
        out[dtype] = cb.importance()
    return out


def _scores(imp, previous):
    """The gradual schedule's semantics: float32 scores, already pruned weights at -inf."""
    out = {}
    for name in imp.names:
        s = imp.score(name).float()
        out[name] = s if name not in previous else s.masked_fill(~previous[name], -math.inf)
    return out


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep


def _reference(imp, cfg, sparsity, previous):
    """Brute force by full stable sorts (ties: earlier tensor, then lower flat index, pruned first)."""
    scores = _scores(imp, previous)
    if cfg.kind == "N:M":
        n, m = cfg.nm
        out = {}
        for name, s in scores.items():
            groups = s.reshape(-1, m)
            cand = torch.sort(groups, dim=1, stable=True).indices[:, : m - n]
            flat = (cand + torch.arange(groups.shape[0])[:, None] * m).reshape(-1).sort().values
            chosen = flat[torch.sort(s.reshape(-1)[flat], stable=True).indices[: num_to_prune(s.numel(), sparsity)]]
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[chosen] = False
            out[name] = keep.view_as(s)
        return out
    if cfg.scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        keep = _lowest(flat, num_to_prune(flat.numel(), sparsity))
        out, offset = {}, 0
        for name, s in scores.items():
            out[name] = keep[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out
    if cfg.scope == "layer":
        return {n: _lowest(s.reshape(-1), num_to_prune(s.numel(), sparsity)).view_as(s) for n, s in scores.items()}
    out = {}
    for name, s in scores.items():
        idx = torch.sort(s, dim=1, stable=True).indices[:, : num_to_prune(s.shape[1], sparsity)]
        out[name] = torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "cfg, steps",
    [(PruneConfig(sparsity=0.6, scope="global"), (0.2, 0.6)), (PruneConfig(sparsity=0.6, scope="layer"), (0.3, 0.6)),
     (PruneConfig(sparsity=0.5, scope="row"), (0.25, 0.5)), (PruneConfig(structure="2:4"), (0.2, 0.4, 0.5)),
     (PruneConfig(structure="2:8"), (0.5, 0.75))],
    ids=["global", "layer", "row", "2:4", "2:8"],
)
def test_gradual_masks_equal_bruteforce_and_only_shrink(importances, dtype, cfg, steps):
    """compute_masks(previous=...) reproduces the schedule's float32 `-inf` semantics, on the bf16 ranking path too."""
    imp = importances[dtype]
    assert imp.ranking(imp.names[0]).dtype == getattr(torch, dtype)
    # Start from masks the scores would not choose (as after updates from an earlier importance): 10% pruned at random
    # (within the N:M caps), so they stay pruned only because they rank -inf.
    gen = torch.Generator().manual_seed(0)
    noise = {n: torch.rand(imp.shapes[n], generator=gen) for n in imp.names}
    if cfg.kind == "N:M":
        previous = {n: nm_capped_mask(r, 0.1, *cfg.nm) for n, r in noise.items()}
    else:
        previous = {n: r >= 0.1 for n, r in noise.items()}
    for sparsity in steps:
        masks = compute_masks(imp, cfg, sparsity=sparsity, previous=previous)
        got = {name: masks(name) for name in reversed(imp.names)}  # any order
        expected = _reference(imp, cfg, sparsity, previous)
        for name in imp.names:
            assert torch.equal(got[name], expected[name]), (sparsity, name)
            if name in previous:  # masks only shrink
                assert not (got[name] & ~previous[name]).any(), name
        pruned = sum(int((~m).sum()) for m in got.values())
        numel = sum(m.numel() for m in got.values())
        if cfg.scope == "global" and cfg.kind == "unstructured":
            assert pruned == num_to_prune(numel, sparsity)
        if cfg.kind == "N:M":
            n, m = cfg.nm
            assert pruned == sum(num_to_prune(x.numel(), sparsity) for x in got.values())
            for mask in got.values():  # never more than m - n pruned in a group
                assert int((~mask).reshape(-1, m).sum(1).max()) <= m - n
        previous = got


def test_nm_at_implied_sparsity_is_the_nm_mask(importances):
    imp = importances["float32"]
    for sparsity in (None, 0.5):
        masks = compute_masks(imp, PruneConfig(structure="2:4"), sparsity=sparsity)
        for name in imp.names:
            expected = nm_mask(imp.score(name), 2, 4)
            assert torch.equal(masks(name), expected)
            assert torch.equal(nm_capped_mask(imp.score(name), 0.5, 2, 4), expected)
    with pytest.raises(ValueError, match="exceeds 0.5, the most structure '2:4' prunes"):
        compute_masks(imp, PruneConfig(structure="2:4"), sparsity=0.6)


def test_nm_capped_mask_small_case():
    # groups [4, 1, 3, 2] and [0, 5, 5, 0]: 2:4 candidates are {1, 2} and {0, 0} (flat 1, 3, 4, 7)
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 5.0, 0.0]])
    mask = nm_capped_mask(score, 3 / 8, 2, 4)  # 3 pruned: the two zeros (lower index first), then 1.0
    assert mask.tolist() == [[True, False, True, True, False, True, True, False]]
    minus_inf = score.masked_fill(torch.tensor([[True] + [False] * 7]), -math.inf)
    assert nm_capped_mask(minus_inf, 1 / 8, 2, 4).tolist() == [[False] + [True] * 7]
    with pytest.raises(ValueError, match="divisible by m=4"):
        nm_capped_mask(torch.ones(2, 6), 0.25, 2, 4)


def test_per_module_sparsity_and_unselected_names(importances):
    imp = importances["float32"]
    cfg = PruneConfig(sparsity={r".*mlp\..*": 0.5}, scope="layer", exclude_modules=["down_proj"])
    masks = compute_masks(imp, cfg)
    for name in imp.names:
        mask = masks(name)
        if "gate_up_proj" in name:
            assert mask.numel() - int(mask.sum()) == num_to_prune(mask.numel(), 0.5), name
        else:  # attention: no sparsity applies; down_proj: excluded
            assert mask is None, name


def test_bad_previous_and_names_are_refused(importances):
    imp = importances["float32"]
    name = imp.names[0]
    with pytest.raises(ValueError, match=r"previous\[.*\] must be a bool mask of the weight's shape"):
        compute_masks(imp, PruneConfig(), previous={name: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="is not tracked by the importance"):
        compute_masks(imp, PruneConfig(), ["model.layers.9.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="shrinks layers"):
        compute_masks(imp, PruneConfig(structure="neurons"))
    with pytest.raises(ValueError, match=r"sparsity must be a float in \[0, 1\); got 1.0"):
        compute_masks(imp, PruneConfig(), sparsity=1.0)


def testcheck_nm_shapes_message():
    check_nm_shapes({"a.weight": [8, 16], "b.weight": (4, 8)}, 2, 8)
    with pytest.raises(ValueError) as err:
        check_nm_shapes({"a.weight": [8, 16], "model.layers.0.mlp.down_proj.weight": [30, 65]}, 2, 4)
    assert str(err.value) == (
        "model.layers.0.mlp.down_proj.weight: in_features 65 is not a multiple of 4 (structure '2:4' prunes groups of "
        "4 consecutive input weights); exclude it (exclude_modules=[...]) or use unstructured pruning"
    )


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), True, "0.5", None])
def test_check_sparsity_refuses(value):
    with pytest.raises(ValueError, match=r"^sparsity\['x'\] must be a float in \[0, 1\); got "):
        check_sparsity("sparsity['x']", value)


def test_check_sparsity_and_parse_nm_accept():
    assert check_sparsity("sparsity", 0) == 0.0 and isinstance(check_sparsity("sparsity", 0), float)
    assert check_sparsity("sparsity", torch.tensor(0.25).item()) == 0.25
    assert parse_nm(" 2:4 ") == (2, 4)


def test_select_names_peft_rules():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.1.mlp.down_proj.weight"]
    assert select_names(names, None, None) == names
    assert select_names(names, ["down_proj"], ["layers.1.mlp.down_proj"]) == names[1:2]
    assert select_names(names, r".*\.0\..*", None) == names[:2]
    assert select_names(names, None, r".*mlp.*") == names[:1]
    with pytest.raises(ValueError, match="No tracked weight is selected for pruning"):
        select_names(names, ["o_proj"], None)


def test_refuse_tied_names_the_tied_weight():
    model = tiny_llama(tie_word_embeddings=True)
    params = {"lm_head.weight": model.lm_head.weight}
    with pytest.raises(ValueError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        refuse_tied(model, params, ["lm_head.weight"])
    refuse_tied(model, {"model.layers.0.mlp.up_proj.weight": model.model.layers[0].mlp.up_proj.weight},
                ["model.layers.0.mlp.up_proj.weight"])


def test_report_from_masks_equals_prune_report(importances):
    model = tiny_phi3(seed=21)
    imp = importances["float32"]
    report = prune_(model, imp, PruneConfig(sparsity=0.4, scope="global"), progress=False)
    params = dict(model.named_parameters())
    rebuilt = PruningReport.from_masks({n: params[n] != 0 for n in report.tensors},
                                       sum(p.numel() for p in model.parameters()), scope="global",
                                       target_sparsity=0.4, importance=imp)
    assert rebuilt.to_dict() == report.to_dict()
    assert report.global_sparsity == pytest.approx(0.4, abs=1e-4)
    with pytest.raises(ValueError, match="masks is empty"):
        PruningReport.from_masks({}, 10)


def test_lora_merge_report_measures_merged_weights(importances):
    peft = pytest.importorskip("peft")
    from hf_weightprune import merge_and_unload_sparse

    model = tiny_phi3(seed=21)
    pruned = prune_(model, importances["float32"], PruneConfig(sparsity=0.5, scope="layer"), progress=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():  # a non-zero B, so a plain merge would fill the zeros back in
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    merged, report = merge_and_unload_sparse(lora, return_report=True)
    assert isinstance(report, PruningReport) and report.tensors.keys() == pruned.tensors.keys()
    params = dict(merged.named_parameters())
    for name, info in report.tensors.items():
        assert info["sparsity"] == pytest.approx(float((params[name] == 0).float().mean())), name
        assert info["sparsity"] == pytest.approx(pruned.tensors[name]["sparsity"]), name
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)


def test_peft_modules_to_save_tracks_the_copy_that_runs(tmp_path):
    """huggingface/peft#322, #3114: with `modules_to_save`, the trained copy (`modules_to_save.default`) runs and
    survives `merge_and_unload`; it is tracked under its merged name, scored, masked, saved and described, while the
    frozen `original_module` is never touched."""
    peft = pytest.importorskip("peft")
    import json

    from safetensors.torch import load_file

    from hf_weightprune import load_importance, merge_and_unload_sparse, save_pruned

    lora = peft.get_peft_model(tiny_llama(seed=5), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                   modules_to_save=["down_proj"]))
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(lora, [cb], tmp_path / "run", max_steps=3)
    imp = cb.importance()
    down = "model.layers.0.mlp.down_proj.weight"
    assert down in imp.names and not any("original_module" in n or "modules_to_save" in n for n in imp.names)
    wrapper = lora.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    copy, original = wrapper.modules_to_save["default"].weight, wrapper.original_module.weight
    assert not torch.equal(copy, original)  # trained: the copy moved away from the frozen original
    frozen = original.detach().clone()
    report = prune_(lora, imp, PruneConfig(sparsity=0.5), progress=False)
    assert down in report.tensors
    assert float((copy == 0).float().mean()) == pytest.approx(0.5) and torch.equal(original, frozen)
    merged = merge_and_unload_sparse(lora)
    saved = merged.get_submodule("model.layers.0.mlp.down_proj").weight
    assert torch.equal(saved, copy.detach())  # the merge keeps the pruned copy
    save_pruned(merged, str(tmp_path / "pruned"), report=report)
    tensors = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    meta = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())
    for name, info in meta["tensors"].items():
        assert name in tensors, name  # sparsity.json names only tensors the checkpoint has ...
        assert float((tensors[name] == 0).float().mean()) == pytest.approx(info["sparsity"], abs=1e-6), name
    assert down in meta["tensors"]  # ... and the pruned copy is one of them
    # the importance written at train end, under the merged names, binds to the merged model
    assert load_importance(str(tmp_path / "run"), model=merged).names == imp.names
