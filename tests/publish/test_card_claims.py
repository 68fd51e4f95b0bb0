"""The card claims about speed and memory only what was measured: "What the sparsity buys" states the measured ratios
when `sparsity.json` has them, what the structure does (parameters, files) otherwise, and never that a model runs
faster or needs less memory on its own say."""

from __future__ import annotations

import json

import pytest

from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.files.pruned_files import load_sparsity
from hf_weightprune.publish.card import render_model_card
from hf_weightprune.testing import tiny_llama

UNMEASURED = ("faster", "slower", "less memory", "speed-up", "speeds up")


def _speed(decode: float, prefill: float, memory: float) -> dict:
    """A `measured.speed` section as `measure_model` writes it, with the given pruned / dense ratios."""
    dense = {"prefill_tokens_per_s": {"median": 1000.0, "min": 990.0, "max": 1010.0},
             "decode_tokens_per_s": {"median": 100.0, "min": 99.0, "max": 101.0},
             "num_parameters": 1000, "parameter_bytes": 4000, "peak_rss_bytes": 10**8}
    ratios = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "peak_rss_bytes": memory,
              "num_parameters": 0.8, "parameter_bytes": 0.8}
    pruned = {k: ({s: v * ratios[k] for s, v in dense[k].items()} if isinstance(dense[k], dict)
                  else round(dense[k] * ratios[k])) for k in dense}
    return {"device": "cpu", "device_name": "Test", "threads": 1, "torch_version": "2.9.0", "transformers_version": "5",
            "dtype": "float32", "seq_len": 64, "prompt_tokens": 8, "new_tokens": 32, "repeats": 5, "warmup": 1,
            "memory_measure": "VmHWM", "pruned": pruned, "dense": dense, "ratios": ratios}


def _buys(card: str) -> str:
    return card.split("## What the sparsity buys")[1].split("## References")[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    tiny_llama(seed=0).save_pretrained(root / "dense")
    for structure in ("neurons", "2:4", "unstructured"):
        model = tiny_llama(seed=0)
        config = PruneConfig(structure=structure, sparsity=0.5 if structure != "2:4" else None)
        report = prune_(model, oneshot_importance(model, "magnitude"), config, progress=False)
        save_pruned(model, root / structure.replace(":", "-"), report=report, baseline=root / "dense")
    return root


def test_a_measured_slowdown_is_stated_as_measured_and_nothing_says_faster(folders):
    sparsity = load_sparsity(folders / "neurons")
    sparsity["measured"]["speed"] = _speed(decode=0.95, prefill=0.97, memory=1.02)
    card = str(render_model_card(folders / "neurons", sparsity=sparsity))
    buys = _buys(card)
    # the ranges of the runs do not overlap: the ratio of the medians, with the range the runs allow
    assert ("prefill tokens/s 0.97x the dense model's, 0.95x to 0.99x across the runs; decode tokens/s 0.95x the "
            "dense model's, 0.93x to 0.97x across the runs; peak resident memory 1.02x the dense model's, one run "
            "each") in " ".join(buys.split())
    assert not any(word in card.lower() for word in UNMEASURED), buys
    files = sparsity["measured"]["weight_files"]["bytes"] / sparsity["measured"]["dense_weight_files"]["bytes"]
    count = sparsity["structured"]["num_parameters"]
    # what the structure does, from the files: fewer parameters, smaller weight files
    assert f"{count['before']:,} -> {count['after']:,} parameters; weight files {files:.2f}x" in " ".join(buys.split())
    assert files < 0.95


def test_a_structured_card_without_measured_speed_claims_none(folders):
    card = (folders / "neurons" / "README.md").read_text()
    buys = " ".join(_buys(card).split())
    assert "Its speed and memory were not measured for this card" in buys and "measure_speed=True" in buys
    assert not any(word in card.lower() for word in UNMEASURED), buys


@pytest.mark.parametrize("folder", ["2-4", "unstructured"])
def test_unstructured_and_2_4_cards_make_no_speed_claim(folders, folder):
    card = (folders / folder / "README.md").read_text()
    assert "save neither memory nor time" in " ".join(card.split())
    assert not any(word in card.lower() for word in UNMEASURED), _buys(card)
    sparsity = json.loads((folders / folder / "sparsity.json").read_text())
    sparsity["measured"]["speed"] = _speed(decode=1.0, prefill=1.01, memory=1.0)
    card = str(render_model_card(folders / folder, sparsity=sparsity))
    # the same ranges: no ratio, the difference is within the run-to-run spread
    buys = " ".join(_buys(card).split())
    assert ("decode tokens/s within the run-to-run spread of the dense model's: the ranges of 5 runs overlap, no "
            "measured difference") in buys and "tokens/s 1.00x" not in buys


def _overlapping(speed: dict) -> dict:
    """The brief's shared machine: the pruned prefill's median 1.31x the dense one's, but one slow run of the pruned
    model and one fast run of the dense model make the ranges overlap; decode stays apart."""
    speed["pruned"]["prefill_tokens_per_s"] = {"median": 1310.0, "min": 900.0, "max": 1400.0}
    speed["dense"]["prefill_tokens_per_s"] = {"median": 1000.0, "min": 950.0, "max": 1050.0}
    speed["ratios"]["prefill_tokens_per_s"] = 1.31
    return speed


def test_a_speed_ratio_inside_the_run_to_run_spread_is_said_so_not_presented_as_a_gain(folders, tmp_path):
    import shutil

    folder = tmp_path / "neurons"
    shutil.copytree(folders / "neurons", folder)
    sparsity = load_sparsity(folder)
    sparsity["measured"]["speed"] = _overlapping(_speed(decode=1.5, prefill=1.0, memory=0.9))
    (folder / "sparsity.json").write_text(json.dumps(sparsity))
    from hf_weightprune.publish.card import write_model_card

    write_model_card(folder)
    card = (folder / "README.md").read_text()
    buys = " ".join(_buys(card).split())
    assert ("prefill tokens/s within the run-to-run spread of the dense model's: the ranges of 5 runs overlap, no "
            "measured difference; decode tokens/s 1.50x the dense model's, 1.47x to 1.53x across the runs; peak "
            "resident memory 0.90x the dense model's, one run each") in buys
    assert "1.31" not in card  # the ratio of the medians inside the spread is nowhere presented
    line = next(ln for ln in card.splitlines() if ln.startswith("Measured when it was saved"))
    assert ("1,310 tokens/s (900 to 1,400) vs 1,000 tokens/s (950 to 1,050) dense (within the run-to-run spread: "
            "the ranges of 5 runs overlap, no measured difference)") in line
    assert "150 tokens/s (148 to 152) vs 100 tokens/s (99 to 101) dense (1.50x, 1.47x to 1.53x across the runs)" in line
    assert not any(word in card.lower() for word in UNMEASURED), buys
    # the recorded figures stay as measured: the card only words them
    assert load_sparsity(folder)["measured"]["speed"] == sparsity["measured"]["speed"]
