"""`search_structures` (Minitron's candidate search): the winner has the lowest measured loss and is what pruning with
its config gives; candidates the budget cannot take are skipped with their reason; the input model is unchanged; a
recovery runs exactly `recovery_steps` Trainer steps per candidate; the table reaches `sparsity.json`, the card and
the CLI."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from transformers import TrainerCallback

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    load_sparsity,
    prune_,
    save_pruned,
    search_structures,
)
from hf_weightprune.testing import TokenDataset, tiny_llama, train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.data import evaluate_loss, load_texts
from hf_weightprune.tools.search import candidate_configs
from tests.doc_blocks import KJV
from tests.helpers import train

BUDGET = 0.75
TRAIN_ARGS = {"use_cpu": True, "disable_tqdm": True, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
              "logging_steps": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-layer tiny Llama trained 3 steps with unit statistics, and its importance."""
    model = tiny_llama(seed=3, num_hidden_layers=4)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path_factory.mktemp("search"), max_steps=3, lr=1e-3)
    return model.eval(), cb.importance()


def _windows(n=8, seed=7):
    return datasets.Dataset.from_dict({"input_ids": TokenDataset(n=n, seed=seed).ids.tolist()})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


CANDIDATES = ["neurons", "layers,neurons", "hidden,neurons", "heads,neurons"]


def test_the_winner_has_the_lowest_loss_and_is_what_its_config_prunes(run):
    model, imp = run
    before, bound = _state(model), dict(imp.weights)
    windows = _windows()
    result = search_structures(model, imp, candidate_configs(PruneConfig(structure="neurons", target_params=BUDGET),
                                                             CANDIDATES), windows, batch_size=4)
    # the importance is still bound to the input model (each candidate pruned with a shallow copy of it)
    assert {n: t.data_ptr() for n, t in imp.weights.items()} == {n: t.data_ptr() for n, t in bound.items()}
    assert [r["config"]["structure"] for r in result.candidates] == CANDIDATES
    for row in result.candidates:  # each loss is the candidate's own, measured again here
        assert row["skipped"] is None
        again = copy.deepcopy(model)
        prune_(again, imp, PruneConfig(**row["config"]), progress=False)
        assert row["loss"] == pytest.approx(evaluate_loss(again, windows, batch_size=4)["loss"], rel=1e-6)
        assert row["num_parameters"] == sum(p.numel() for p in again.parameters())
    losses = [r["loss"] for r in result.candidates]
    assert result.best_index == losses.index(min(losses))
    assert result.best.structure == CANDIDATES[result.best_index]
    assert len(set(losses)) > 1  # the candidates really differ: the choice is not a tie broken by order
    assert result.dense_loss == pytest.approx(evaluate_loss(model, windows, batch_size=4)["loss"])
    assert (result.windows, result.tokens) == (8, 8 * 15)

    direct = copy.deepcopy(model)
    report = prune_(direct, imp, result.best, progress=False)
    _assert_same(_state(result.model), _state(direct))  # same shapes, same weights
    assert result.model.config.to_dict() == direct.config.to_dict()
    assert result.report.structured == report.structured
    assert result.report.search == result.to_dict()

    _assert_same(_state(model), before)  # the input model is as it was


def test_a_candidate_the_budget_cannot_take_is_skipped_with_its_reason(run):
    model, imp = run
    # one KV group of two per layer is 14% of this model: heads alone cannot remove a quarter of it
    cands = [PruneConfig(structure="heads", target_params=BUDGET),
             PruneConfig(structure="layers,neurons", target_params=BUDGET)]
    result = search_structures(model, imp, cands, _windows(), return_model=False)
    skipped, kept = result.candidates
    assert skipped["loss"] is None and skipped["num_parameters"] is None
    assert "cannot be met with heads" in skipped["skipped"] and "\n" not in skipped["skipped"]
    assert kept["skipped"] is None and result.best_index == 1 and result.best is cands[1]
    assert result.model is None and result.report is None
    assert "skipped: target_params=0.75 cannot be met" in result.table()


