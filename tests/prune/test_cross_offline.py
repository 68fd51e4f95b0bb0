"""`PruneConfig(cross_alpha=...)`: offline OBS pruning from a saved importance folder that holds the dense-to-pruned
cross term of a `PruneSchedule(cross_term=True)` run solves the asymmetric objective `||W X - W_hat X~||^2`
([`asymmetric_sparsegpt_prune_`]) for every weight with a cross term, in `prune_`, `prune_checkpoint` and the CLI.

The folder comes from a real distilled `Trainer` run on a tiny model (`tests/train/test_cross_wiring.py`'s run:
`down_proj`, whose 64 inputs exceed `cross_max_in_features=32`, has no cross term and stays symmetric); the pruned
model is the dense one it started from (the teacher, whose outputs the asymmetric objective targets)."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.files.pruned_files import SPARSITY_NAME
from hf_weightprune.prune.obs import sparsegpt_prune_
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.prune.refit import asymmetric_sparsegpt_prune_
from hf_weightprune.testing import tiny_llama
from hf_weightprune.tools.cli import main
from tests.helpers import train
from tests.train.test_cross_wiring import _callback, _schedule, _train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the run's output_dir, whose importance/ holds H~ and C, and the callback's own importance: H~ without C)."""
    out = tmp_path_factory.mktemp("cross_run")
    cb = _callback(_schedule(cross_max_in_features=32))
    _train(out, cb, record=False)
    return out, cb.importance()


def _dense():
    return tiny_llama(seed=3)  # the model the run started from, and its teacher


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _by_hand(importance, *, alpha, **kwargs):
    """Every tracked weight of the dense model swept by hand: `asymmetric_sparsegpt_prune_` with the folder's `H~` and
    `C` where the weight has a cross term, the plain sweep on `H~` where it has none."""
    model, cross = _dense(), importance.cross_terms()
    params = dict(model.named_parameters())
    for name in importance.names:
        H = importance.state(name)
        if name in cross:
            asymmetric_sparsegpt_prune_(params[name], H, cross[name][0], alpha=alpha, **kwargs)
        else:
            sparsegpt_prune_(params[name], H, **kwargs)
    return _weights(model)


def _pruned(run_dir, config):
    model = _dense()
    report = prune_(model, load_importance(run_dir), config, progress=False)
    return model, report


def test_the_folder_holds_a_cross_term_for_all_but_the_skipped_inputs(run):
    run_dir, _ = run
    imp = load_importance(run_dir)
    terms = imp.cross_terms()
    assert imp.has_cross and imp.criterion == "sparsegpt"
    assert set(terms) == {n for n in imp.names if "down_proj" not in n} and terms
    # Each cross term covers the tokens of its H~ (what makes it usable), and is not zero: the student was pruned.
    assert all(t == imp.meta["tokens"][n] > 0 and float(c.abs().max()) > 1e-3 for n, (c, t) in terms.items())


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_prune_with_cross_alpha_is_the_asymmetric_sweep_by_hand(run, structure):
    run_dir, _ = run
    kwargs = dict(sparsity=0.5, scope="row") if structure == "unstructured" else dict(nm="2:4")
    config = PruneConfig(structure=structure, scope="row" if structure == "unstructured" else None, block_size=8,
                         cross_alpha=0.5)
    model, report = _pruned(run_dir, config)
    want = _by_hand(load_importance(run_dir), alpha=0.5, blocksize=8, **kwargs)
    got = _weights(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    n_cross = len(load_importance(run_dir).cross_terms())
    assert report.reconstruction == "OBS" and report.cross_term == {"alpha": 0.5, "weights": n_cross}

    # The symmetric sweep from the same folder: the same sparsity, other kept weights where a cross term applies.
    plain, plain_report = _pruned(run_dir, PruneConfig(structure=structure, scope=config.scope, block_size=8))
    assert plain_report.cross_term is None
    assert plain_report.global_sparsity == report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    assert {n: t["sparsity"] for n, t in plain_report.tensors.items()} == {n: t["sparsity"]
                                                                          for n, t in report.tensors.items()}
    plain = _weights(plain)
    cross = load_importance(run_dir).cross_terms()
    for name in load_importance(run_dir).names:
        assert torch.equal(plain[name], got[name]) == (name not in cross), name  # down_proj: no C, same sweep


def test_cross_alpha_zero_is_the_symmetric_sweep_and_the_report_says_which(run, tmp_path):
    run_dir, _ = run
    zero, report = _pruned(run_dir, PruneConfig(sparsity=0.5, block_size=8, cross_alpha=0.0))
    plain, _ = _pruned(run_dir, PruneConfig(sparsity=0.5, block_size=8))
    a, b = _weights(zero), _weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in b)
    # sparsity.json records that the cross term was used, with which alpha and for how many weights.
    save_pruned(zero, tmp_path / "zero", report=report, write_card=False)
    saved = json.loads((tmp_path / "zero" / SPARSITY_NAME).read_text())
    assert saved["reconstruction"] == "OBS"
    assert saved["cross_term"] == {"alpha": 0.0, "weights": len(load_importance(run_dir).cross_terms())}
    save_pruned(plain, tmp_path / "plain", report=_pruned(run_dir, PruneConfig(sparsity=0.5))[1], write_card=False)
    assert json.loads((tmp_path / "plain" / SPARSITY_NAME).read_text())["cross_term"] is None


