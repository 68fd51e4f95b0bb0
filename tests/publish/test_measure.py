"""The measured cost of a pruned checkpoint (publish/measure.py): the figures are plumbed from the files and the runs
into `sparsity.json` and the card, and agree with each other. Whether pruning is fast is the benchmarks' business: no
speed is asserted here, only that what is stated was measured and is consistent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel, LlamaModel

from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.files.pruned_files import load_sparsity
from hf_weightprune.files.safetensors_io import read_header
from hf_weightprune.publish.measure import check_measure_inputs, measure_model, weight_files
from hf_weightprune.testing import TINY, tiny_llama

SPEEDS = ("prefill_tokens_per_s", "decode_tokens_per_s")
SIZES = ("num_parameters", "parameter_bytes", "peak_rss_bytes")


def _pruned(structure: str = "neurons", sparsity: float = 0.5):
    model = tiny_llama(seed=0)
    config = PruneConfig(structure=structure, sparsity=sparsity)
    return model, prune_(model, oneshot_importance(model, "magnitude"), config, progress=False)


def _weights_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A dense checkpoint, and its neurons-pruned copy saved with `measure_speed=True` beside it."""
    root = tmp_path_factory.mktemp("measure")
    tiny_llama(seed=0).save_pretrained(root / "dense")
    model, report = _pruned()
    save_pruned(model, root / "pruned", report=report, measure_speed=True, baseline=root / "dense")
    return root


