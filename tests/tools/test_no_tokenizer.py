"""A model folder saved without a tokenizer (issue 25): `AutoTokenizer` builds an empty 1-token `Qwen2Tokenizer` for a
Qwen2/Qwen3 folder instead of raising, so every command loads a tokenizer only where a vocabulary file exists
(`tools/model_io.load_tokenizer`): the pruned folder has no tokenizer files and its card does not tell users to load
one; `--eval_data`, `--search_structures` and `sweep` without one are refused in one line before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.files.pruned_files import TOKENIZER_VOCAB_FILES, has_tokenizer
from hf_weightprune.testing import train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.model_io import load_tokenizer
from hf_weightprune.tools.sweep import sweep
from tests.doc_blocks import KJV
from tests.helpers import train

TOKENIZER_NAMES = {*TOKENIZER_VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3 trained 2 steps with importance, saved without a tokenizer, as `save_pretrained` alone leaves it."""
    out = tmp_path_factory.mktemp("qwen3") / "out"
    torch_model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, max_position_embeddings=64))
    trainer = train(torch_model, [ImportanceCallback(ImportanceConfig(criterion="wanda"))], out, max_steps=2)
    trainer.save_model(str(out))
    assert not set(os.listdir(out)) & TOKENIZER_NAMES
    return out


def test_the_empty_tokenizer_this_guards_against_is_still_what_transformers_builds(run):
    # If transformers starts raising here, load_tokenizer's file check is merely redundant, not wrong.
    assert len(AutoTokenizer.from_pretrained(run)) <= 1
    assert load_tokenizer(run) is None and not has_tokenizer(run)


def test_tokenizer_config_alone_is_no_tokenizer_and_a_vocabulary_is(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
    train_tokenizer(["in the beginning was the word"] * 4, vocab_size=300).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok is not None and len(tok) > 100


def test_a_pruned_folder_of_a_tokenizerless_model_has_no_tokenizer_and_its_card_loads_none(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.25",
                 "--output_dir", str(out)]) == 0
    assert not set(os.listdir(out)) & TOKENIZER_NAMES, sorted(os.listdir(out))
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained(" in card
    assert "AutoTokenizer" not in card  # neither loaded nor imported: there is none to load (no Hub base model)


@pytest.mark.parametrize("flags, name", [(["--eval_data", str(KJV / "valid.txt")], "--eval_data"),
                                          (["--search_structures", "neurons,layers", "--target_params", "0.8",
                                            "--calibration", str(KJV / "valid.txt")], "--search_structures")])
def test_text_flags_without_a_tokenizer_are_one_line_before_any_work(run, tmp_path, capsys, flags, name):
    out = tmp_path / "pruned"
    structure = [] if name == "--search_structures" else ["--structure", "neurons", "--sparsity", "0.25"]
    assert main(["prune", str(run), "--importance", str(run), *structure, *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{name} tokenizes text with the model's tokenizer, and {run} holds none (no tokenizer.json" in err[0]
    assert not out.exists()


def test_sweep_without_a_tokenizer_is_refused_before_loading_the_model(run, tmp_path):
    with pytest.raises(ValueError, match=r"has no tokenizer \(the sweep tokenizes the data with it\)$") as e:
        sweep(Path(run), [str(run)], KJV / "valid.txt", sparsities=[0.5], output_dir=tmp_path / "s")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s" / "sweep.csv").exists()