def test_a_folder_with_a_cross_term_pruned_without_cross_alpha_says_so(run, tmp_path, capsys, caplog):
    run_dir, callback_importance = run
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        _pruned(run_dir, PruneConfig(sparsity=0.5))
    assert "holds the dense-to-pruned cross term" in caplog.text and "Pass cross_alpha=0.25" in caplog.text
    caplog.clear()
    dense = tmp_path / "dense"
    _dense().save_pretrained(dense)
    capsys.readouterr()
    for i, extra in enumerate(([], ["--dtype", "float32"])):  # the CLI, file to file and in memory: the flag
        assert main(["prune", str(dense), "--importance", str(run_dir), "--output_dir", str(tmp_path / f"cli{i}"),
                     *extra]) == 0
        shown = [line for line in capsys.readouterr().err.splitlines() if "cross term" in line]
        assert len(shown) == 1 and "Pass --cross_alpha 0.25 for the asymmetric one" in shown[0], shown
        assert "cross_alpha=" not in shown[0] and "None" not in shown[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):  # nothing to say without a cross term
        prune_(_dense(), callback_importance, PruneConfig(sparsity=0.5), progress=False)
    assert "cross term" not in caplog.text


def test_sweep_says_the_cross_term_is_unused_once_per_run(run, tmp_path, caplog):
    """`sweep` prunes the importance at every point: the advice to pass cross_alpha is one line per run, not one per
    prune; a lone prune still gives it. `search_structures` never gives it: its structured candidates cannot read
    the cross term (`PruneConfig` refuses cross_alpha for them)."""
    import datasets

    from hf_weightprune import search_structures, sweep
    from hf_weightprune.testing import TokenDataset, train_tokenizer
    from tests.doc_blocks import KJV

    run_dir, _ = run
    importance = load_importance(run_dir)
    folder = tmp_path / "dense"  # the run's Linears (the vocabulary of a tokenizer for sweep's text is larger)
    tiny_llama(seed=3, vocab_size=300).save_pretrained(folder)
    train_tokenizer([(KJV / "train.txt").read_text()[:5000]], vocab_size=300).save_pretrained(folder)

    def warnings():
        return sum("holds the dense-to-pruned cross term" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        rows = sweep(folder, {"run": importance}, KJV / "valid.txt", sparsities=[0.3, 0.5, 0.7], baselines=(),
                     seq_len=16, max_windows=2, batch_size=2, progress=False)
    assert len(rows) == 4 and warnings() == 1
    caplog.clear()
    windows = datasets.Dataset.from_dict({"input_ids": TokenDataset(n=4, seed=7).ids.tolist()})
    candidates = [PruneConfig(structure=s, target_params=0.9, compensate="refit") for s in ("neurons", "heads")]
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        search_structures(_dense(), importance, candidates, windows)
    assert warnings() == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):  # outside a run: every prune says it
        _pruned(run_dir, PruneConfig(sparsity=0.5))
        _pruned(run_dir, PruneConfig(sparsity=0.6))
    assert warnings() == 2


def _refused(model, importance, config, match):
    before = _weights(model)
    with pytest.raises(ValueError, match=match) as e:
        prune_(model, importance, config, progress=False)
    assert "\n" not in str(e.value)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing modified


