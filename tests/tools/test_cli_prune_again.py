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


def test_a_re_pruned_model_records_its_chain_and_its_card_names_its_input(run, tmp_path, capsys):
    """neurons, neurons again (CLI, in memory), then 2:4 (CLI, file to file), then neurons from Python: every output
    records the prunes before it, and its card names the input as pruned, with both shares and true statistics."""
    from hf_weightprune import load_importance, prune_, save_pruned
    from hf_weightprune.config import PruneConfig
    from hf_weightprune.publish.hub import _hub_sparsity

    first, second, nm, py = (tmp_path / n for n in ("first", "second", "nm", "py"))
    assert main(["prune", str(run), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.25",
                 "--output_dir", str(first)]) == 0
    assert main(["prune", str(first), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.25",
                 "--output_dir", str(second)]) == 0
    assert json.loads((first / "sparsity.json").read_text())["earlier_prunes"] is None
    record = json.loads((second / "sparsity.json").read_text())
    (earlier,) = record["earlier_prunes"]
    dense, mid = earlier["num_parameters"]["before"], earlier["num_parameters"]["after"]
    after = record["structured"]["num_parameters"]["after"]
    assert dense == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(run).parameters())
    assert record["structured"]["num_parameters"]["before"] == mid > after
    assert earlier["folder"] == "../first" and earlier["structure"] == "neurons"
    assert earlier["config"]["after"]["intermediate_size"] == record["structured"]["config"]["before"]["intermediate_size"]
    assert record["importance"]["path"].endswith("/run/importance") and record["importance"]["cut_to_kept_units"]
    card = (second / "README.md").read_text()
    intro = card.split("## Method")[0]
    assert " dense (" not in intro and "dense checkpoint" not in intro  # what the input was called
    assert f"{100 * (1 - after / mid):.2f}% of the input model's parameters are removed, " \
           f"{100 * (1 - after / dense):.2f}% of the original dense model's {dense:,}" in card
    assert f"itself pruned from a dense model whose name is not recorded (MLP neurons removed, {dense:,} -> {mid:,}" \
           in card
    assert "while the model the input was pruned from trained" in card and "cut to the weights and units" in card
    assert " for the input model (" in card  # the weight files beside the input's, not a "dense" one

    capsys.readouterr()
    assert main(["prune", str(second), "--importance", str(run), "--structure", "2:4", "--output_dir", str(nm)]) == 0
    # the dense statistics are cut through both structured prunes, not sliced by the last one's indices alone
    assert "using the importance of the units it kept, through 1 earlier prune(s)" in capsys.readouterr().out
    importance = load_importance(run)
    for folder in (first, second):
        importance = importance.select(json.loads((folder / "sparsity.json").read_text()))
    expected = AutoModelForCausalLM.from_pretrained(second)
    prune_(expected, importance, PruneConfig(structure="2:4"), progress=False)
    got = AutoModelForCausalLM.from_pretrained(nm).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    chain = json.loads((nm / "sparsity.json").read_text())["earlier_prunes"]
    assert [e["folder"] for e in chain] == ["../first", "../second"]
    assert [e["num_parameters"] for e in chain] == [{"before": dense, "after": mid}, {"before": mid, "after": after}]
    card = (nm / "README.md").read_text()
    assert "of all parameters of the input model" in card and f"it had {after:,} of the original dense model's" in card
    hub = _hub_sparsity(json.loads((nm / "sparsity.json").read_text()), importance_uploaded=False)
    assert [e["folder"] for e in hub["earlier_prunes"]] == ["first", "second"]

    # the Python path: the model loaded from a pruned folder, the dense importance cut by the user
    model = AutoModelForCausalLM.from_pretrained(nm)
    report = prune_(model, importance, PruneConfig(structure="neurons", sparsity=0.5))
    save_pruned(model, py, report=report, baseline=run)  # the weight files beside the original dense model's
    chain = json.loads((py / "sparsity.json").read_text())["earlier_prunes"]
    assert " MB for the original dense model (" in (py / "README.md").read_text()
    assert [e["structure"] for e in chain] == ["neurons", "neurons", "2:4"] and chain[-1]["folder"] == "../nm"
    assert chain[-1]["num_parameters"] == {"before": after, "after": after}  # zeros remove no parameter