def test_every_figure_is_there_positive_and_the_ratios_are_its_quotients(measured):
    speed = load_sparsity(measured / "pruned")["measured"]["speed"]
    assert speed["device"] == "cpu" and speed["threads"] >= 1 and speed["torch_version"] and speed["repeats"] == 5
    assert speed["memory_measure"] == "VmHWM" and speed["dtype"] == "float32"
    # the defaults, capped by the tiny model's 64 positions
    assert (speed["seq_len"], speed["new_tokens"]) == (64, 32)
    for side in ("pruned", "dense"):
        figures = speed[side]
        for key in SPEEDS:
            spread = figures[key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (side, key, spread)
        for key in SIZES:
            assert isinstance(figures[key], int) and figures[key] > 0, (side, key)
    for key in SPEEDS:
        assert speed["ratios"][key] == pytest.approx(speed["pruned"][key]["median"] / speed["dense"][key]["median"])
    for key in SIZES:
        assert speed["ratios"][key] == pytest.approx(speed["pruned"][key] / speed["dense"][key])


def test_parameters_are_those_of_the_written_files(measured):
    """The speed was measured on the checkpoint written, not on another model: its parameter count is the files'."""
    payload = load_sparsity(measured / "pruned")
    for side, folder in (("pruned", measured / "pruned"), ("dense", measured / "dense")):
        header = read_header(folder / "model.safetensors")
        stored = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        assert payload["measured"]["speed"][side]["num_parameters"] == stored, side
        assert payload["measured"]["speed"][side]["parameter_bytes"] == 4 * stored, side  # float32
    assert payload["measured"]["speed"]["pruned"]["num_parameters"] == payload["structured"]["num_parameters"]["after"]


def test_file_sizes_are_the_weight_files_on_disk(measured):
    payload = load_sparsity(measured / "pruned")
    section, count = payload["measured"], payload["structured"]["num_parameters"]
    assert section["weight_files"] == {"bytes": _weights_on_disk(measured / "pruned"), "dtype": "float32",
                                       "num_parameters": count["after"]}
    assert section["dense_weight_files"] == {"bytes": _weights_on_disk(measured / "dense"), "dtype": "float32",
                                             "num_parameters": count["before"]}
    assert section["weight_files"]["bytes"] < section["dense_weight_files"]["bytes"]  # neurons really removed
    assert weight_files(measured / "dense") == section["dense_weight_files"]


def test_the_section_round_trips_and_the_card_states_it(measured):
    text = (measured / "pruned" / "sparsity.json").read_text()
    section = load_sparsity(measured / "pruned")["measured"]
    assert json.loads(text)["measured"] == section
    speed, files = section["speed"], section["weight_files"]
    card = (measured / "pruned" / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("Measured when it was saved"))
    assert f"{speed['device_name']} CPU, {speed['threads']} thread" in line
    for key in SPEEDS:
        pruned, dense = (f"{speed[side][key]['median']:,.0f} tokens/s ({speed[side][key]['min']:,.0f} to "
                         f"{speed[side][key]['max']:,.0f})" for side in ("pruned", "dense"))
        # the medians with the range of the runs (the machine may be shared), and their ratio with the range the runs
        # allow; no ratio where the two ranges overlap (the difference is within the run-to-run spread)
        p, d = speed["pruned"][key], speed["dense"][key]
        if p["min"] <= d["max"] and d["min"] <= p["max"]:
            words = f"within the run-to-run spread: the ranges of {speed['repeats']} runs overlap, no measured difference"
        else:
            words = (f"{speed['ratios'][key]:.2f}x, {p['min'] / d['max']:.2f}x to {p['max'] / d['min']:.2f}x across "
                     "the runs")
        assert f"{pruned} vs {dense} dense ({words})" in line
    assert f"median (range) of {speed['repeats']} runs alternating with the dense model" in line
    rss = speed["pruned"]["peak_rss_bytes"], speed["dense"]["peak_rss_bytes"]
    assert (f"{rss[0] / 1e6:,.2f} MB vs {rss[1] / 1e6:,.2f} MB dense ({rss[0] / rss[1]:.2f}x, one run each)" in line
            and "(VmHWM)" in line)
    dense_bytes = section["dense_weight_files"]["bytes"]
    assert (f"Weight files: {files['bytes'] / 1e6:,.2f} MB vs {dense_bytes / 1e6:,.2f} MB dense "
            f"({files['bytes'] / dense_bytes:.2f}x)") in line


def test_without_measure_speed_only_the_file_size_and_no_speed_line(measured, tmp_path):
    model, report = _pruned("unstructured", 0.5)
    save_pruned(model, tmp_path / "unstructured", report=report, baseline=measured / "dense")
    section = load_sparsity(tmp_path / "unstructured")["measured"]
    assert section["speed"] is None
    # the zeros are stored: the same bytes as the dense checkpoint's, and the card says so
    assert section["weight_files"]["bytes"] == section["dense_weight_files"]["bytes"] == _weights_on_disk(
        measured / "dense")
    card = (tmp_path / "unstructured" / "README.md").read_text()
    assert "tokens/s" not in card and "Measured" not in card
    assert "the same as the dense checkpoint's (the zeros are stored)" in card
    model, report = _pruned()
    save_pruned(model, tmp_path / "alone", report=report)
    section = load_sparsity(tmp_path / "alone")["measured"]
    assert section == {"weight_files": weight_files(tmp_path / "alone"), "dense_weight_files": None, "speed": None}
    card = (tmp_path / "alone" / "README.md").read_text()
    assert f"Weight files: {section['weight_files']['bytes'] / 1e6:,.2f} MB." in card and "tokens/s" not in card


def test_measure_model_of_a_module_without_baseline(measured):
    model, _ = _pruned("heads", 0.5)
    model.train()
    out = measure_model(model, repeats=1, warmup=0, seq_len=16, new_tokens=4, threads=1)
    assert out["dense"] is None and out["ratios"] is None and out["threads"] == 1
    assert (out["seq_len"], out["new_tokens"], out["repeats"]) == (16, 4, 1)
    assert out["pruned"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert out["pruned"]["peak_rss_bytes"] > 0 and out["pruned"]["decode_tokens_per_s"]["median"] > 0
    assert model.training  # measured in eval mode, its mode restored


@pytest.mark.parametrize("kwargs,match", [
    ({"repeats": 0}, r"repeats must be an int >= 1; got 0"),
    ({"repeats": 2.5}, r"repeats must be an int >= 1"),
    ({"warmup": -1}, r"warmup must be an int >= 0"),
    ({"seq_len": 65}, r"exceeds the model's 64 positions"),
    ({"new_tokens": 0}, r"new_tokens must be an int >= 1"),
])
def test_bad_counts_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        check_measure_inputs(tiny_llama(), **kwargs)
    assert "\n" not in str(e.value)


def test_bad_baselines_are_one_line_before_any_work(measured, tmp_path):
    other_vocab = tmp_path / "other_vocab"
    tiny_llama(vocab_size=2 * TINY["vocab_size"]).save_pretrained(other_vocab)
    base_model = tmp_path / "base_model"
    LlamaModel(tiny_llama().config).save_pretrained(base_model)
    bert = BertModel(BertConfig(vocab_size=TINY["vocab_size"], hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    cases = [(other_vocab, "baseline has a vocabulary of 256, the model 128"),
             (base_model, r"baseline .*base_model is not a causal LM \(architectures \['LlamaModel'\]"),
             (bert, "baseline is a BertModel, not a causal LM"),
             (tmp_path / "missing", "is not a local model folder")]
    for baseline, match in cases:
        model, report = _pruned()
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            save_pruned(model, tmp_path / "out", report=report, measure_speed=True, baseline=baseline)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists(), baseline  # refused before anything was written
    with pytest.raises(ValueError, match="the model is torch.float32 on cpu, the baseline torch.bfloat16 on cpu"):
        save_pruned(model, tmp_path / "out", report=report, measure_speed=True, baseline=tiny_llama().bfloat16())
    with pytest.raises(ValueError, match="only used by measure_speed=True"):
        save_pruned(model, tmp_path / "out", report=report, baseline=tiny_llama())
    with pytest.raises(TypeError, match="measure_speed must be a bool"):
        save_pruned(model, tmp_path / "out", report=report, measure_speed="yes")
    assert not (tmp_path / "out").exists()
