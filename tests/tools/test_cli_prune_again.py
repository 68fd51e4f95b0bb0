"""`hf-weightprune prune` on a checkpoint a structured prune shrank, with the dense run's importance: the importance
is restricted to the units `sparsity.json` says were kept, and a 2:4 or another structured prune runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import tiny_llama
from hf_weightprune.tools.cli import main
from tests.helpers import train, wanda_units_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dense training output: the model and its importance with unit statistics."""
    return wanda_units_run(tmp_path_factory.mktemp("again") / "run", tiny_llama(seed=2, num_hidden_layers=4))


@pytest.mark.parametrize("first", [["--structure", "layers", "--sparsity", "0.5"],
                                   ["--structure", "neurons", "--sparsity", "0.25"]])
@pytest.mark.parametrize("second", [["--structure", "2:4"], ["--structure", "neurons", "--sparsity", "0.5"]])
def test_cli_prunes_a_structurally_pruned_checkpoint_again(run, first, second, tmp_path, capsys):
    shrunk, out = tmp_path / "shrunk", tmp_path / "again"
    assert main(["prune", str(run), "--importance", str(run), *first, "--output_dir", str(shrunk)]) == 0
    capsys.readouterr()
    assert main(["prune", str(shrunk), "--importance", str(run), *second, "--output_dir", str(out)]) == 0
    assert f"was pruned structurally ({first[1]}): using the importance of the units it kept" in capsys.readouterr().out
    after_first = json.loads((shrunk / "sparsity.json").read_text())["structured"]["config"]["after"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == after_first["num_hidden_layers"]
    if second[1] == "2:4":
        for layer in model.model.layers:
            down = layer.mlp.down_proj.weight
            assert int((down.reshape(down.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    else:
        assert model.config.intermediate_size == after_first["intermediate_size"] // 2
    x = torch.randint(3, 128, (1, 8))
    assert model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 10)


def test_an_importance_of_the_pruned_model_is_used_as_is(run, tmp_path, capsys):
    """Statistics gathered on the shrunk model itself (a recovery run) already match it: no selection."""
    shrunk = tmp_path / "shrunk"
    assert main(["prune", str(run), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.25",
                 "--output_dir", str(shrunk)]) == 0
    model = AutoModelForCausalLM.from_pretrained(shrunk)
    trainer = train(model, [ImportanceCallback(ImportanceConfig(criterion="wanda"))], tmp_path / "recovery",
                    max_steps=1)
    capsys.readouterr()
    assert main(["prune", str(shrunk), "--importance", str(tmp_path / "recovery"), "--structure", "2:4",
                 "--output_dir", str(tmp_path / "nm")]) == 0
    assert "pruned structurally" not in capsys.readouterr().out
    assert trainer.state.global_step == 1
