"""The output side: safetensors_io, atomic publishing of a pruned folder, card names, argument checks."""

from __future__ import annotations

import ast
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import hf_weightprune.files.safetensors_io as sio
from hf_weightprune import PruneConfig, PruneSchedule, load_importance, oneshot_importance, prune_
from hf_weightprune.files.pruned_files import load_sparsity
from hf_weightprune.io_utils import atomic_folder
from hf_weightprune.publish.card import render_model_card, structure_info, write_model_card
from hf_weightprune.publish.export import prune_checkpoint, save_pruned
from hf_weightprune.publish.hub import push_pruned_to_hub
from hf_weightprune.testing import save_importance_dir, tiny_llama
from hf_weightprune.tools.cli import main as cli_main
from hf_weightprune.tools.sweep import sweep
from hf_weightprune.train.holder import MaskHolder

PACKAGE = Path(__file__).resolve().parents[2] / "hf_weightprune"


def _pruned(sparsity: float, seed: int = 0):
    model = tiny_llama(seed=seed)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=sparsity), progress=False)
    return model, report


def _zeros_match_sparsity_json(folder: Path) -> float:
    """The fraction of zeros over the tensors `sparsity.json` lists, counted in the written weights; asserts that it
    is what `sparsity.json` says."""
    meta = load_sparsity(folder)
    weights = load_file(str(folder / "model.safetensors"))
    zeros = sum(int((weights[n] == 0).sum()) for n in meta["tensors"])
    numel = sum(weights[n].numel() for n in meta["tensors"])
    assert zeros / numel == pytest.approx(meta["global_sparsity"], abs=1e-9)
    return zeros / numel


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A tiny Llama saved as safetensors, and a magnitude importance folder for it."""
    root = tmp_path_factory.mktemp("dense")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "model")
    imp = oneshot_importance(model, "magnitude")
    save_importance_dir(str(root / "imp"), imp.state_dict(), config=imp.config, meta=imp.meta, shapes=imp.shapes)
    return root


# --------------------------------------------------------------------------- package structure


def test_no_module_imports_the_package_init():
    for path in PACKAGE.glob("*.py"):  # scorers/ imports its own registry from scorers/__init__, which is fine
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                # `from . import x` inside the package must name a submodule, never a name of __init__
                if node.module is None and node.level == 1:
                    here = path.parent
                    for alias in node.names:
                        assert (here / f"{alias.name}.py").is_file() or (here / alias.name).is_dir(), (path, alias.name)
                assert node.module != "hf_weightprune", path
    from hf_weightprune import __version__
    from hf_weightprune._version import __version__ as single

    assert __version__ == single


# --------------------------------------------------------------------------- safetensors_io


def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_read_header_refuses_bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, str(good), metadata={"format": "pt"})
    header = sio.read_header(good)
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"]["data_offsets"] == [24, 40] and header["__metadata__"] == {"format": "pt"}
    sio.check_complete(good)

    huge = tmp_path / "huge.safetensors"  # a length prefix larger than the file is refused before any read
    huge.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ValueError, match="bad header length"):
        sio.read_header(huge)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="bad header length"):
        sio.read_header(tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        sio.read_header(_raw_file(tmp_path / "notjson.safetensors", b"{not json"))
    with pytest.raises(ValueError, match="JSON list, not an object"):
        sio.read_header(_raw_file(tmp_path / "list.safetensors", b"[1, 2]"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sio.read_header(tmp_path / "missing.safetensors")

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"corrupt or truncated: \d+ bytes, header needs \d+"):
        sio.check_complete(cut)
    gap = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    with pytest.raises(ValueError, match="not where the header layout says"):
        sio.check_complete(_raw_file(tmp_path / "gap.safetensors", gap, b"\0" * 8))


def test_weight_map_single_sharded_and_missing(tmp_path):
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    single, sharded = sio.weight_map(tmp_path / "single"), sio.weight_map(tmp_path / "sharded")
    assert set(single) == set(sharded) and "model.layers.1.mlp.up_proj.weight" in single
    assert set(single.values()) == {"model.safetensors"} and len(set(sharded.values())) > 1
    assert sio.find_weights_file(tmp_path / "sharded").endswith("model.safetensors.index.json")
    weights = sio.CheckpointWeights(str(tmp_path / "sharded"), sharded, ["model.layers.1.mlp.up_proj.weight"])
    assert list(weights) == ["model.layers.1.mlp.up_proj.weight"] and len(weights) == 1
    assert torch.equal(weights["model.layers.1.mlp.up_proj.weight"], model.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(KeyError):
        weights["model.embed_tokens.weight"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        sio.weight_map(tmp_path / "empty")
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="no valid \"weight_map\""):
        sio.weight_map(tmp_path / "sharded")


def test_copy_shard_masked_zeroes_exactly_the_masked_elements(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(6, 8), "ids": torch.arange(10), "h": torch.randn(4, 4).to(torch.bfloat16)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(tensors, str(src))
    keep = torch.rand(6, 8) > 0.5
    seen = []

    def mask_of(name, shape):
        seen.append((name, shape))
        return (lambda t: t.masked_fill_(~keep, 0)) if name == "w" else None  # an in-place editor of the view

    buffer = sio.copy_shard_masked(str(src), str(dst), mask_of, bytearray())
    assert len(buffer) >= 6 * 8 * 4
    out = load_file(str(dst))
    assert torch.equal(out["w"], tensors["w"] * keep) and int((out["w"] == 0).sum()) == int((~keep).sum())
    assert torch.equal(out["ids"], tensors["ids"]) and torch.equal(out["h"], tensors["h"])
    assert sorted(n for n, _ in seen) == ["h", "ids", "w"] and dict(seen)["w"] == [6, 8]
    assert src.stat().st_size == dst.stat().st_size
    with pytest.raises(ValueError, match="cannot prune a tensor of dtype I64"):
        sio.copy_shard_masked(str(src), str(tmp_path / "x.safetensors"),
                              lambda n, s: lambda t: None, bytearray())


# --------------------------------------------------------------------------- two writers, one output


def test_atomic_folder_second_publisher_fails_and_the_first_stays_whole(tmp_path):
    out = tmp_path / "out"
    with (pytest.raises(FileExistsError, match="written by another process") as info,
          atomic_folder(str(out), overwrite=False) as first):
        Path(first, "a.txt").write_text("first")
        with atomic_folder(str(out), overwrite=False) as second:  # a second writer publishes first
            assert first != second  # a unique temporary folder per writer
            Path(second, "b.txt").write_text("second")
        Path(first, "c.txt").write_text("first")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left

    with atomic_folder(str(out), overwrite=True) as third:
        Path(third, "d.txt").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["d.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder, moved aside, is gone
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the umask's mode, not a temp folder's 0700


class _RendezvousTokenizer:
    """Stands in for a tokenizer: `save_pretrained` writes which writer this is, then waits for the other writer,
    so that both are inside their temporary folders at once and race to publish."""

    def __init__(self, tag: str, barrier: threading.Barrier):
        self.tag, self.barrier = tag, barrier

    def save_pretrained(self, folder):
        Path(folder, "writer.txt").write_text(self.tag)
        self.barrier.wait(timeout=120)


def test_two_concurrent_save_pruned_exactly_one_wins(tmp_path):
    out = tmp_path / "my-model"
    barrier = threading.Barrier(2)
    writers = {"low": _pruned(0.3, seed=1), "high": _pruned(0.7, seed=2)}
    results: dict[str, object] = {}

    def run(tag):
        model, report = writers[tag]
        try:
            results[tag] = save_pruned(model, out, report=report, tokenizer=_RendezvousTokenizer(tag, barrier))
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            results[tag] = e

    threads = [threading.Thread(target=run, args=(tag,)) for tag in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    winners = [tag for tag, r in results.items() if r == str(out)]
    losers = [r for r in results.values() if isinstance(r, Exception)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert isinstance(losers[0], FileExistsError) and "\n" not in str(losers[0])
    assert "written by another process" in str(losers[0])
    # The folder is the winner's, whole: its writer file, its sparsity.json, and weights with that many zeros
    assert (out / "writer.txt").read_text() == winners[0]
    achieved = _zeros_match_sparsity_json(out)
    assert achieved == pytest.approx(0.3 if winners[0] == "low" else 0.7, abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]


def test_concurrent_prune_checkpoint_writers_leave_one_consistent_folder(dense_checkpoint, tmp_path):
    out = tmp_path / "pruned"
    results = {}

    def run(sparsity):
        try:
            results[sparsity] = prune_checkpoint(dense_checkpoint / "model", load_importance(dense_checkpoint / "imp"),
                                                 PruneConfig(sparsity=sparsity), out, progress=False)
        except Exception as e:  # noqa: BLE001
            results[sparsity] = e

    threads = [threading.Thread(target=run, args=(s,)) for s in (0.25, 0.75)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    ok = [s for s, r in results.items() if not isinstance(r, Exception)]
    failed = [r for r in results.values() if isinstance(r, Exception)]
    assert len(ok) == 1 and len(failed) == 1, results
    assert isinstance(failed[0], FileExistsError) and "\n" not in str(failed[0])
    assert _zeros_match_sparsity_json(out) == pytest.approx(ok[0], abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


# --------------------------------------------------------------------------- card names


def _assert_card_named(folder: Path | str, name: str, *, model_index: bool = False) -> ModelCard:
    """`folder` (its README.md) or, given as a str, the card's text itself."""
    card = ModelCard.load(folder / "README.md") if isinstance(folder, Path) else ModelCard(folder)
    assert f"\n# {name.split('/')[-1]} (" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{name}")' in card.text
    assert ".tmp" not in card.content
    if model_index:
        assert card.data.model_name == name.split("/")[-1]
    return card


