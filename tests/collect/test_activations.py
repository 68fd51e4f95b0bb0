"""The activation hot path (`collect/activations.py`): one reduction per distinct Linear input per forward."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_weightprune.collect.activations import ActivationCollector, HookGuards
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.scorers import get_scorer
from hf_weightprune.testing import tiny_llama

# Ops that only describe a tensor (no kernel, no copy).
_METADATA = {"aten.view.default", "aten.detach.default", "aten.permute.default", "aten.split.Tensor",
             "aten.slice.Tensor", "aten.squeeze.dim", "aten.t.default", "aten._unsafe_view.default"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in _METADATA:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_forward(model, collector, batch, forwards):
    counts = []
    for active in [False] + [True] * forwards:
        collector.active = active
        with torch.no_grad(), _CountOps() as counter:
            model(**batch)
        counts.append(counter.ops)
    return [c - counts[0] for c in counts[1:]]  # what the collector added to each active forward


@pytest.mark.parametrize("criterion, reduction", [("wanda", "aten.sum.dim_IntList"), ("sparsegpt", "aten.mm.default")])
def test_one_reduction_and_one_accumulation_per_distinct_input(criterion, reduction):
    layers = 3
    model = tiny_llama(seed=0, num_hidden_layers=layers).train()
    tracked = find_tracked_weights(model)
    distinct = 4 * layers  # q/k/v share one input, o its own, gate/up one, down its own
    assert len(tracked) == 7 * layers
    statistic = get_scorer(criterion).statistic
    calls = []
    collector = ActivationCollector(model, tracked, lambda x, m: calls.append(x.shape) or statistic(x, m))
    collector.register()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0  # padding: the real rows are selected once per input, with one host synchronisation per forward
    batch = {"input_ids": torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0)),
             "attention_mask": mask}
    first, second = _ops_per_forward(model, collector, batch, forwards=2)
    assert len(calls) == 2 * distinct and all(shape[0] == 26 for shape in calls)  # 10 + 10 + 6 real tokens
    for added in (first, second):
        assert added[reduction] == distinct
        assert added["aten.index_select.default"] == distinct  # the real tokens of each input, copied once
        assert added["aten.nonzero.default"] == 1
    # The first forward keeps each group's result as its sum (no copy); the second adds into it once per group.
    assert second["aten.add_.Tensor"] - first["aten.add_.Tensor"] == distinct
    assert not any(op in first for op in ("aten.clone.default", "aten._to_copy.default"))
    sums, tokens = collector.pop()
    collector.remove()
    assert sorted(sums) == sorted(t.name for t in tracked) and set(tokens.values()) == {2 * 26}
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert sums[f"{attn}.q_proj.weight"] is sums[f"{attn}.k_proj.weight"] is sums[f"{attn}.v_proj.weight"]
        assert sums[f"{mlp}.gate_proj.weight"] is sums[f"{mlp}.up_proj.weight"]
        assert sums[f"{attn}.o_proj.weight"] is not sums[f"{attn}.q_proj.weight"]


def test_grouped_sums_equal_one_sum_per_weight():
    """The group's one sum is what each weight's own hook summed before grouping (brute force, float64)."""
    model = tiny_llama(seed=1).train()
    tracked = find_tracked_weights(model)
    reference, hooks = {}, []
    for t in tracked:
        def hook(module, inputs, output, name=t.name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[batch_mask].double()
            reference[name] = reference.get(name, 0) + (x * x).sum(0)
        hooks.append(t.module.register_forward_hook(hook))
    collector = ActivationCollector(model, tracked, get_scorer("wanda").statistic)
    collector.register()
    collector.active = True
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0
    batch_mask = mask.reshape(-1).bool()
    with torch.no_grad():
        for seed in range(2):
            model(input_ids=torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed)),
                  attention_mask=mask)
    sums, tokens = collector.pop()
    collector.remove()
    for h in hooks:
        h.remove()
    for name, ref in reference.items():
        torch.testing.assert_close(sums[name].double(), ref, rtol=1e-5, atol=1e-6)
        assert tokens[name] == 2 * 13


def test_hook_guards_are_counted_and_restore_the_setting():
    model = torch.nn.Linear(2, 2)
    saved = torch._dynamo.config.skip_nnmodule_hook_guards
    a, b = HookGuards(), HookGuards()
    try:
        a.acquire(model)
        b.acquire(model)
        a.acquire(model)  # held once per holder
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
        a.release()  # released in another order than acquired: b still holds
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
        b.release()
        b.release()
        assert torch._dynamo.config.skip_nnmodule_hook_guards is saved
    finally:
        a.release()
        b.release()
        torch._dynamo.config.skip_nnmodule_hook_guards = saved