def test_refusals_in_one_line_before_any_weight_changes(run):
    run_dir, callback_importance = run
    # An importance without the cross term (a running callback's, or any run without cross_term=True).
    assert not callback_importance.has_cross
    _refused(_dense(), callback_importance, PruneConfig(sparsity=0.5, cross_alpha=0.5),
             r"cross_alpha=0.5 needs the dense-to-pruned cross term, and this importance holds none: gather it during "
             r"training with PruneSchedule\(cross_term=True, ...\) under ImportanceCallback\(ImportanceConfig\("
             r"criterion='sparsegpt'\), distill=DistillConfig\(...\)\), then prune that run's dense teacher with its "
             r"importance folder")
    # A criterion without the sparsegpt statistic: no OBS sweep to correct.
    model = _dense()
    _refused(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5, cross_alpha=0.5),
             r"cross_alpha=0.5 corrects the OBS sweep, which needs the input Hessians of criterion 'sparsegpt'; this "
             r"importance is 'magnitude'")
    # Refused by the config itself, before any importance is read.
    for kwargs, match in (
        (dict(cross_alpha=1.5), r"cross_alpha must be None or a float in \[0, 1\]"),
        (dict(cross_alpha=-0.1), r"cross_alpha must be None or a float in \[0, 1\]"),
        (dict(cross_alpha=True), r"cross_alpha must be None or a float in \[0, 1\]"),
        (dict(cross_alpha=0.5, reconstruct=False), r"cross_alpha corrects the OBS sweep, which reconstruct=False"),
        (dict(cross_alpha=0.5, structure="neurons"), r"structure 'neurons' does not read the cross term"),
        (dict(cross_alpha=0.5, structure="layers", sparsity=0.5), r"structure 'layers' does not read the cross term"),
        # a combination is named as written, not by the internal kind "combined"
        (dict(cross_alpha=0.5, structure=("heads", "hidden"), target_params=0.7),
         r"structure 'heads,hidden' does not read the cross term"),
    ):
        with pytest.raises(ValueError, match=match):
            PruneConfig(**kwargs)
    # Saved and read back with the config.
    config = PruneConfig(sparsity=0.5, cross_alpha=0.25)
    assert PruneConfig.from_dict(config.to_dict()).cross_alpha == 0.25


def test_cli_prunes_file_to_file_with_cross_alpha(run, tmp_path, capsys):
    run_dir, _ = run
    dense = tmp_path / "dense"
    _dense().save_pretrained(dense)
    out = tmp_path / "pruned"
    assert main(["prune", str(dense), "--importance", str(run_dir), "--sparsity", "0.5", "--scope", "row",
                 "--block_size", "8", "--cross_alpha", "0.5", "--output_dir", str(out)]) == 0
    model, report = _pruned(run_dir, PruneConfig(sparsity=0.5, scope="row", block_size=8, cross_alpha=0.5))
    got, want = load_file(out / "model.safetensors"), _weights(model)
    assert all(torch.equal(got[k], want[k]) for k in want if k in got) and set(report.tensors) <= got.keys()
    saved = json.loads((out / SPARSITY_NAME).read_text())
    assert saved["cross_term"] == report.cross_term == {"alpha": 0.5, "weights": len(load_importance(run_dir).cross_terms())}


