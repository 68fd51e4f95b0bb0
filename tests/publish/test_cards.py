"""Cards that tell the truth (issue 28): for every way to make a pruned model, the rendered card is read back and each
statement checked against the weights and `sparsity.json`: the criterion and statistics that chose the masks, the
scope and reconstruction used, the share of all parameters zeroed or removed, tokens for activation criteria, the
intro's account of when pruning happened, references for the methods used only, licence and base model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    load_sparsity,
    oneshot_importance,
    prune_,
    push_pruned_to_hub,
    save_pruned,
)
from hf_weightprune.scorers import default_scope
from hf_weightprune.testing import tiny_llama
from hf_weightprune.tools.cli import main as cli_main
from tests.helpers import train

CRITERIA = ("temporal_magnitude", "magnitude", "movement", "taylor", "fisher", "wanda", "sparsegpt")
PAPERS = {"temporal_magnitude": "2502.17071", "magnitude": "1506.02626", "movement": "2005.07683",
          "taylor": "1906.10771", "fisher": "2204.09656", "wanda": "2306.11695", "sparsegpt": "2301.00774"}
KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained 6 steps with one named callback per criterion, saved (the dense model and its card's
    front matter: licence, base model, training data) to `dense/`, and each criterion's importance."""
    root = tmp_path_factory.mktemp("cards")
    model = tiny_llama(seed=0)
    cbs = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in CRITERIA]
    train(model, cbs, root / "run", max_steps=6)
    model.save_pretrained(root / "dense")
    (root / "dense" / "README.md").write_text(
        "---\nlicense: apache-2.0\nbase_model: org/tiny-base\ndatasets:\n- org/bible\n---\n\n# A fine-tune\n")
    return root, {cb.config.criterion: cb.importance() for cb in cbs}


def _dense(root: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "dense")  # _name_or_path: the local folder