def test_every_writer_names_the_card_after_the_final_folder(dense_checkpoint, tmp_path, hub_server, monkeypatch,
                                                            capsys):
    model, report = _pruned(0.5)
    save_pruned(model, tmp_path / "my-model-50", report=report,
                eval_results={"dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "tiny"})
    _assert_card_named(tmp_path / "my-model-50", "my-model-50", model_index=True)

    prune_checkpoint(dense_checkpoint / "model", load_importance(dense_checkpoint / "imp"),
                     output_dir=tmp_path / "ckpt-50", progress=False)
    _assert_card_named(tmp_path / "ckpt-50", "ckpt-50")

    base = ["prune", str(dense_checkpoint / "model"), "--importance", str(dense_checkpoint / "imp")]
    assert cli_main([*base, "--output_dir", str(tmp_path / "cli-files")]) == 0  # file to file
    _assert_card_named(tmp_path / "cli-files", "cli-files")
    assert cli_main([*base, "--output_dir", str(tmp_path / "cli-model"), "--dtype", "float32"]) == 0  # model in memory
    _assert_card_named(tmp_path / "cli-model", "cli-model")

    # Pushing names the repo: the card this library wrote is re-rendered for it on the Hub; the local folder is the
    # push's input and keeps its card
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert cli_main(["push", str(tmp_path / "cli-files"), "--repo_id", "tester/cli-files-hub"]) == 0
    _assert_card_named(tmp_path / "cli-files", "cli-files")
    _assert_card_named(hub_server.files("tester/cli-files-hub")["README.md"].decode(), "tester/cli-files-hub")
    push_pruned_to_hub(tmp_path / "my-model-50", repo_id="tester/api-push", token=hub_server.token)
    _assert_card_named(tmp_path / "my-model-50", "my-model-50", model_index=True)
    card = _assert_card_named(hub_server.files("tester/api-push")["README.md"].decode(), "tester/api-push",
                              model_index=True)
    assert card.data.eval_results[0].metric_value == 3.5
    # A README the user wrote is never replaced
    (tmp_path / "ckpt-50" / "README.md").write_text("# My own card\n")
    push_pruned_to_hub(tmp_path / "ckpt-50", repo_id="tester/own-card", token=hub_server.token)
    assert hub_server.files("tester/own-card")["README.md"] == b"# My own card\n"
    assert not list(tmp_path.glob(".*"))  # no temporary folders left by any writer


# --------------------------------------------------------------------------- N:M labels


@pytest.mark.parametrize(("structure", "label", "tag"), [
    ("2:4", "2:4 semi-structured sparsity", "2:4-sparsity"),
    ("4:8", "4:8 semi-structured sparsity", "4:8-sparsity"),
    ("1:4", "1:4 semi-structured sparsity", "1:4-sparsity"),
])
def test_any_nm_pattern_gets_a_label(tmp_path, structure, label, tag):
    model = tiny_llama(seed=0)
    imp = oneshot_importance(model, "magnitude")
    report = prune_(model, imp, PruneConfig(sparsity=None, structure=structure), progress=False)
    save_pruned(model, tmp_path / "nm", report=report)
    card = ModelCard.load(tmp_path / "nm" / "README.md")
    n, m = (int(x) for x in structure.split(":"))
    assert structure_info(structure) == (label, tag, f"{m - n} of every {m} consecutive weights in a row are zero")
    assert tag in card.data.tags and f"# nm ({label})" in card.text
    assert f"{m - n} of every {m} consecutive weights in a row are zero" in card.text
    assert _zeros_match_sparsity_json(tmp_path / "nm") == pytest.approx(1 - n / m)


def test_card_ignores_a_readme_with_broken_front_matter(tmp_path):
    model, report = _pruned(0.5)
    save_pruned(model, tmp_path / "out", report=report, write_card=False)
    (tmp_path / "out" / "README.md").write_text("---\nlicense: [unclosed\n---\n# hi\n")
    card = render_model_card(tmp_path / "out", license=None)
    assert card.data.license is None and "hf-weightprune" in card.data.tags


# --------------------------------------------------------------------------- argument types, before any work


def test_save_pruned_schedule_object_or_dict_and_state_dict_refused(tmp_path):
    model, report = _pruned(0.5)
    schedule = PruneSchedule(final_sparsity=0.5, start=2, end=8, every_n_steps=2, ramp="linear")
    save_pruned(model, tmp_path / "obj", report=report, schedule=schedule)
    save_pruned(model, tmp_path / "dict", report=report, schedule=schedule.to_dict())
    for name in ("obj", "dict"):
        assert load_sparsity(tmp_path / name)["schedule"]["final_sparsity"] == 0.5
        text = (tmp_path / name / "README.md").read_text()
        assert "gradual pruning from 0.0% to 50.0% sparsity between steps 2 and 8, every 2 steps, linear ramp" in text
    with pytest.raises(ValueError, match=r"MaskHolder.state_dict\(\).*pass the PruneSchedule itself"):
        save_pruned(model, tmp_path / "state", report=report, schedule=MaskHolder(schedule).state_dict())
    with pytest.raises(ValueError, match=r"schedule lacks \['ramp'\]"):
        save_pruned(model, tmp_path / "partial", report=report,
                    schedule={k: v for k, v in schedule.to_dict().items() if k != "ramp"})
    with pytest.raises(TypeError, match="schedule must be a PruneSchedule, its to_dict"):
        save_pruned(model, tmp_path / "list", report=report, schedule=[0.5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict", "obj"]  # refused before anything was written


def test_card_states_the_recovery_schedule_and_the_distillation_it_was_trained_with(tmp_path):
    from hf_weightprune import DistillConfig

    model, report = _pruned(0.5)
    teacher_dir = tmp_path / "machine" / "dense-teacher"
    teacher_dir.mkdir(parents=True)
    hold = PruneSchedule(mode="hold", masks_from=_masks_folder(tmp_path))
    distill = DistillConfig(teacher=str(teacher_dir), alpha=0.3, temperature=4.0, hidden_weight=1.0,
                            teacher_device="cpu")
    save_pruned(model, tmp_path / "hold", report=report, schedule=hold, distillation=distill)
    info = load_sparsity(tmp_path / "hold")
    assert info["schedule"]["mode"] == "hold"
    # a local teacher is recorded relative to the pruned folder (no absolute path of this machine in the folder)
    assert info["distillation"] == {"teacher": "../machine/dense-teacher", "teacher_is_local": True, "alpha": 0.3,
                                    "temperature": 4.0, "hidden_weight": 1.0, "teacher_dtype": None}
    assert (tmp_path / "hold" / info["distillation"]["teacher"]).resolve() == teacher_dir.resolve()
    assert info["schedule"]["masks_from"] == "../masks"
    assert "end" not in info["schedule"] and "ramp" not in info["schedule"]  # a hold runs no ramp
    save_pruned(model, tmp_path / "hold-dict", report=report, schedule=hold.to_dict())  # its dict is accepted as is
    assert load_sparsity(tmp_path / "hold-dict")["schedule"] == info["schedule"]
    text = (tmp_path / "hold" / "README.md").read_text()
    assert "**Schedule**: pruned once, then fine-tuned with that mask held (a recovery fine-tune)." in text
    assert "gradual pruning" not in text  # the old card described a hold schedule as a ramp from 0%
    assert ("**Distillation**: trained against the local checkpoint `dense-teacher` as teacher, loss "
            "`(1 - alpha) * CE + alpha * T^2 * KL` with alpha 0.3, T 4.0, plus 1.0 x SquareHead's") in text
    assert str(tmp_path) not in text  # no machine path on a card meant for the Hub

    # the default teacher, a gradual schedule in fractions of training, distillation given as its dict
    ramp = PruneSchedule(final_sparsity=0.5, start=0.1, end=0.8)
    save_pruned(model, tmp_path / "ramp", report=report, schedule=ramp,
                distillation=DistillConfig(alpha=0.5).to_dict())
    text = (tmp_path / "ramp" / "README.md").read_text()
    assert "gradual pruning from 0.0% to 50.0% sparsity from 10% to 80% of training, every 10 steps, cubic ramp" in text
    assert "trained against a frozen copy of the model as training began as teacher" in text
    assert "SquareHead" not in text.split("**Distillation**")[1].split("\n")[0]  # hidden_weight 0: logits only
    # start and end of different kinds: the default start=0.0 (a fraction) with an end step
    save_pruned(model, tmp_path / "mixed", report=report, schedule=PruneSchedule(final_sparsity=0.5, end=8))
    text = (tmp_path / "mixed" / "README.md").read_text()
    assert "gradual pruning from 0.0% to 50.0% sparsity from 0% of training to step 8, every 10 steps" in text
    with pytest.raises(TypeError, match="save_pruned: distillation must be a DistillConfig, its to_dict"):
        save_pruned(model, tmp_path / "bad", report=report, distillation=0.5)
    with pytest.raises(ValueError, match="alpha must be a float in"):
        save_pruned(model, tmp_path / "bad", report=report, distillation={"alpha": 2.0})
    assert not (tmp_path / "bad").exists()


def _masks_folder(tmp_path):
    model, report = _pruned(0.5)
    save_pruned(model, tmp_path / "masks", report=report, write_card=False)
    return str(tmp_path / "masks")


def test_public_entry_points_check_types_first(dense_checkpoint, tmp_path):
    model, report = _pruned(0.5)
    imp_dir = dense_checkpoint / "imp"
    cases = [
        (lambda: save_pruned(model, tmp_path / "a", report=report.__dict__),
         "save_pruned: report must be the PruningReport that prune_ returned; got dict"),
        (lambda: save_pruned(model.state_dict(), tmp_path / "a", report=report),
         "save_pruned: model must be the pruned model (torch.nn.Module)"),
        (lambda: save_pruned(model, 42, report=report), "save_pruned: output_dir must be a folder path"),
        (lambda: save_pruned(model, tmp_path / "a", report=report, overwrite="yes"),
         "save_pruned: overwrite must be a bool; got str 'yes'"),
        (lambda: prune_checkpoint(dense_checkpoint / "model", str(imp_dir), output_dir=tmp_path / "a"),
         "prune_checkpoint: importance must be an Importance from load_importance"),
        (lambda: prune_checkpoint(dense_checkpoint / "model", load_importance(imp_dir), 0.5, tmp_path / "a"),
         "prune_checkpoint: config must be a PruneConfig or None; got float"),
        (lambda: push_pruned_to_hub(tmp_path / "a", repo_id=["tester", "x"]),
         "push_pruned_to_hub: repo_id must be a Hub repo id"),
        (lambda: push_pruned_to_hub(tmp_path / "a", repo_id="tester/x", include_importance="yes"),
         "push_pruned_to_hub: include_importance must be a bool"),
        (lambda: sweep(dense_checkpoint / "model", None, "data.txt", sparsities="0.5"),
         "sweep: sparsities must be a list of floats"),
        (lambda: sweep(dense_checkpoint / "model", None, "data.txt", baselines="magnitude"),
         "sweep: baselines must be a list of one-shot criteria"),
        (lambda: sweep(dense_checkpoint / "model", None, "data.txt", seq_len=True),
         "sweep: seq_len must be an int; got bool"),
        (lambda: load_sparsity(3), "load_sparsity: path must be a folder path"),
        (lambda: render_model_card(None), "render_model_card: output_dir must be a folder path"),
        (lambda: write_model_card(tmp_path, repo_id=7), "write_model_card: repo_id must be a str or None; got int"),
        (lambda: write_model_card(tmp_path, repo="x"), "write_model_card: unknown argument(s) ['repo']"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written by any of them


def test_load_sparsity_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparsity(tmp_path / "nope")
    (tmp_path / "dense").mkdir()
    with pytest.raises(ValueError, match="not a pruned checkpoint"):  # also a FileNotFoundError, as it was
        load_sparsity(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="not a pruned checkpoint"):
        load_sparsity(tmp_path / "dense")
    (tmp_path / "dense" / "sparsity.json").write_text(json.dumps({"structure": "unstructured"}))
    with pytest.raises(ValueError, match="not a valid hf-weightprune sparsity report"):
        load_sparsity(tmp_path / "dense")


def test_prune_checkpoint_takes_config_where_prune_does_and_refuses_the_old_order(dense_checkpoint, tmp_path):
    imp = load_importance(dense_checkpoint / "imp")
    new = prune_checkpoint(dense_checkpoint / "model", imp, PruneConfig(sparsity=0.25), tmp_path / "new", progress=False)
    assert new.target_sparsity == 0.25 and new.tensors
    # The (model_dir, importance, output_dir, config) order of 0.1's first drafts is refused before any work.
    with pytest.raises(TypeError, match="^prune_checkpoint: output_dir must be a folder path .*; got PruneConfig"):
        prune_checkpoint(dense_checkpoint / "model", imp, tmp_path / "old", PruneConfig(sparsity=0.25), progress=False)
    assert not (tmp_path / "old").exists()
    with pytest.raises(TypeError, match="prune_checkpoint: output_dir is required"):
        prune_checkpoint(dense_checkpoint / "model", imp, PruneConfig())


def test_a_folder_with_both_layouts_is_read_as_transformers_loads_it(dense_checkpoint, tmp_path):
    # A snapshot of a repo the Trainer pushed twice (single file, then shards) keeps both: from_pretrained loads
    # model.safetensors, so file-to-file pruning must read that one too (it read the index's shards: another model).
    import shutil

    from transformers import AutoModelForCausalLM

    both = tmp_path / "both"
    shutil.copytree(dense_checkpoint / "model", both)
    other = tmp_path / "other"
    tiny_llama(seed=7).save_pretrained(other, max_shard_size="20KB")
    for f in other.glob("model*"):
        shutil.copy(f, both / f.name)
    assert (both / sio.INDEX_NAME).is_file() and (both / sio.SAFETENSORS_NAME).is_file()
    assert sio.find_weights_file(both) == str(both / sio.SAFETENSORS_NAME)

    imp = load_importance(dense_checkpoint / "imp")
    prune_checkpoint(both, imp, PruneConfig(sparsity=0.5), tmp_path / "file", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(both)
    prune_(loaded, imp, PruneConfig(sparsity=0.5), progress=False)
    assert not (tmp_path / "file" / sio.INDEX_NAME).exists()  # the stale index's shards were not written
    pruned = load_file(tmp_path / "file" / sio.SAFETENSORS_NAME)
    for name, tensor in loaded.state_dict().items():
        if name in pruned:
            assert torch.equal(pruned[name], tensor), name
    assert torch.equal(pruned["model.layers.0.mlp.down_proj.weight"], loaded.model.layers[0].mlp.down_proj.weight)
