"""The Phi-3 example's structured recipe, as a user runs it: unit statistics during the fine-tune, `prune_` with a
structure, a parameter budget and the least-squares refit, recovery distilled from the dense teacher (logits only),
a smaller checkpoint that stock transformers reloads and generates with, with and without the KV cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune.files.pruned_files import load_sparsity

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_phi3_with_pruning.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.parametrize("round_to", [None, 0])  # the example's default (64), and any width
def test_structured_recipe_gives_a_smaller_stock_checkpoint_distilled_from_the_dense_model(tmp_path, capsys, round_to):
    _example().main(["--recipe", "structured", "--target_params", "0.8", "--max_steps", "8", "--eval_windows", "2",
                     "--no_dense_control", "--output_dir", str(tmp_path),
                     *([] if round_to is None else ["--round_to", str(round_to)])])
    out = capsys.readouterr().out
    assert "structured prune (layers,neurons) after 2 steps" in out
    assert "reloaded with stock transformers, greedy with and without cache" in out
    assert "distill/kl" in out and "distill/hidden" not in out  # logits only: the hidden shapes differ
    assert "measured beside the dense model: prefill " in out

    folder = tmp_path / "pruned"
    info = load_sparsity(folder)
    s = info["structured"]
    assert s["structure"] == "layers,neurons" and s["compensation"] == "refit"
    before, after = s["num_parameters"]["before"], s["num_parameters"]["after"]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense-at-pruning")
    assert before == dense.num_parameters() and s["target_params"] == round(0.8 * before)
    config = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    neuron = 3 * config["hidden_size"]  # a gate row, an up row and a down column
    if round_to is None:  # the default --round_to 64: the MLP width moves by 64 neurons per layer
        assert s["round_to"] == 64 and config["intermediate_size"] % 64 == 0
        assert abs(after - s["target_params"]) <= 64 * neuron * config["num_hidden_layers"] / 2  # the nearest step
        assert "kept a multiple of 64 (`round_to`: MLP intermediate size " in card
    else:
        assert s["round_to"] is None and "round_to" not in card
        assert abs(after - s["target_params"]) <= neuron * config["num_hidden_layers"]  # one neuron per layer
    assert info["distillation"]["hidden_weight"] == 0.0 and info["distillation"]["teacher"].endswith("dense-at-pruning")

    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert stock.config.intermediate_size == config["intermediate_size"]
    assert stock.num_parameters() == after < 0.81 * before
    assert config["intermediate_size"] < dense.config.intermediate_size
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        greedy = [stock.generate(ids, max_new_tokens=6, do_sample=False, use_cache=c, pad_token_id=0)
                  for c in (True, False)]
    assert greedy[0].shape == (1, 11) and torch.equal(*greedy)
    assert "re-fitted by least squares" in card and "`dense-at-pruning` as teacher" in card
    # measured beside the dense model at pruning, and the card states those figures, no unmeasured claim
    measured = info["measured"]
    assert measured["dense_weight_files"]["bytes"] > measured["weight_files"]["bytes"]
    ratios = measured["speed"]["ratios"]
    assert ratios["num_parameters"] == after / before
    assert "Measured when it was saved" in card and "alternating with the dense model" in card
    buys = " ".join(card.split("## What the sparsity buys")[1].split())
    # a ratio where the runs' ranges are apart, else "within the run-to-run spread" (tests/publish/test_card_claims.py)
    from hf_weightprune.publish.card_measured import ratio_words

    words = ratio_words(measured["speed"], "decode_tokens_per_s", "the dense model's")
    assert f"decode tokens/s {words}" in buys
    assert "faster" not in card and "less memory" not in card
    # the budget removed neurons only: the card says what was removed, not what the structure allowed
    assert config["num_hidden_layers"] == dense.config.num_hidden_layers
    assert "removed whole MLP neurons:" in buys and "decoder layers" not in buys
    assert "- **Structure**: structured pruning of MLP neurons: whole MLP neurons are removed (decoder layers" in card
    assert "# pruned (structured pruning of MLP neurons)" in card
    assert "pruned in one shot, then fine-tuned with distillation" in card  # the recovery, not only its teacher
    assert "MLP intermediate size 512 -> " in card