def check_card(folder: Path, *, criterion: str, scope: str, obs: bool, how: str, owl: bool = False) -> str:
    """Every statement the card makes, checked against `sparsity.json` and the weights; returns the card text."""
    text = (folder / "README.md").read_text()
    meta = load_sparsity(folder)
    card = ModelCard(text).data
    assert "unknown" not in text.lower()
    assert meta["criterion"] == criterion and meta["importance"] and meta["importance"]["criterion"] == criterion
    assert criterion.replace("_", "-") in card.tags
    assert f"**Criterion**: `{criterion}`" in text
    assert f"**Scope**: {scope} (" in text and meta["scope"] == scope
    assert ("**Weights reconstructed (OBS)**" in text) == obs and (meta["reconstruction"] == "OBS") == obs
    assert ("**Allocation**" in text) == owl and (meta["allocation"] == "owl") == owl
    # the share of ALL parameters that are zero (or removed), from the weights themselves
    weights = load_file(str(folder / "model.safetensors"))
    total = sum(t.numel() for t in weights.values())
    if meta["structured"]:
        before = meta["structured"]["num_parameters"]["before"]
        assert total == meta["structured"]["num_parameters"]["after"]
        share = 1 - total / before
        assert share > 0.05 and f"{100 * share:.2f}% of all parameters are removed" in text
        rows = re.findall(r"^\| `(\w+\.\w+)` \| \d+ \| [\d,]+ \| ([\d.]+)% \|$", text, re.M)
        assert rows and all(float(v) > 0 for _, v in rows)  # the per-module table of the structured prune
    else:
        zeros = sum(int((weights[n] == 0).sum()) for n in meta["tensors"])
        assert f"{100 * zeros / total:.2f}% of all parameters" in text
        assert f"{100 * meta['global_sparsity']:.2f}% of the prunable weights" in text
    # tokens, not snapshots, for activation criteria
    assert "snapshot" not in text
    if criterion in ("wanda", "sparsegpt"):
        tokens = meta["importance"]["tokens"]
        assert tokens and f"summed over {tokens:,} tokens" in text
    # references: the methods used, no fixed list, no table of every criterion
    refs = text.split("## References")[1] if "## References" in text else ""
    assert PAPERS[criterion] in refs
    assert ("2301.00774" in refs) == (obs or criterion == "sparsegpt")
    assert ("2310.05175" in refs) == owl
    others = [c for c in CRITERIA if c != criterion and PAPERS[c] != "2301.00774"]
    assert not any(PAPERS[c] in text for c in others), "a paper of a method not used"
    assert how in text
    return text


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_shot_card_of_each_criterion(trained, tmp_path, criterion):
    root, imps = trained
    model = _dense(root)
    report = prune_(model, imps[criterion], PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    text = check_card(tmp_path / "pruned", criterion=criterion, scope=default_scope(criterion), obs=criterion == "sparsegpt",
                      how="pruned in one shot")
    card = ModelCard(text).data
    # the base model's card: its licence, base model and training data carry over
    assert card.license == "apache-2.0" and card.base_model == "org/tiny-base" and card.datasets == ["org/bible"]
    assert "while the model trained with the Hugging Face `Trainer`" in text


def test_owl_and_global_scope_cards(trained, tmp_path):
    root, imps = trained
    model = _dense(root)
    report = prune_(model, imps["wanda"], PruneConfig(sparsity=0.5, allocation="owl"), progress=False)
    save_pruned(model, tmp_path / "owl", report=report)
    check_card(tmp_path / "owl", criterion="wanda", scope="row", obs=False, owl=True, how="pruned in one shot")
    model = _dense(root)
    report = prune_(model, imps["magnitude"], PruneConfig(sparsity=0.5, scope="global"), progress=False)
    save_pruned(model, tmp_path / "global", report=report)
    text = check_card(tmp_path / "global", criterion="magnitude", scope="global", obs=False, how="pruned in one shot")
    assert "one threshold for all prunable tensors" in text


@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_structured_card_counts_removed_parameters(trained, tmp_path, structure):
    root, imps = trained
    model = _dense(root)
    report = prune_(model, imps["magnitude"], PruneConfig(sparsity=0.5, structure=structure), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    meta = load_sparsity(tmp_path / "pruned")
    assert meta["model_sparsity"] == pytest.approx(meta["global_sparsity"]) and meta["model_sparsity"] > 0.05
    text = check_card(tmp_path / "pruned", criterion="magnitude", scope="layer", obs=False, how="pruned in one shot")
    assert "removed in every decoder layer" in text


def test_gradual_card_names_the_callbacks_criterion(tmp_path):
    model = tiny_llama(seed=0)
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=4, every_n_steps=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=schedule)
    train(model, [cb], tmp_path / "run", max_steps=6)
    save_pruned(model, tmp_path / "pruned", report=cb.pruning_report(model), schedule=schedule)
    text = check_card(tmp_path / "pruned", criterion="wanda", scope="row", obs=False, how="pruned during fine-tuning")
    assert "then pruned" not in text and "pruned in one shot" not in text
    assert "1710.01878" in text.split("## References")[1]  # the gradual schedule's paper


def test_readme_recovery_recipe_card(trained, tmp_path):
    """One-shot sparsegpt (row scope, OBS), then hold + distillation from the dense copy: the final card names the
    statistics and settings that chose the held masks, and the recovery."""
    root, imps = trained
    model = _dense(root)
    model.save_pretrained(tmp_path / "dense")
    report = prune_(model, imps["sparsegpt"], PruneConfig(sparsity=0.5, scope="row"), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    hold = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
    cb = ImportanceCallback(schedule=hold, distill=DistillConfig(teacher=str(tmp_path / "dense"), alpha=0.5,
                                                                 temperature=2.0))
    train(model, [cb], tmp_path / "recover", max_steps=2)
    save_pruned(model, tmp_path / "final", report=cb.pruning_report(model), schedule=hold, distillation=cb.distill)
    text = check_card(tmp_path / "final", criterion="sparsegpt", scope="row", obs=True,
                      how="pruned once, then fine-tuned with its mask held")
    meta = load_sparsity(tmp_path / "final")
    assert meta["importance"]["tokens"] == imps["sparsegpt"].meta["tokens"][next(iter(imps["sparsegpt"].meta["tokens"]))]
    assert "1503.02531" in text  # distillation is cited, since it was used
    assert str(tmp_path) not in json.dumps(meta) and str(tmp_path) not in text  # no absolute local path
    # statistics handed to the hold's report chose no mask: the held masks' source is still what is recorded
    save_pruned(model, tmp_path / "final-2", report=cb.pruning_report(model, imps["wanda"]), schedule=hold)
    assert load_sparsity(tmp_path / "final-2")["criterion"] == "sparsegpt"


def test_cli_prune_eval_data_card_and_its_hub_copy(trained, tmp_path, hub_server, monkeypatch):
    root, _ = trained
    from hf_weightprune.testing import train_tokenizer

    dense = tmp_path / "dense"
    tok = train_tokenizer([(KJV / "train.txt").read_text()[:20000]], vocab_size=320)
    model = tiny_llama(seed=0, vocab_size=len(tok))
    train(model, [ImportanceCallback(ImportanceConfig(criterion="wanda"))], tmp_path / "run", max_steps=4)
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    (dense / "README.md").write_text((root / "dense" / "README.md").read_text())
    out = tmp_path / "pruned"
    assert cli_main(["prune", str(dense), "--importance", str(tmp_path / "run"), "--sparsity", "0.5",
                     "--eval_data", str(KJV / "valid.txt"), "--max_windows", "4", "--seq_len", "32",
                     "--output_dir", str(out)]) == 0
    text = check_card(out, criterion="wanda", scope="row", obs=False, how="pruned in one shot")
    meta = load_sparsity(out)
    assert meta["eval"]["dataset"] == "valid.txt" and meta["eval"]["tokens"] == meta["eval"]["pruned_tokens"] > 0
    # the dense row is the trained model in dense/, not its base model org/tiny-base (which it was fine-tuned from)
    assert "| Dense (before pruning) |" in text and "| Pruned (this model) |" in text
    assert "| Dense (org/tiny-base) |" not in text
    assert ("This model is derived from [org/tiny-base](https://huggingface.co/org/tiny-base): trained with the "
            "Hugging Face `Trainer`, then pruned in one shot") in " ".join(text.split())
    # the weight files beside the dense folder's, as the file-to-file path records them: the zeros are stored
    assert meta["measured"]["dense_weight_files"] == meta["measured"]["weight_files"]
    assert "the same as the dense checkpoint's (the zeros are stored)" in text
    assert "on the same windows" in text and "not measured by the same evaluation" not in text
    # a local file is no Hub dataset id: no model-index result (tests/publish/test_card_meta.py has them for an id),
    # the text states the pruned model's loss
    assert ModelCard(text).data.eval_results is None and meta["eval"]["dataset_is_local"] is True
    assert f"| Pruned (this model) | {meta['eval']['pruned_loss']:.4f} |" in text
    assert str(KJV) not in text and str(tmp_path) not in text

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    push_pruned_to_hub(out, repo_id="tester/cards")
    files = hub_server.files("tester/cards")
    hub_text = files["README.md"].decode()
    hub_meta = json.loads(files["sparsity.json"])
    assert "unknown" not in hub_text.lower() and "**Criterion**: `wanda`" in hub_text
    assert ModelCard(hub_text).data.license == "apache-2.0"
    assert hub_meta["importance"]["path"] is None and hub_meta["importance"]["criterion"] == "wanda"
    assert ModelCard(hub_text).data.eval_results is None and hub_meta["eval"]["dataset_is_local"] is True
    assert str(tmp_path) not in files["sparsity.json"].decode() and "../" not in files["sparsity.json"].decode()


def test_save_pruned_inside_a_trainer_output_dir_warns(tmp_path, caplog):
    run = tmp_path / "out"
    run.mkdir()
    torch.save({"args": "stand-in"}, run / "training_args.bin")  # what Trainer.save_model writes there
    model = tiny_llama(seed=0)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        save_pruned(model, run / "pruned", report=report)
    lines = [r.getMessage() for r in caplog.records if "trainer.push_to_hub()" in r.getMessage()]
    assert len(lines) == 1 and f"{run}-pruned" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        save_pruned(model, tmp_path / "out-pruned", report=report)  # the README's layout: beside the run
    assert not [r for r in caplog.records if "trainer.push_to_hub()" in r.getMessage()]


def test_push_carries_the_hub_base_models_licence_and_data(tmp_path, hub_server, monkeypatch):
    """A base model known by its Hub id only: the push reads its card on the Hub (the pruned model carries its
    licence); a later save finds that card in the local Hub cache, without the network."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    api = HfApi(token=hub_server.token)
    api.create_repo("org/base")
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\ndatasets:\n- org/corpus\n---\n\n# Base\n",
                    path_in_repo="README.md", repo_id="org/base")
    model = tiny_llama(seed=0)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report, base_model="org/base")
    assert "license" not in load_sparsity(tmp_path / "pruned")  # not known here yet: nothing invented
    push_pruned_to_hub(tmp_path / "pruned", repo_id="tester/from-base")
    files = hub_server.files("tester/from-base")
    card = ModelCard(files["README.md"].decode()).data
    assert card.license == "mit" and card.datasets == ["org/corpus"] and card.base_model == "org/base"
    assert json.loads(files["sparsity.json"])["license"] == "mit"

    save_pruned(model, tmp_path / "again", report=report, base_model="org/base")  # the card is cached now
    assert load_sparsity(tmp_path / "again")["license"] == "mit"
    assert ModelCard.load(tmp_path / "again" / "README.md").data.license == "mit"


def test_schedule_sentence_states_the_pruned_stream_options():
    """`pruned_stream`, `cross_term`, `refit_at` and `order="depth"` change what the OBS updates solved and when
    each layer was pruned: the card's schedule line says so (and a depth order is no ramp)."""
    from hf_weightprune.publish.card_schedule import schedule_context

    def text(schedule, **recorded):
        return schedule_context({"schedule": schedule.to_dict(), **recorded})["text"]

    plain = text(PruneSchedule(final_sparsity=0.5, start=0.1, end=0.6))
    assert plain.endswith("cubic ramp") and "Hessians" not in plain
    stream = text(PruneSchedule(final_sparsity=0.5, start=0.1, end=0.6, pruned_stream=True), refitted_at=None)
    assert "restarted at every mask change" in stream and "re-fitted" not in stream
    refitting = PruneSchedule(final_sparsity=0.5, start=0.1, end=0.6, cross_term=True, refit_at=0.8)
    cross = text(refitting, refitted_at=9)  # the step the re-fit ran, as the run recorded it
    assert "restarted at every mask change" in cross and "GPTAQ / QEP, alpha 0.25" in cross
    assert cross.endswith("; the kept weights were re-fitted at step 9 by least squares on their fixed support")
    # the re-fit never ran (training stopped before it): no claim; the cross term still fed the OBS updates
    never = text(refitting, refitted_at=None)
    assert "re-fitted" not in never and "GPTAQ / QEP, alpha 0.25" in never and "restarted at every mask change" in never
    # a file of an earlier version (no `refitted_at` key) keeps the configured point its card stated
    assert "the kept weights were re-fitted at 80% of training by least squares" in text(refitting)
    depth = text(PruneSchedule(final_sparsity=0.5, start=0.1, end=0.7, order="depth"))
    assert depth.startswith("decoder layers pruned front to back from 10% to 70% of training, each once to 50.0%")
    assert "ramp" not in depth and "restarted at every mask change" in depth


def test_hold_sentence_states_the_refit_target_and_the_cross_term(tmp_path):
    """A hold recovery that re-fitted its kept weights (`refit_at`) towards their trained values with the one-shot
    prune's edits undone, with or without the cross term, says so on its Schedule line (the step it ran at, alpha,
    the Linears left on the plain objective); a plain hold says neither, nor does one whose re-fit never ran. Read
    from the `sparsity.json` save_pruned writes."""
    from hf_weightprune.publish.card_schedule import schedule_context

    model = tiny_llama(seed=2)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)

    def recorded(refitted_at=None, **options):
        schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"), **options)
        report.refitted_at = refitted_at  # as MaskHolder.report records the step the re-fit ran
        out = save_pruned(model, tmp_path / "out", report=report, schedule=schedule, overwrite=True)
        assert load_sparsity(out)["schedule"] == schedule.to_dict()
        assert load_sparsity(out)["refitted_at"] == refitted_at
        return schedule_context(load_sparsity(out))

    plain = recorded()
    assert plain == {"text": "pruned once, then fine-tuned with that mask held (a recovery fine-tune)",
                     "cross_term": False}
    refit = recorded(refit_at=4, refitted_at=4)
    assert refit["text"].startswith(plain["text"] + "; the kept weights were re-fitted at step 4 by least squares on "
                                    "their fixed support towards their trained values with the one-shot prune's "
                                    "edits undone (trained weights + teacher's weights - held weights at the start)")
    assert "pruned model's own forwards since training began" in refit["text"]
    assert "GPTAQ" not in refit["text"] and not refit["cross_term"]
    cross = recorded(refit_at=0.5, cross_term=True, cross_alpha=0.25, cross_max_in_features=64, refitted_at=5)
    assert "the kept weights were re-fitted at step 5 by least squares" in cross["text"] and cross["cross_term"]
    assert "50%" not in cross["text"]  # the step it ran at, not the configured fraction
    assert cross["text"].endswith("the re-fit solved the asymmetric objective `||W X - W_hat X~||^2` (`W` that "
                                  "target) with the dense-to-pruned cross term from the teacher's forwards "
                                  "(GPTAQ / QEP, alpha 0.25; Linears of more than 64 inputs kept the plain objective)")
    card = (tmp_path / "out" / "README.md").read_text()  # the last one's card states that line
    assert f"- **Schedule**: {cross['text']}." in card
    # configured but never run (training stopped before refit_at): the card claims no re-fit, names no cross term
    assert recorded(refit_at=0.5, cross_term=True) == plain
    # a file from before `refitted_at` was recorded: its re-fit targeted the teacher's weights, and its card says so
    legacy = load_sparsity(tmp_path / "out")
    legacy.update(schedule=PruneSchedule(mode="hold", masks_from="p", refit_at=4, cross_term=True).to_dict())
    del legacy["refitted_at"]
    text = schedule_context(legacy)["text"]
    assert "at step 4 by least squares on their fixed support towards the dense teacher's weights (each layer's " \
           "dense output on the pruned model's inputs)" in text and "(`W` the teacher's weight)" in text, text


HOLD = dict(mode="hold", masks_from="pruned")


@pytest.mark.parametrize("options, named", [
    (dict(cross_term=True, refit_at=0.8), True),
    (dict(cross_term=True, pruned_stream=True), True),
    (dict(pruned_stream=True), False),
    ({}, False),
    (dict(HOLD, refit_at=3, cross_term=True, cross_alpha=1.0), True),
    (dict(HOLD, refit_at=3), False),
    (HOLD, False),
    (dict(HOLD, refit_at=3, cross_term=True, ran=False), False),  # the re-fit, the cross term's only reader, never ran
])
def test_the_references_list_gptaq_and_qep_exactly_when_the_schedule_line_names_them(tmp_path, options, named):
    from hf_weightprune.publish.card_refs import GPTAQ_REFERENCE, QEP_REFERENCE

    options = dict(options)
    ran = options.pop("ran", True)
    model = tiny_llama(seed=2)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    report.refitted_at = 9 if "refit_at" in options and ran else None  # as MaskHolder.report records it
    ramp = {} if options.get("mode") == "hold" else dict(final_sparsity=0.5, start=0.1, end=0.6)
    schedule = PruneSchedule(**ramp, **options)
    save_pruned(model, tmp_path / "out", report=report, schedule=schedule)
    card = (tmp_path / "out" / "README.md").read_text()
    schedule_line = next(line for line in card.splitlines() if line.startswith("- **Schedule**"))
    references = card.split("## References", 1)[1]
    assert ("GPTAQ / QEP" in schedule_line) is named
    for reference in (GPTAQ_REFERENCE, QEP_REFERENCE):
        assert (f"- {reference}" in references) is named
    assert ("arXiv:2504.02692" in card, "arXiv:2504.09629" in card) == (named, named)


def test_activation_statistics_count_sampled_steps_not_forwards_under_gradient_accumulation(tmp_path):
    """A training sample of `wanda` / `sparsegpt` sums every micro-batch of one optimizer step (and every rank's): the
    card states sampled steps, not forward passes (3 steps of 2 accumulated micro-batches are 6 forwards). A
    calibration prune forwards its batches once each: there the count is forward passes."""
    model = tiny_llama(seed=0)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [cb], tmp_path / "run", max_steps=3, ga=2)
    report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "trained", report=report)
    text = " ".join((tmp_path / "trained" / "README.md").read_text().split())
    tokens = load_sparsity(tmp_path / "trained")["importance"]["tokens"]
    assert f"summed over {tokens:,} tokens in 3 sampled training steps, up to step 3" in text
    assert "forward pass" not in text

    model = tiny_llama(seed=0)
    calibration = torch.randint(3, model.config.vocab_size, (12, 16), generator=torch.Generator().manual_seed(0))
    imp = oneshot_importance(model, "wanda", calibration, batch_size=4)
    save_pruned(model, tmp_path / "calibrated", report=prune_(model, imp, PruneConfig(sparsity=0.5), progress=False))
    text = " ".join((tmp_path / "calibrated" / "README.md").read_text().split())
    assert "summed over 192 tokens in 3 forward passes, on calibration data, without training" in text


