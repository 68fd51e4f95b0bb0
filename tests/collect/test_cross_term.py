"""The dense-to-pruned cross term `C = sum (x - x~) x~^T` and `H~` from a teacher and a student on the same batch."""

import copy

import pytest
import torch

from hf_weightprune.collect.cross import CrossTermCollector, cross_sum
from hf_weightprune.prune.masks import row_mask
from hf_weightprune.testing import tiny_llama

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
         "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


def _pair():
    teacher = tiny_llama(seed=3).eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(row_mask(p.abs(), 0.5))
    return teacher, student


def _record(model, names):
    seen = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach()))
               for n in names]
    return seen, handles


def test_cross_sum_is_the_brute_force_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    want = sum(torch.outer(x[b, s] - xt[b, s], xt[b, s]) for b in range(2) for s in range(5) if mask[b, s])
    torch.testing.assert_close(cross_sum(x, xt, mask), want)
    assert not bool(cross_sum(xt, xt).any())  # equal streams: no cross term
    with pytest.raises(ValueError, match="same shape"):
        cross_sum(x, xt[:, :3])


def test_collector_equals_brute_force_with_padding_and_skips_eval_and_large_inputs():
    teacher, student = _pair()
    col = CrossTermCollector(student, teacher, NAMES, max_in_features=32)
    assert col.skipped == ["model.layers.1.mlp.down_proj"]  # in_features 64: its in^2 matrices are the largest
    col.register()
    dense, h1 = _record(teacher, NAMES)
    pruned, h2 = _record(student, NAMES)
    g = torch.Generator().manual_seed(1)
    masks = []
    for _ in range(2):  # two batches, the second padded
        ids = torch.randint(3, 128, (3, 10), generator=g)
        am = torch.ones(3, 10, dtype=torch.long)
        if masks:
            am[1, 6:] = 0
            am[2, 2:] = 0
        masks.append(am.bool())
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=am)
        student(input_ids=ids, attention_mask=am)
    student.eval()  # an evaluation forward is not a training sample
    teacher(input_ids=ids, attention_mask=am)
    student(input_ids=ids, attention_mask=am)
    hs, cs, tokens = col.pop()
    col.remove()
    for h in h1 + h2:
        h.remove()
    assert sorted(hs) == sorted(NAMES[:4])
    assert hs[NAMES[0]] is hs[NAMES[1]] is hs[NAMES[2]]  # q/k/v: one input, one pair of sums
    for name in NAMES[:4]:
        X = torch.cat([dense[name][i][masks[i]] for i in range(2)]).double()
        Xt = torch.cat([pruned[name][i][masks[i]] for i in range(2)]).double()
        assert tokens[name] == X.shape[0] == 30 + 18
        torch.testing.assert_close(hs[name].double(), Xt.T @ Xt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cs[name].double(), (X - Xt).T @ Xt, rtol=1e-5, atol=1e-5)
        # The first layer's inputs are the embeddings, the same in both models; later ones differ.
        assert (float(cs[name].abs().max()) > 1e-3) == (name == NAMES[3])
    assert col.pop()[0] == {}


def test_student_without_a_teacher_forward_adds_nothing_and_bad_names_are_refused():
    teacher, student = _pair()
    col = CrossTermCollector(student, teacher, NAMES[:1])
    col.register()
    student(input_ids=torch.randint(3, 128, (2, 8)))
    assert col.pop()[0] == {}
    col.remove()
    with pytest.raises(ValueError, match="not an nn.Linear"):
        CrossTermCollector(student, teacher, ["model.layers.0.mlp"])