def test_the_chain_says_an_earlier_prune_was_fine_tuned_with_distillation(run, tmp_path):
    """A structured prune recovered with distillation (the README's recipe), then pruned again: the input model is not
    the one-shot prune its `earlier_prunes` entry describes, and the card says what else was done to it."""
    from hf_weightprune import DistillConfig, ImportanceCallback, load_importance, prune_, save_pruned
    from hf_weightprune.config import PruneConfig

    model = AutoModelForCausalLM.from_pretrained(run)
    report = prune_(model, load_importance(run), PruneConfig(structure="neurons", sparsity=0.25), progress=False)
    distill = DistillConfig(teacher=str(run), alpha=0.5)
    recovery = ImportanceCallback(distill=distill)
    train(model, [recovery], tmp_path / "recovery", max_steps=2)
    record = recovery.training_record()
    save_pruned(model, tmp_path / "final", report=report, distillation=distill, training=record)
    assert main(["prune", str(tmp_path / "final"), "--importance", str(run), "--structure", "2:4",
                 "--output_dir", str(tmp_path / "nm")]) == 0
    (earlier,) = json.loads((tmp_path / "nm" / "sparsity.json").read_text())["earlier_prunes"]
    assert earlier["training"] == record and record["steps"] == 2 and record["tokens"] > 0
    assert earlier["distilled"] is True and earlier["schedule_mode"] is None
    card = (tmp_path / "nm" / "README.md").read_text()
    assert (f"MLP neurons removed, {earlier['num_parameters']['before']:,} -> {earlier['num_parameters']['after']:,} "
            f"parameters, then fine-tuned 2 optimizer steps ({record['tokens']:,} training tokens) with distillation)"
            in card)


@pytest.mark.parametrize("mode, training, distilled, words", [
    ("prune", {"steps": 20, "tokens": 640}, True, ", during fine-tuning of 20 optimizer steps (640 training tokens) "
                                                  "with distillation"),
    ("hold", {"steps": 3, "tokens": 96}, False, ", then fine-tuned 3 optimizer steps (96 training tokens) with its "
                                                "mask held"),
    ("hold", None, True, ", then fine-tuned with its mask held and with distillation"),
    (None, None, False, ""),  # a one-shot prune, or a file written before the training was recorded
])
def test_the_chain_names_each_earlier_prunes_training(mode, training, distilled, words):
    from hf_weightprune.publish.card_lineage import lineage_context

    entry = {"structure": "2:4", "global_sparsity": 0.5, "num_parameters": {"before": 10, "after": 10}, "config": None,
             "training": training, "distilled": distilled, "schedule_mode": mode}
    steps = lineage_context({"earlier_prunes": [entry]})["steps"]
    assert steps == f"`2:4`, 50.00% of the prunable weights set to zero{words}"


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    """A dense training output with 8 query heads in 4 KV groups: two heads prunes can follow each other."""
    model = tiny_llama(seed=4, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    return wanda_units_run(tmp_path_factory.mktemp("heads") / "run", model)


def test_cli_tells_the_statistics_of_two_heads_prunes_apart(heads_run, tmp_path, capsys):
    """heads, then heads again: every size but the head counts stays, so only the KV-head count (read off k_proj in
    units of the recorded head size) says which model of the chain an importance describes. A recovery run's
    statistics of the in-between model are cut by the last prune alone; the dense statistics, for a folder that does
    not record the prunes before it, are refused in one line and nothing is written."""
    from hf_weightprune import load_importance, prune_
    from hf_weightprune.config import PruneConfig

    first, second, nm, refused = (tmp_path / n for n in ("first", "second", "nm", "refused"))
    heads = ["--structure", "heads", "--sparsity", "0.5"]
    assert main(["prune", str(heads_run), "--importance", str(heads_run), *heads, "--output_dir", str(first)]) == 0
    assert main(["prune", str(first), "--importance", str(heads_run), *heads, "--output_dir", str(second)]) == 0
    record = json.loads((second / "sparsity.json").read_text())["structured"]["config"]
    assert (record["before"]["num_key_value_heads"], record["after"]["num_key_value_heads"]) == (2, 1)
    assert record["before"]["head_dim"] == record["after"]["head_dim"] == 4

    recovery = wanda_units_run(tmp_path / "recovery", AutoModelForCausalLM.from_pretrained(first))
    capsys.readouterr()
    assert main(["prune", str(second), "--importance", str(recovery), "--structure", "2:4",
                 "--output_dir", str(nm)]) == 0
    out = capsys.readouterr().out
    assert "using the importance of the units it kept" in out and "earlier prune" not in out
    expected = AutoModelForCausalLM.from_pretrained(second)
    prune_(expected, load_importance(recovery).select(json.loads((second / "sparsity.json").read_text())),
           PruneConfig(structure="2:4"), progress=False)
    got = AutoModelForCausalLM.from_pretrained(nm).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())

    payload = json.loads((second / "sparsity.json").read_text())
    payload["earlier_prunes"] = None  # as a folder written before the chain was recorded
    (second / "sparsity.json").write_text(json.dumps(payload))
    capsys.readouterr()
    assert main(["prune", str(second), "--importance", str(heads_run), "--structure", "2:4",
                 "--output_dir", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_key_value_heads 4 (the prune's model: 2)" in err, err
    assert not refused.exists()