@pytest.mark.parametrize("scope, config", [
    ("row", PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.2)),
    ("layer", PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.2, scope="layer")),
    ("layer", PruneConfig(sparsity={r".*mlp.*": 0.7, r".*self_attn.*": 0.3}, scope="layer")),
    ("row", PruneConfig(sparsity={r".*mlp.*": 0.7, r".*self_attn.*": 0.3})),
])
def test_the_scope_line_claims_equal_sparsities_only_where_they_are(trained, tmp_path, scope, config):
    """OWL and a per-module target give the tensors different sparsities: the card's scope line must not say "the same
    sparsity in every tensor"; with OWL it states the range the tensors span, read from the weights."""
    root, imps = trained
    model = _dense(root)
    report = prune_(model, imps["wanda"], config, progress=False)
    save_pruned(model, tmp_path / "p", report=report)
    text = (tmp_path / "p" / "README.md").read_text()
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    values = [float((weights[n] == 0).float().mean()) for n in load_sparsity(tmp_path / "p")["tensors"]]
    assert max(values) - min(values) > 0.1  # the tensors really differ
    detail = re.search(rf"^- \*\*Scope\*\*: {scope} \((.*)\)\.$", text, re.M).group(1)
    assert "every tensor" not in detail.replace("every tensor of a decoder layer", "")
    if config.allocation == "owl":
        assert f"from {100 * min(values):.2f}% to {100 * max(values):.2f}%" in detail
        # the one line the CLI and logs print (`report.summary()`) names OWL and the same range
        assert f"OWL: tensors {100 * min(values):.2f}% to {100 * max(values):.2f}%" in report.summary()
    else:
        assert "OWL" not in report.summary()
        assert "pattern" in detail


@pytest.mark.parametrize("pruned_stream", [True, False])
def test_a_pruned_stream_card_says_its_counts_are_the_last_updates(tmp_path, pruned_stream):
    """A pruned-stream schedule restarts the `sparsegpt` statistic at every mask change, so the importance it records
    covers only the steps since the last change (steps 5-6 of updates at 2, 4, 6): the card must not present those
    counts as what the whole fine-tune accumulated. Without the pruned stream they are every step up to the last."""
    model = tiny_llama(seed=0)
    schedule = PruneSchedule(final_sparsity=0.5, start=2, end=6, every_n_steps=2, pruned_stream=pruned_stream)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule)
    train(model, [cb], tmp_path / "run", max_steps=8)
    save_pruned(model, tmp_path / "p", report=cb.pruning_report(model), schedule=schedule)
    text = " ".join((tmp_path / "p" / "README.md").read_text().split())
    importance = load_sparsity(tmp_path / "p")["importance"]
    assert importance["step"] == 6 and importance["num_samples"] == (2 if pruned_stream else 6)
    counts = f"inputs of every pruned layer summed over {importance['tokens']:,} tokens in"
    assert counts in text
    assert (f"(the last mask update's, restarted at every mask change: {counts}" in text) is pruned_stream