def test_cross_alpha_on_a_folder_that_is_already_pruned_warns_and_prunes(run, tmp_path, capsys, caplog):
    """The cross term pairs the dense teacher's inputs with the pruned student's: an already pruned folder (it holds
    sparsity.json, e.g. the run's own output) gets a warning with `cross_alpha`, from `prune_checkpoint` and from the
    CLI on both of its paths (file to file, and loaded with --dtype); it is still pruned, since a run's teacher may
    itself be a pruned checkpoint. Without `cross_alpha`, no warning."""
    from hf_weightprune import prune_checkpoint

    run_dir, _ = run
    dense = tmp_path / "dense"
    _dense().save_pretrained(dense)
    pruned = tmp_path / "pruned"
    with caplog.at_level("WARNING", logger="hf_weightprune"):
        prune_checkpoint(dense, load_importance(run_dir), PruneConfig(sparsity=0.5, cross_alpha=0.5), pruned,
                         write_card=False)
    assert "already pruned" not in caplog.text  # the dense teacher: no warning
    warning = (f"cross_alpha=0.5: {pruned} is already pruned (it holds sparsity.json), and the cross term pairs the "
               "dense teacher's inputs with the pruned student's: unless this folder is the run's teacher, prune the "
               "model the run distilled from (a gradual run's default: the model it started from)")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_weightprune"):
        report = prune_checkpoint(pruned, load_importance(run_dir), PruneConfig(sparsity=0.7, cross_alpha=0.5),
                                  tmp_path / "x", write_card=False)
    assert [r.getMessage() for r in caplog.records if "already pruned" in r.getMessage()] == [warning]
    assert report.global_sparsity == pytest.approx(0.7, abs=0.01) and report.cross_term["alpha"] == 0.5
    capsys.readouterr()
    for i, extra in enumerate(([], ["--dtype", "float32"])):  # file to file (prune_checkpoint's warning), in memory
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_weightprune"):
            code = main(["prune", str(pruned), "--importance", str(run_dir), "--sparsity", "0.7", "--cross_alpha",
                         "0.5", "--output_dir", str(tmp_path / f"cli{i}"), *extra])
        said = [r.getMessage() for r in caplog.records if "already pruned" in r.getMessage()]
        assert code == 0 and said == [warning], said  # one wording on both paths, the keyword's for Python handlers
        shown = [line for line in capsys.readouterr().err.splitlines() if "already pruned" in line]
        assert shown == [f"WARNING hf_weightprune.publish.export: {warning.replace('cross_alpha=0.5', '--cross_alpha 0.5')}"]
        assert (tmp_path / f"cli{i}" / "sparsity.json").is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_weightprune"):
        prune_checkpoint(pruned, load_importance(run_dir), PruneConfig(sparsity=0.7), tmp_path / "again",
                         write_card=False)
    assert "already pruned" not in caplog.text


def test_inspect_says_the_folder_holds_a_cross_term_and_how_to_use_it(run, tmp_path, capsys):
    run_dir, _ = run
    n_cross, n = len(load_importance(run_dir).cross_terms()), len(load_importance(run_dir).names)
    assert main(["inspect", str(run_dir)]) == 0
    assert (f"cross term: {n_cross} of the {n} tracked weights hold the dense-to-pruned cross term of a "
            "PruneSchedule(cross_term=True) run; prune that run's dense teacher with --cross_alpha 0.25"
            in capsys.readouterr().out)
    plain = tmp_path / "plain"  # a folder without it says nothing about cross terms
    _dense().save_pretrained(plain)
    assert main(["inspect", str(run_dir), "--model", str(plain)]) == 0 and "cross term:" in capsys.readouterr().out
    train(tiny_llama(seed=3), [ImportanceCallback(ImportanceConfig(criterion="sparsegpt"))], tmp_path / "sym",
          max_steps=2)
    assert main(["inspect", str(tmp_path / "sym")]) == 0 and "cross term" not in capsys.readouterr().out


def test_the_card_states_the_asymmetric_sweep_and_cites_gptaq_and_qep_only_when_it_ran(run, tmp_path):
    run_dir, _ = run
    n_cross = len(load_importance(run_dir).cross_terms())
    cards = {}
    for name, alpha in (("cross", 0.5), ("zero", 0.0), ("plain", None)):
        model, report = _pruned(run_dir, PruneConfig(sparsity=0.5, block_size=8, cross_alpha=alpha))
        save_pruned(model, tmp_path / name, report=report)
        cards[name] = (tmp_path / name / "README.md").read_text()
    n_tensors = len(json.loads((tmp_path / "cross" / SPARSITY_NAME).read_text())["tensors"])
    assert 0 < n_cross < n_tensors  # down_proj had no cross term: the card says so
    assert (f"For {n_cross} of the pruned tensors the sweep solved the asymmetric objective" in cards["cross"]
            and "a share 0.5 of the correction (GPTAQ / QEP)" in cards["cross"]
            and f"the other {n_tensors - n_cross} had no cross term" in cards["cross"])
    assert "arXiv:2504.02692" in cards["cross"] and "arXiv:2504.09629" in cards["cross"]
    # the model pruned is the run's dense teacher (here its start), not the run's trained output: the card says where the statistics
    # came from and does not claim the weights were pruned after that training
    text = " ".join(cards["cross"].split())
    assert "The statistics were accumulated while a copy of the model was pruned and fine-tuned under distillation" in text
    assert "**Schedule**: one-shot, from the statistics of that pruning run." in text and "after training" not in text
    for name in ("zero", "plain"):  # alpha 0 is the symmetric sweep: no claim, no citation
        assert "asymmetric" not in cards[name] and "2504.02692" not in cards[name], name