def test_all_candidates_failing_is_one_line_naming_each(run):
    model, imp = run
    before = _state(model)
    cands = [PruneConfig(structure="heads", target_params=BUDGET), PruneConfig(structure="heads", target_params=BUDGET,
                                                                               unit_statistic="taylor")]
    with pytest.raises(ValueError, match=r"no candidate could be pruned \(heads \(activation, none\): target_params=0.75 "
                                         r"cannot") as e:
        search_structures(model, imp, cands, _windows())
    assert "\n" not in str(e.value) and str(e.value).count("cannot be met") == 2
    assert "; heads (taylor, none): target_params=0.75 cannot" in str(e.value)  # each candidate told apart
    _assert_same(_state(model), before)


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": []}, "non-empty list of PruneConfig"),
    ({"candidates": [PruneConfig(sparsity=0.5)]}, "compares structured prunes"),
    ({"candidates": [PruneConfig(structure="neurons", target_params=0.7),
                     PruneConfig(structure="layers", target_params=0.8)]}, "same target_params"),
    ({"recovery_steps": 2}, "pass train_dataset"),
    ({"recovery_steps": -1}, "int >= 0"),
    ({"distill": DistillConfig()}, "give recovery_steps > 0"),
    ({"recovery_steps": 1, "train_dataset": TokenDataset(), "training_args": {"max_steps": 5}}, "'max_steps'"),
    ({"recovery_steps": 1, "train_dataset": TokenDataset(), "distill": DistillConfig(teacher_dtype="bfloat16")},
     "teacher_dtype"),
])
def test_bad_input_is_one_line_before_any_work(run, kwargs, match):
    model, imp = run
    args = {"candidates": [PruneConfig(structure="neurons", target_params=BUDGET)], **kwargs}
    with pytest.raises(ValueError, match=match) as e:
        search_structures(model, imp, args.pop("candidates"), _windows(), **args)
    assert "\n" not in str(e.value)


class _Steps(TrainerCallback):
    """Counts the recovery runs and their optimizer steps, and what the distillation logged."""

    def __init__(self):
        self.runs, self.steps, self.logged, self.seen = 0, [], set(), []

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs += 1
        self.steps.append(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1] += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged |= set(logs or {})

    def on_train_end(self, args, state, control, **kwargs):
        self.seen.append(state.num_input_tokens_seen)  # the Trainer's own count (include_num_input_tokens_seen)


@pytest.mark.parametrize("distill", [None, DistillConfig(alpha=0.5)])
def test_recovery_runs_that_many_trainer_steps_per_candidate(run, distill):
    model, imp = run
    before, mode = _state(model), model.training
    grads = [p.requires_grad for p in model.parameters()]
    counter = _Steps()
    cands = [PruneConfig(structure="neurons", target_params=BUDGET), PruneConfig(structure="heads", target_params=BUDGET),
             PruneConfig(structure="layers,neurons", target_params=BUDGET)]
    result = search_structures(model, imp, cands, _windows(), recovery_steps=3, train_dataset=TokenDataset(n=24),
                               training_args=TRAIN_ARGS, distill=distill, callbacks=[counter])
    assert counter.runs == 2 and counter.steps == [3, 3]  # the skipped candidate never trains
    assert ("distill/kl" in counter.logged) == (distill is not None)
    assert result.recovery_steps == 3
    # What ran, measured: 3 steps of 4 unpadded 16-token windows; the one never recovered has none.
    assert [row["training"] for row in result.candidates] == [{"steps": 3, "tokens": 192}, None,
                                                             {"steps": 3, "tokens": 192}]
    assert (result.distillation or {}).get("teacher") == (None if distill is None else "LlamaForCausalLM")
    for row in (result.candidates[0], result.candidates[2]):  # recovered: not the one-shot loss any more
        oneshot = copy.deepcopy(model)
        prune_(oneshot, imp, PruneConfig(**row["config"]), progress=False)
        assert row["loss"] != pytest.approx(evaluate_loss(oneshot, _windows())["loss"], rel=1e-7)
    # the teacher was the input model itself: still trainable, in its mode, unchanged
    _assert_same(_state(model), before)
    assert model.training == mode and [p.requires_grad for p in model.parameters()] == grads


