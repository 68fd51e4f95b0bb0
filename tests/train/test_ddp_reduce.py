"""What a schedule's solves move between ranks under DDP: each Hessian summed onto the rank that solves its weights only
(once per distinct input: q/k/v, gate/up share one), the results broadcast in one buffer per owner, and a global
threshold from every rank's histograms of its own scores; the masks equal one process's and the weights within float
tolerance. Real `torchrun --nproc_per_node 2` launches (gloo, CPU; `multiproc`), counted by `distributed.COLLECTIVES`.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from hf_weightprune import distributed as D
from hf_weightprune.collect.activations import shared_input_candidates
from hf_weightprune.prune.global_threshold import compute_global_threshold
from tests import ddp_reduce

HISTOGRAMS = 2 * (1 << 16) * 8  # a global threshold's two int64 histograms, summed across ranks


def test_one_process_moves_nothing_and_shares_by_name():
    before = {k: dict(v) for k, v in D.COLLECTIVES.items()}
    sums = D.reduce_to_owners({"a": torch.ones(2)}, {"a": 0})
    D.broadcast_owned_([(torch.zeros(3), 0)])
    assert torch.equal(sums["a"], torch.ones(2)) and {k: dict(v) for k, v in D.COLLECTIVES.items()} == before
    shapes = {"l.0.attn.q_proj.weight": (8, 8), "l.0.attn.k_proj.weight": (8, 8), "l.0.attn.v_proj.weight": (8, 8),
              "l.0.mlp.gate_proj.weight": (8, 8), "l.0.mlp.up_proj.weight": (8, 8), "l.0.mlp.down_proj.weight": (16, 16)}
    assert shared_input_candidates(shapes) == {"l.0.attn.k_proj.weight": "l.0.attn.q_proj.weight",
                                               "l.0.attn.v_proj.weight": "l.0.attn.q_proj.weight",
                                               "l.0.mlp.up_proj.weight": "l.0.mlp.gate_proj.weight"}
    # partition(together=): one rank for a group, balanced by the group's summed cost
    owners = D.partition({"q": 3.0, "k": 3.0, "v": 3.0, "o": 5.0, "d": 4.0}, 2, together={"k": "q", "v": "q"})
    assert owners["q"] == owners["k"] == owners["v"] != owners["o"] == owners["d"]


@pytest.mark.parametrize("exchange", ["histograms", "scores"])
def test_global_threshold_from_shares_equals_the_whole(exchange):
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.randint(0, 50, (40 + i,), generator=g).float() for i in range(5)}  # many ties
    scores["t2"] = scores["t2"].bfloat16()  # another dtype: the exchange carries float32, the keys are the same
    whole = compute_global_threshold(lambda: scores.items(), 0.37)
    # Two "processes" (threads) scoring two shares of the tensors; combine sums their counts as an all-reduce would.
    shares, slots, barrier, parts = [["t0", "t3"], ["t1", "t2", "t4"]], [None, None], threading.Barrier(2), [None, None]
    moved = [[], []]  # bytes each process passed to combine
    # `sizes` (every tensor's elements) lets the processes exchange the scores when they weigh less than a histogram
    sizes = {n: s.numel() for n, s in scores.items()} if exchange == "scores" else None

    def process(r: int):
        def combine(tensors):
            moved[r].extend(t.numel() * t.element_size() for t in tensors)
            slots[r] = [t.clone() for t in tensors]
            barrier.wait()
            for i, t in enumerate(tensors):
                t.copy_(slots[0][i] + slots[1][i])
            barrier.wait()
        parts[r] = compute_global_threshold(lambda: ((n, scores[n]) for n in shares[r]), 0.37, combine=combine,
                                            order=list(scores), sizes=sizes)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert whole.ties_to_prune and any(whole.ties_to_prune.values())  # the tie sharing is exercised
    for part in parts:
        assert (part.key, part.ties_to_prune, part.num_pruned, part.total) == \
               (whole.key, whole.ties_to_prune, whole.num_pruned, whole.total)
    for r, share in enumerate(shares):
        for name in share:
            assert torch.equal(parts[r].mask(name, scores[name]), whole.mask(name, scores[name])), name
    padded = sum(n + n % 2 for n in (s.numel() for s in scores.values()))
    # the scores: 4 bytes each (every tensor padded to 8 bytes), in one exchange; else two histograms, the element
    # count and the tie counts per tensor
    assert moved[0] == moved[1] == ([4 * padded] if exchange == "scores" else [HISTOGRAMS // 2, 16, HISTOGRAMS // 2, 40])


def test_global_threshold_exchange_refuses_a_share_that_is_not_in_sizes():
    scores = {"a": torch.rand(6), "b": torch.rand(4)}
    with pytest.raises(ValueError, match="yielded 'a' \\(6 elements\\) not once as in `sizes`"):
        compute_global_threshold(lambda: scores.items(), 0.5, combine=lambda tensors: None, order=["a", "b"],
                                 sizes={"a": 5, "b": 4})


@pytest.mark.multiproc
@pytest.mark.parametrize("case", list(ddp_reduce.CASES))
def test_ddp_reduces_each_statistic_to_its_owner_and_equals_one_process(tmp_path, case):
    from tests.test_distributed import ATOL_OF_MAX, RTOL, torchrun

    torchrun("tests.ddp_reduce", str(tmp_path), case)
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # each owner's bits everywhere
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one, single = ddp_reduce.run(str(tmp_path / "single"), case, batch=4)
    assert one.keys() == r0.keys()
    for k, want in one.items():  # every update (the later ones too, on a statistic that kept accumulating) and the re-fit
        if k.startswith("mask."):
            assert torch.equal(r0[k], want), k
        else:  # the same tokens summed in another order: the tolerance of the other DDP-vs-one-process tests
            torch.testing.assert_close(r0[k], want, rtol=RTOL, atol=ATOL_OF_MAX * float(want.abs().max()), msg=k)
    solves = [r["solves"] for r in records]
    assert {n: solves[0].get(n, 0) + solves[1].get(n, 0) for n in single["solves"]} == single["solves"]
    assert all(r["num_updates"] == single["num_updates"] and r["refitted_at"] == ddp_reduce.REFIT for r in records)

    masks = [v for k, v in one.items() if k.startswith("mask.")]
    weight_bytes = sum(4 * m.numel() for m in masks)  # float32 weights
    mask_bytes = sum(m.numel() + (-m.numel() % 8) for m in masks)  # bool masks, each padded to 8 bytes
    rec = records[0]
    assert records[1]["steps"] == rec["steps"] and set(map(int, rec["steps"])) >= {ddp_reduce.REFIT}
    # Before: every update all-reduced every weight's statistic to every rank (what `cb.importance()` still does);
    # q/k/v and gate/up hold one statistic three and two times over.
    assert rec["old"]["all_reduce"] >= rec["state_bytes"] > rec["distinct_bytes"]
    cross = rec["cross_bytes"]
    if ddp_reduce.CASES[case].get("cross_term"):  # q/k/v, o and gate/up of both layers: [32, 32] float32 each
        assert cross == 2 * 3 * 32 * 32 * 4 and rec["old_cross"] >= cross
    # A checkpoint: each weight's statistic summed onto the rank that writes it, the cross term onto rank 0 (which
    # writes it); only counts all-reduced (every buffer was all-reduced to every rank before)
    assert rec["save"]["reduce"] == rec["state_bytes"] + cross and rec["save"]["all_reduce"] < 1024, rec["save"]
    # a global threshold over this tiny model's scores: exchanging them (4 bytes each) moves less than the histograms
    assert rec["score_bytes"] == 4 * sum(m.numel() for m in masks) < HISTOGRAMS
    for step, got in rec["steps"].items():
        calls, nbytes = got["calls"], got["bytes"]
        # Now: each distinct statistic summed once, onto its owner (one reduce per rank), no statistic all-reduced;
        # the cross terms likewise, onto the same owners (one more reduce per rank)
        assert calls["reduce"] == (4 if cross else 2) and nbytes["reduce"] == rec["distinct_bytes"] + cross, step
        small = rec["score_bytes"] if ddp_reduce.CASES[case]["scope"] == "global" and int(step) != ddp_reduce.REFIT else 0
        assert small <= nbytes["all_reduce"] < small + 1024, (step, nbytes)
        # The results: one broadcast per owner (was two per weight), weights and masks (a re-fit: weights only)
        refit = int(step) == ddp_reduce.REFIT
        assert calls["broadcast"] == 2 and nbytes["broadcast"] == weight_bytes + (0 if refit else mask_bytes), step
