"""`oneshot_importance` on mixture-of-experts models: expert slices tracked like the training callback tracks them
(same names, same routed-token statistics, same router statistics), so `prune_` prunes every expert from it."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, oneshot_importance, prune_
from hf_weightprune.moe import find_expert_slices
from hf_weightprune.testing import TokenDataset, tiny_moe
from tests.helpers import training_args

ARCHS = ["mixtral", "qwen3_moe"]


def _windows(n: int = 8, seq_len: int = 8) -> torch.Tensor:
    return TokenDataset(n=n, seq_len=seq_len, vocab_size=64, seed=3).ids


def _callback_importance(model, ids, out):
    """The training callback's wanda over `ids` with lr=0: every window once, the weights never move."""
    data = TokenDataset(n=len(ids), seq_len=ids.shape[1], vocab_size=64, seed=3)
    assert torch.equal(data.ids, ids)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    args = training_args(out, max_steps=len(ids) // 2, per_device_train_batch_size=2, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    return cb.importance()


@pytest.mark.parametrize("arch", ARCHS)
def test_oneshot_wanda_expert_statistics_equal_the_callback_over_the_same_tokens(arch, tmp_path):
    ids = _windows()
    model = tiny_moe(arch, seed=4)
    one = oneshot_importance(model, "wanda", ids, batch_size=3)  # batches unlike the Trainer's: sums must not care
    trained = _callback_importance(model, ids, tmp_path)

    experts = [n for n in one.names if ".experts." in n]
    assert one.names == trained.names and len(experts) == 2 * 4 * 3  # every slice of both layers
    for name in one.names:
        assert one.meta["tokens"][name] == trained.meta["tokens"].get(name, 0), name
        torch.testing.assert_close(one.state(name), trained.state(name), rtol=1e-5, atol=1e-6, msg=name)
    # each token counted once per expert it went to (top-2); the dense layers see every token once
    for layer in (0, 1):
        routed = sum(one.meta["tokens"][f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] for e in range(4))
        assert routed == 2 * ids.numel()
    assert one.meta["tokens"]["model.layers.0.self_attn.q_proj.weight"] == ids.numel()
    # the calibration pass's router statistics, as training writes them
    a, b = one.sections["router"], trained.sections["router"]
    assert set(a) == set(b) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for block in a:
        assert a[block]["tokens"] == b[block]["tokens"] and a[block]["seen"] == b[block]["seen"] == ids.numel()
        torch.testing.assert_close(torch.tensor(a[block]["gate_mass"]), torch.tensor(b[block]["gate_mass"]),
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_prune_from_oneshot_importance_halves_every_expert_slice(arch, criterion):
    model = tiny_moe(arch, seed=5)
    calibration = _windows(n=16) if criterion == "wanda" else None
    imp = oneshot_importance(model, criterion, calibration)
    slices = find_expert_slices(model)
    assert {s.name for s in slices} <= set(imp.names)
    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    for s in slices:
        zeros = (s.weight() == 0).float().mean().item()
        assert zeros == pytest.approx(0.5), s.name
        assert report.tensors[s.name]["sparsity"] == pytest.approx(0.5)


def test_oneshot_from_calibration_frequencies_removes_the_least_routed_experts():
    """The calibration router statistics make whole-expert removal possible without training."""
    model = tiny_moe("qwen3_moe", seed=6)
    imp = oneshot_importance(model, "wanda", _windows(n=16))
    tokens = {block: stats["tokens"] for block, stats in imp.sections["router"].items()}
    report = prune_(model, imp, PruneConfig(structure="experts", sparsity=0.25), progress=False)
    assert model.config.num_experts == 3
    for block, removed in report.structured["removed"].items():
        counts = tokens[block]
        assert len(removed) == 1 and counts[removed[0]] == min(counts), block


def _one_token_importance(criterion, model, out):
    """Statistics over a single token: top-2 of 4 experts, so two experts of every layer never saw one."""
    if criterion == "oneshot-wanda":
        return oneshot_importance(model, "wanda", _windows(n=1, seq_len=1))
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    args = training_args(out, max_steps=1, per_device_train_batch_size=1, learning_rate=0.0, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=1, seq_len=1, vocab_size=64),
            callbacks=[cb]).train()
    return cb.importance()


@pytest.mark.parametrize("criterion", ["oneshot-wanda", "wanda", "sparsegpt"])
def test_an_expert_that_saw_no_token_is_refused_by_name_before_any_weight_changes(criterion, tmp_path):
    model = tiny_moe("mixtral", seed=7)
    imp = _one_token_importance(criterion, model, tmp_path)
    unrouted = [f"model.layers.{layer}.mlp.experts.{e}" for layer in (0, 1) for e in range(4)
                if imp.meta["tokens"].get(f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight", 0) == 0]
    assert len(unrouted) == 4  # two per layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (PruneConfig(sparsity=0.5), PruneConfig(structure="2:4")):
        with pytest.raises(ValueError, match="no input statistic for 4 expert.s. their router never chose") as info:
            prune_(model, imp, config, progress=False)
        message = str(info.value)
        assert "\n" not in message and all(e in message for e in unrouted[:3]) and "1 more" in message
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing touched
    # the way out the message gives: leave them dense; every other expert is pruned as asked
    regex = message.split('exclude_modules=r"')[1].split('"')[0]
    report = prune_(model, imp, PruneConfig(sparsity=0.5, exclude_modules=regex), progress=False)
    for s in find_expert_slices(model):
        expected = 0.0 if s.module_name.rsplit(".", 1)[0] in unrouted else 0.5
        assert (s.weight() == 0).float().mean().item() == pytest.approx(expected), s.name
    assert not any(n.rsplit(".", 2)[0] in unrouted for n in report.tensors)


def test_neurons_inside_an_expert_that_saw_no_token_are_refused_by_name(tmp_path):
    """Every expert loses the same number of neurons: an unseen expert's would be arbitrary, and no exclusion helps."""
    model = tiny_moe("mixtral", seed=7)
    imp = _one_token_importance("wanda", model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^wanda has no input statistic for 4 expert.s. their router never chose "
                                         r"\(model\.layers\.\d\.mlp\.experts\.\d, .*\): their scores are all zero, so "
                                         r"their masks would be arbitrary\. Prune by magnitude, or gather") as info:
        prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.5), progress=False)
    assert "\n" not in str(info.value) and "exclude_modules" not in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