def test_the_search_is_written_to_sparsity_json_and_the_card(run, tmp_path):
    model, imp = run
    cands = [PruneConfig(structure="neurons", target_params=BUDGET), PruneConfig(structure="heads", target_params=BUDGET),
             PruneConfig(structure="layers,neurons", target_params=BUDGET)]
    result = search_structures(model, imp, cands, _windows())
    save_pruned(result.model, tmp_path / "out", report=result.report)
    section = load_sparsity(tmp_path / "out")["search"]
    assert section == json.loads(json.dumps(result.to_dict()))
    assert section["chosen"] == result.best_index and section["reference"] == "arXiv:2407.14679"
    card = (tmp_path / "out" / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("- **Shape search**"))
    chosen = result.candidates[result.best_index]
    assert f"`{chosen['config']['structure']}` {chosen['loss']:.4f} at {chosen['num_parameters']:,} parameters, the lowest" in line
    assert "among 3 candidates" in line and "one-shot" in line and "`heads` skipped (the reason is in sparsity.json)" in line
    assert "arXiv:2407.14679" in card.split("## ")[-1]  # the references


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_the_card_states_the_recovery_each_candidate_ran_not_the_steps_asked(run, tmp_path):
    """A recovery a callback stopped early ran fewer steps than `recovery_steps`: the rows and the card state the steps
    and real tokens (padding excluded, as the Trainer's `non_padding` count) of what ran."""
    from tests.train.test_distill import PaddedDataset

    model, imp = run
    counter = _Steps()
    cands = [PruneConfig(structure="neurons", target_params=BUDGET),
             PruneConfig(structure="layers,neurons", target_params=BUDGET)]
    result = search_structures(model, imp, cands, _windows(), recovery_steps=5, train_dataset=PaddedDataset(n=24),
                               training_args={**TRAIN_ARGS, "include_num_input_tokens_seen": "non_padding"},
                               callbacks=[counter, _StopAt(2)])
    assert counter.steps == [2, 2] and counter.seen[0] == counter.seen[1] < 2 * 4 * 12  # padded rows, same batches
    assert [row["training"] for row in result.candidates] == [{"steps": 2, "tokens": counter.seen[0]}] * 2
    save_pruned(result.model, tmp_path / "out", report=result.report)
    section = load_sparsity(tmp_path / "out")["search"]
    assert section["recovery_steps"] == 5 and section["candidates"][0]["training"]["steps"] == 2
    card = (tmp_path / "out" / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("- **Shape search**"))
    assert (f"scored after 2 optimizer steps of recovery ({counter.seen[0]:,} training tokens, padding excluded, "
            "counted while each recovered)") in line
    assert "5 steps" not in line
    # A file written before the recovery was measured (no `training` in its rows): the steps it asked for, as before.
    from hf_weightprune.publish.card import search_text

    old = {**section, "candidates": [{k: v for k, v in r.items() if k != "training"} for r in section["candidates"]]}
    assert "scored after 5 steps of recovery by its mean loss" in search_text(old)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A dense training output with a tokenizer, its importance, and a training text file."""
    out = tmp_path_factory.mktemp("search_cli")
    texts = load_texts(KJV / "train.txt")[:40]
    tok = train_tokenizer(texts, vocab_size=320)
    model = tiny_llama(seed=4, num_hidden_layers=4, vocab_size=len(tok))
    trainer = train(model, [ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))], out / "run",
                    max_steps=3, lr=1e-3)
    trainer.save_model(str(out / "run"))
    tok.save_pretrained(out / "run")
    (out / "train.txt").write_text("\n".join(texts))
    return out


def test_cli_searches_and_prunes_with_the_winner(cli_run, tmp_path, capsys):
    run = cli_run / "run"
    args = ["prune", str(run), "--importance", str(run), "--target_params", "0.75", "--search_structures", "neurons",
            "layers,neurons", "--calibration", str(cli_run / "train.txt"), "--search_windows", "4", "--seq_len", "16"]
    assert main([*args, "--output_dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Structure search, mean loss on 4 --calibration windows (60 tokens" in printed
    assert printed.splitlines()[1].split() == ["structure", "statistic", "compensation", "parameters", "loss", "ppl"]
    sparsity = load_sparsity(tmp_path / "out")
    search = sparsity["search"]
    chosen = search["candidates"][search["chosen"]]
    assert [c["config"]["structure"] for c in search["candidates"]] == ["neurons", "layers,neurons"]
    assert sparsity["structure"] == chosen["config"]["structure"]
    assert sparsity["structured"]["num_parameters"]["after"] == chosen["num_parameters"]
    assert "- **Shape search**: the shape was chosen" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("extra, match", [
    (["--structure", "neurons"], "--search_structures replaces --structure"),
    ([], "pass --calibration FILE"),
    (["--calibration", "missing.txt"], "--calibration missing.txt: no such file"),
    (["--calibration", "CAL", "--search_windows", "0"], "--search_windows must be >= 1"),
    (["--calibration", "CAL", "--search_structures", "2:4"], "target_params is a budget for structured"),
])
def test_cli_refuses_bad_search_flags_in_one_line_writing_nothing(cli_run, tmp_path, capsys, extra, match):
    run = cli_run / "run"
    extra = [str(cli_run / "train.txt") if e == "CAL" else e for e in extra]
    args = ["prune", str(run), "--importance", str(run), "--target_params", "0.75", "--search_structures", "neurons",
            *extra, "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_candidate_off_its_budget_is_skipped_not_ranked_by_its_size(run, monkeypatch, caplog):
    # Every planned count meets the rule, so a miss is simulated: the "hidden,neurons" candidate's plan removes nothing
    # (the dense model, which a ranking by loss alone would favour). prune_ warns; the search skips it.
    import logging

    from hf_weightprune.prune import structured

    real = structured.plan_budget

    def removes_nothing(model, scores, axes, *args):
        budget = real(model, scores, axes, *args)
        if axes == ("neurons", "hidden"):
            budget.counts = dict.fromkeys(budget.counts, 0)
        return budget

    monkeypatch.setattr(structured, "plan_budget", removes_nothing)
    cands = [PruneConfig(structure="hidden,neurons", target_params=BUDGET),
             PruneConfig(structure="neurons", target_params=BUDGET)]
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.prune.structured"):
        result = search_structures(run[0], run[1], cands, _windows(), return_model=False)
    missed, kept = result.candidates
    target = round(BUDGET * sum(p.numel() for p in run[0].parameters()))
    assert missed["loss"] is None and missed["num_parameters"] == sum(p.numel() for p in run[0].parameters())
    assert missed["skipped"].startswith(f"kept {missed['num_parameters']:,} parameters for target_params {target:,}, "
                                        "more than one step of its coarsest axis (")
    assert missed["skipped"].endswith("off: not comparable at equal size") and "\n" not in missed["skipped"]
    assert kept["skipped"] is None and abs(kept["num_parameters"] - target) <= 3 * 32 * 4 / 2  # half a neuron
    assert result.best_index == 1
    assert any("more than one step of the coarsest axis" in r.getMessage() for r in caplog.records)


def test_candidates_that_prune_the_same_model_are_scored_once_and_named_so(run, tmp_path):
    """At 90% of the parameters no hidden channel or layer goes: `hidden,neurons` and `layers,neurons` are the very
    model `neurons` gives. The table, `sparsity.json` and the card say so instead of listing three shapes."""
    model, imp = run
    structures = ["neurons", "hidden,neurons", "layers,neurons"]
    result = search_structures(model, imp, candidate_configs(PruneConfig(structure="neurons", target_params=0.9),
                                                             structures), _windows(), batch_size=4)
    first, *same = result.candidates
    assert first["same_as"] is None and [r["same_as"] for r in same] == [0, 0]
    assert all(r["loss"] == first["loss"] and r["num_parameters"] == first["num_parameters"] for r in same)
    for structure in structures[1:]:  # really the same model: same shapes, same weights
        again = copy.deepcopy(model)
        prune_(again, imp, PruneConfig(structure=structure, target_params=0.9), progress=False)
        _assert_same(_state(again), _state(result.model))
    assert result.best_index == 0
    assert result.table().count("same model as neurons (activation, none)") == 2
    save_pruned(result.model, tmp_path / "searched", report=result.report)
    card = " ".join((tmp_path / "searched" / "README.md").read_text().split())
    assert "among 3 candidates (1 distinct pruned model) of the same budget" in card
    assert "`hidden,neurons` the same pruned model as `neurons`; `layers,neurons` the same pruned model as `neurons`" \
        in card


def test_candidates_that_differ_only_in_compensation_are_told_apart(run, tmp_path):
    """`neurons` with and without FLAP's mean compensation: two pruned models of one shape; the table, the log and the
    card name each one's compensation instead of two identical rows."""
    import logging

    model, imp = run
    cands = [PruneConfig(structure="neurons", target_params=BUDGET),
             PruneConfig(structure="neurons", target_params=BUDGET, compensate="mean")]
    result = search_structures(model, imp, cands, _windows(), batch_size=4)
    rows = [line.split() for line in result.table().splitlines()]
    assert rows[0] == ["structure", "statistic", "compensation", "parameters", "loss", "ppl"]
    assert [r[-6:-3] for r in rows[1:]] == [["neurons", "activation", "none"], ["neurons", "activation", "mean"]]
    assert result.candidates[1]["same_as"] is None  # another model: the biases differ
    save_pruned(result.model, tmp_path / "searched", report=result.report)
    card = " ".join((tmp_path / "searched" / "README.md").read_text().split())
    assert "`neurons` (compensation none)" in card and "`neurons` (compensation mean)" in card
    logger = logging.getLogger("hf_weightprune.tools.search")
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger.addHandler(handler)
    saved = logger.level
    logger.setLevel(logging.INFO)
    try:
        search_structures(model, imp, cands, _windows(), batch_size=4, return_model=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    said = [r.getMessage() for r in records]
    assert any("neurons (activation, none):" in m for m in said) and any("neurons (activation, mean):" in m for m in said)
