"""Model card and Hub publishing, against the loopback Hub server (real `huggingface_hub` HTTP calls)."""

import json
import logging
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_weightprune.files.pruned_files import load_sparsity
from hf_weightprune.publish.card import render_model_card, write_model_card
from hf_weightprune.publish.hub import push_pruned_to_hub
from tests.helpers import training_args

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_pruned_llama(
    folder: Path,
    *,
    structure: str = "unstructured",
    eval_report: bool = True,
    sweep: bool = False,
    base_model: str | None = "meta-llama/Llama-3.2-1B",
    importance_path: str | None = None,
    structured: dict | None = None,
    schedule: dict | None = None,
) -> LlamaForCausalLM:
    """Write what `save_pruned` writes: a tiny Llama with half of each Linear weight zeroed, plus `sparsity.json`."""
    model = tiny_llama()
    tensors = {}
    pruned_numel = zeros = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
                weight[weight.abs() <= threshold] = 0.0
                n_zero = int((weight == 0).sum())
                tensors[f"{name}.weight"] = {
                    "shape": list(weight.shape),
                    "numel": weight.numel(),
                    "sparsity": n_zero / weight.numel(),
                }
                pruned_numel += weight.numel()
                zeros += n_zero
    model.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    report = {
        "format_version": 1,
        "library": "hf-weightprune",
        "library_version": "0.1.0",
        "structure": structure,
        "scope": "global",
        "target_sparsity": 0.5,
        "global_sparsity": zeros / pruned_numel,
        "model_sparsity": zeros / total,
        "criterion": "temporal_magnitude",
        "importance": {
            "path": importance_path or str(folder / "importance"),
            "step": 120,
            "num_samples": 120,
            "criterion": "temporal_magnitude",
            "settings": {"every_n_steps": 1, "window": None},
        },
        "base_model": base_model,
        "tensors": tensors,
        "structured": structured,
        "schedule": schedule,
        # Both models evaluated at step 120 on the same 4096 tokens: the card compares only such numbers.
        "eval": {"dense_loss": 3.1, "pruned_loss": 3.3, "dataset": "data/kjv/valid.txt", "tokens": 4096, "step": 120}
        if eval_report else None,
    }
    (folder / "sparsity.json").write_text(json.dumps(report, indent=2))
    if sweep:
        rows = [
            {"criterion": "temporal_magnitude", "sparsity": s, "loss": 3.1 + s, "perplexity": math.exp(3.1 + s)}
            for s in (0.0, 0.25, 0.5)
        ]
        (folder / "sweep.json").write_text(json.dumps(rows))
        (folder / "sweep.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return model


def write_fake_importance(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "importance_config.json").write_text(json.dumps({"criterion": "temporal_magnitude", "step": 120}))
    tensors = {"model.layers.0.mlp.down_proj.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    save_file(tensors, str(folder / "importance.safetensors"))
    return tensors


def front_matter(readme_text: str) -> dict:
    assert readme_text.startswith("---\n")
    return yaml.safe_load(readme_text.split("---\n")[1])


def logits(model, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --------------------------------------------------------------------------- the loopback server itself


def test_loopback_hub_is_the_one_called(hub_server, tmp_path):
    api = HfApi()
    assert api.endpoint == hub_server.endpoint == constants.ENDPOINT
    assert api.whoami(token=hub_server.token)["name"] == "tester"
    url = api.create_repo("tester/private", private=True, token=hub_server.token)
    assert url == f"{hub_server.endpoint}/tester/private"
    # exist_ok: the server answers 409 with the url, like the Hub
    assert api.create_repo("tester/private", exist_ok=True, token=hub_server.token) == url
    with pytest.raises(Exception, match="409"):
        api.create_repo("tester/private", token=hub_server.token)

    (tmp_path / "up" / "a" / "b").mkdir(parents=True)
    (tmp_path / "up" / "top.txt").write_text("top")
    (tmp_path / "up" / "a" / "b" / "deep.txt").write_text("deep")
    info = api.upload_folder(repo_id="tester/private", folder_path=tmp_path / "up", token=hub_server.token)
    assert info.oid == hub_server.get_repo("tester/private").branches["main"]
    assert sorted(api.list_repo_files("tester/private", token=hub_server.token)) == [
        ".gitattributes",
        "a/b/deep.txt",
        "top.txt",
    ]
    shallow = [e.path for e in api.list_repo_tree("tester/private", token=hub_server.token)]
    assert sorted(shallow) == [".gitattributes", "a", "top.txt"]
    model_info = api.model_info("tester/private", token=hub_server.token)
    assert model_info.sha == info.oid and model_info.private
    assert {s.rfilename for s in model_info.siblings} == {".gitattributes", "a/b/deep.txt", "top.txt"}

    path = hf_hub_download("tester/private", "a/b/deep.txt", token=hub_server.token)
    assert Path(path).read_text() == "deep"
    # A private repo is invisible without the token
    with pytest.raises(Exception, match="401"):
        api.model_info("tester/private", token=False)
    assert any(e["path"].startswith("/tester/private/resolve/") for e in hub_server.requests_log)


def test_trainer_push_to_hub_reaches_the_loopback_hub(hub_server, tmp_path):
    # Trainer(push_to_hub=True) uploads checkpoints with `upload_folder(run_as_future=True)` through the same server
    from transformers import Trainer

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = training_args(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                         push_to_hub=True, hub_model_id="tester/trainer-push", hub_token=hub_server.token,
                         save_strategy="steps", save_steps=1)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Tokens())
    trainer.train()
    trainer.push_to_hub()
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.files("tester/trainer-push"))
    assert hub_server.token not in json.dumps(hub_server.requests_log)


# --------------------------------------------------------------------------- push + download round trip


@pytest.mark.parametrize("xet", [True, False], ids=["upload-pipeline", "create-commit"])
def test_push_download_load_round_trip(hub_server, tmp_path, monkeypatch, xet):
    # With hf_xet installed, upload_folder streams through its pipeline; without, through create_commit
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    out = tmp_path / "pruned"
    model = save_pruned_llama(out, sweep=True)
    write_fake_importance(out / "importance")

    commit_url = push_pruned_to_hub(out, repo_id="tester/tiny-pruned", token=hub_server.token, private=True)

    head = hub_server.get_repo("tester/tiny-pruned").branches["main"]
    assert commit_url == f"{hub_server.endpoint}/tester/tiny-pruned/commit/{head}"
    assert not (out / "README.md").exists()  # the card is rendered for the upload; the folder is the push's input
    files = hub_server.files("tester/tiny-pruned")
    assert {"config.json", "model.safetensors", "sparsity.json", "README.md", "sweep.png", "sweep.json"} <= set(files)
    assert not any(p.startswith("importance") for p in files)  # not uploaded by default

    local = snapshot_download("tester/tiny-pruned", token=hub_server.token)
    reloaded = AutoModelForCausalLM.from_pretrained(local).eval()
    assert torch.equal(logits(reloaded), logits(model))
    down_proj = reloaded.model.layers[0].mlp.down_proj.weight
    assert (down_proj == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)

    card = ModelCard.load(Path(local) / "README.md")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert "hf-weightprune" in card.data.tags and "unstructured-sparsity" in card.data.tags
    assert "mlp.down_proj" in card.text and "](sweep.png)" in card.text
    assert 'from_pretrained("tester/tiny-pruned")' in card.text

    # A second push of the same folder changes nothing and still answers with the head commit
    again = push_pruned_to_hub(out, repo_id="tester/tiny-pruned", token=hub_server.token)
    assert again.endswith(hub_server.get_repo("tester/tiny-pruned").branches["main"])


def test_push_to_branch(hub_server, tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out, eval_report=False)
    push_pruned_to_hub(out, repo_id="tester/branchy", token=hub_server.token, revision="sparse-50")
    repo = hub_server.get_repo("tester/branchy")
    assert set(repo.branches) == {"main", "sparse-50"}
    assert "model.safetensors" in hub_server.files("tester/branchy", "sparse-50")
    assert "model.safetensors" not in hub_server.files("tester/branchy", "main")


# --------------------------------------------------------------------------- importance upload


def test_include_importance_round_trip(hub_server, tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    expected = write_fake_importance(out / "importance")

    push_pruned_to_hub(out, repo_id="tester/with-importance", token=hub_server.token, include_importance=True)

    local = snapshot_download("tester/with-importance", token=hub_server.token, allow_patterns=["importance/*"])
    fetched = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert fetched == ["importance/importance.safetensors", "importance/importance_config.json"]
    loaded = load_file(str(Path(local) / "importance" / "importance.safetensors"))
    assert torch.equal(loaded["model.layers.0.mlp.down_proj.weight"], expected["model.layers.0.mlp.down_proj.weight"])


def test_include_importance_from_recorded_path(hub_server, tmp_path):
    elsewhere = tmp_path / "run" / "importance"
    write_fake_importance(elsewhere)
    out = tmp_path / "pruned"
    save_pruned_llama(out, importance_path=str(elsewhere))

    push_pruned_to_hub(out, repo_id="tester/recorded", token=hub_server.token, include_importance=True)
    files = hub_server.files("tester/recorded")
    assert {"importance/importance.safetensors", "importance/importance_config.json", "model.safetensors"} <= set(
        files
    )


def _commits_on_main(hub_server, repo_id: str) -> int:
    repo, n = hub_server.get_repo(repo_id), 0
    oid = repo.branches["main"]
    while oid is not None:
        oid, n = repo.commits[oid].parent, n + 1
    return n


@pytest.mark.parametrize("include", [False, True], ids=["without-importance", "with-importance"])
def test_uploaded_sparsity_json_names_no_local_folder(hub_server, tmp_path, include):
    # sparsity.json records the importance folder by absolute path (push --include_importance works from any
    # folder); the Hub copy must not publish the uploader's disk layout. One commit either way.
    elsewhere = tmp_path / "home-of-alice" / "run" / "importance"
    write_fake_importance(elsewhere)
    out = tmp_path / "pruned"
    save_pruned_llama(out, importance_path=str(elsewhere),
                      schedule={"mode": "hold", "masks_from": str(tmp_path / "home-of-alice" / "pruned-50")})
    local_before = (out / "sparsity.json").read_bytes()
    (out / ".model.safetensors.x1y2.tmp").write_bytes(b"torn")  # left by interrupted writes: never uploaded
    (out / ".sub.k3.tmp").mkdir()
    (out / ".sub.k3.tmp" / "part.bin").write_bytes(b"torn")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    repo_id = f"tester/no-local-path-{include}"

    push_pruned_to_hub(out, repo_id=repo_id, token=hub_server.token, include_importance=include)

    files = hub_server.files(repo_id)
    uploaded = json.loads(files["sparsity.json"])
    assert "home-of-alice" not in files["sparsity.json"].decode() and str(tmp_path) not in files["README.md"].decode()
    assert uploaded["importance"]["path"] == ("importance" if include else None)
    assert uploaded["schedule"] == {"mode": "hold", "masks_from": "pruned-50"}
    assert uploaded["importance"]["step"] == 120 and uploaded["tensors"] == json.loads(local_before)["tensors"]
    assert (out / "sparsity.json").read_bytes() == local_before  # the local file is the user's: unchanged
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing written into the folder (no README.md either: the card is uploaded only)
    assert not any(".tmp" in p for p in files), sorted(files)
    assert f"# {repo_id.split('/')[1]}" in files["README.md"].decode() or repo_id in files["README.md"].decode()
    assert any(p.startswith("importance/") for p in files) == include
    assert _commits_on_main(hub_server, repo_id) == 2  # the repo's initial commit + one push

    # The Hub copy reads back as a pruned checkpoint
    local = snapshot_download(repo_id, token=hub_server.token)
    assert load_sparsity(local)["importance"]["path"] == uploaded["importance"]["path"]


def _rewrite_sparsity(folder: Path, **changes) -> None:
    payload = json.loads((folder / "sparsity.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(payload.get(key), dict):
            payload[key] = {**payload[key], **value}
        else:
            payload[key] = value
    (folder / "sparsity.json").write_text(json.dumps(payload, indent=2))


def test_uploaded_files_name_no_windows_or_dataset_path(hub_server, tmp_path):
    # A sparsity.json written on Windows, an absolute evaluation text and a local base model: the Hub copy and the
    # card keep only the last part of each (or drop the local base model).
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    _rewrite_sparsity(out, importance={"path": "C:\\Users\\alice\\run\\importance"},
                      schedule={"mode": "hold", "masks_from": "C:\\Users\\alice\\pruned-50\\"},
                      eval={"dataset": "/home/alice/secret/valid.txt", "dense_dataset": "D:\\alice\\dense.txt"},
                      distillation={"teacher": "C:\\Users\\alice\\dense-teacher", "alpha": 0.5, "temperature": 2.0},
                      base_model="/home/alice/models/llama")
    push_pruned_to_hub(out, repo_id="tester/windows", token=hub_server.token)
    files = hub_server.files("tester/windows")
    for name in ("sparsity.json", "README.md"):
        assert "alice" not in files[name].decode(), name
    uploaded = json.loads(files["sparsity.json"])
    assert uploaded["importance"]["path"] is None and uploaded["schedule"]["masks_from"] == "pruned-50"
    assert uploaded["eval"]["dataset"] == "valid.txt" and uploaded["eval"]["dense_dataset"] == "dense.txt"
    assert uploaded["base_model"] is None and "valid.txt" in files["README.md"].decode()
    assert uploaded["distillation"]["teacher"] == "dense-teacher"
    assert "trained against the local checkpoint `dense-teacher` as teacher" in files["README.md"].decode()


@pytest.mark.parametrize("include", [False, True], ids=["without-importance", "with-importance"])
def test_statistics_inside_the_folder_are_uploaded_only_as_importance(hub_server, tmp_path, include):
    # Recorded in sparsity.json under another name inside the folder: never uploaded under that name, and as
    # importance/ only when asked for.
    out = tmp_path / "pruned"
    save_pruned_llama(out, importance_path=str(out / "stats"))
    write_fake_importance(out / "stats")
    repo_id = f"tester/inside-{include}"
    push_pruned_to_hub(out, repo_id=repo_id, token=hub_server.token, include_importance=include)
    files = hub_server.files(repo_id)
    assert not any(p.startswith("stats") for p in files), sorted(files)
    assert sorted(p for p in files if p.startswith("importance")) == (
        ["importance/importance.safetensors", "importance/importance_config.json"] if include else [])


def test_symlinked_importance_is_uploaded(hub_server, tmp_path):
    elsewhere = tmp_path / "run" / "importance"
    write_fake_importance(elsewhere)
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    (out / "importance").symlink_to(elsewhere, target_is_directory=True)
    push_pruned_to_hub(out, repo_id="tester/linked", token=hub_server.token, include_importance=True)
    files = hub_server.files("tester/linked")
    assert files["importance/importance.safetensors"] == (elsewhere / "importance.safetensors").read_bytes()
    assert json.loads(files["sparsity.json"])["importance"]["path"] == "importance"


def test_a_card_the_user_wrote_under_is_uploaded_as_is(hub_server, tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    write_model_card(out, repo_id="pruned")
    (out / "README.md").write_text((out / "README.md").read_text() + "\n## My notes\n\nEvaluated by hand.\n")
    push_pruned_to_hub(out, repo_id="tester/own-notes", token=hub_server.token)
    assert hub_server.files("tester/own-notes")["README.md"] == (out / "README.md").read_bytes()


def test_a_second_push_replaces_the_first_ones_weights_and_statistics(hub_server, tmp_path):
    # The first push: one model.safetensors, importance/ with a rank file, a sweep; the user adds files by hand
    repo_id = "tester/re-pushed"
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    first = tmp_path / "first"
    save_pruned_llama(first, sweep=True)
    write_fake_importance(first / "importance")
    save_file({"x": torch.ones(2)}, str(first / "importance" / "importance-rank1.safetensors"))
    push_pruned_to_hub(first, repo_id=repo_id, token=hub_server.token, include_importance=True)
    users = {"notes.md": b"mine", "variant/model.safetensors": b"other", "adapter_model.safetensors": b"adapter",
             "model_int8.safetensors": b"int8", "model.fp16.safetensors": b"fp16", "pytorch_model_ema.bin": b"ema"}
    for path, content in users.items():
        api.upload_file(path_or_fileobj=content, path_in_repo=path, repo_id=repo_id)
    # The second: another model, saved in shards, no sweep, no statistics
    second = tmp_path / "second"
    save_pruned_llama(second, eval_report=False)
    model = tiny_llama(seed=3)
    (second / "model.safetensors").unlink()
    model.save_pretrained(second, max_shard_size="20KB")
    assert (second / "model.safetensors.index.json").is_file() and not (second / "model.safetensors").exists()
    before = _commits_on_main(hub_server, repo_id)

    push_pruned_to_hub(second, repo_id=repo_id, token=hub_server.token)

    assert _commits_on_main(hub_server, repo_id) == before + 1  # deletions and additions in one commit
    files = hub_server.files(repo_id)
    # A stale model.safetensors beside the new shards is what from_pretrained would have loaded
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert not {"sweep.json", "sweep.png"} & set(files)
    assert {p: files.get(p) for p in users} == users  # not a full model's weights by save_pretrained's names: kept
    # No statistics uploaded this time: the earlier ones stay (the user may re-prune from them)
    assert {"importance/importance.safetensors", "importance/importance-rank1.safetensors"} <= set(files)
    local = snapshot_download(repo_id, token=hub_server.token)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(local).eval()), logits(model.eval()))

    # A third push with statistics: they replace the earlier ones, whose extra rank file would be read with them
    write_fake_importance(second / "importance")
    push_pruned_to_hub(second, repo_id=repo_id, token=hub_server.token, include_importance=True)
    assert sorted(p for p in hub_server.files(repo_id) if p.startswith("importance/")) == [
        "importance/importance.safetensors", "importance/importance_config.json"]


def test_a_push_that_would_delete_refuses_to_commit_over_a_push_it_did_not_see(hub_server, tmp_path, monkeypatch):
    # The deletions come from a listing of the branch's head; the commit names that head as its parent, so a push
    # landing in between makes the Hub refuse it (HTTP 412) rather than delete files the listing did not see.
    from huggingface_hub.errors import HfHubHTTPError

    from hf_weightprune.publish import hub

    repo_id = "tester/raced"
    first = tmp_path / "first"
    save_pruned_llama(first, sweep=True)
    push_pruned_to_hub(first, repo_id=repo_id, token=hub_server.token)
    second = tmp_path / "second"
    save_pruned_llama(second)  # no sweep: the first push's sweep files are stale
    listed = hub._stale_files

    def list_then_someone_pushes(api, *args, **kwargs):
        result = listed(api, *args, **kwargs)
        api.upload_file(path_or_fileobj=b"late", path_in_repo="late.md", repo_id=repo_id)
        return result

    monkeypatch.setattr(hub, "_stale_files", list_then_someone_pushes)
    with pytest.raises(HfHubHTTPError, match="412"):
        push_pruned_to_hub(second, repo_id=repo_id, token=hub_server.token)
    assert {"sweep.json", "sweep.png", "late.md"} <= set(hub_server.files(repo_id))


def test_include_importance_missing(tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out, importance_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="importance folder"):
        push_pruned_to_hub(out, repo_id="tester/x", token="unused", include_importance=True)


def test_include_importance_of_an_in_memory_importance_says_what_to_do(tmp_path):
    """A prune from `cb.importance()` records no importance folder: the refusal says so and names the fix, rather
    than "neither ... exists" of a single path."""
    from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned

    out, model = tmp_path / "pruned", tiny_llama()
    save_pruned(model, out, report=prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5),
                                          progress=False))
    assert load_sparsity(out)["importance"]["path"] is None
    with pytest.raises(FileNotFoundError, match=r"records no importance folder \(the prune used an importance in "
                       r"memory\): copy the importance folder it came from to that path") as error:
        push_pruned_to_hub(out, repo_id="tester/x", token="unused", include_importance=True)
    assert "neither" not in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- auth and token hygiene


def test_wrong_token_is_a_clear_error(hub_server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    write_model_card(out, repo_id="pruned")  # the card save_pruned writes, named after the folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wrong = "hf_wrong_" + "x" * 30
    with pytest.raises(PermissionError, match="refused access to 'tester/denied'") as info:
        push_pruned_to_hub(out, repo_id="tester/denied", token=wrong)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a refused push leaves the card as it was
    assert wrong not in str(info.value) and hub_server.token not in str(info.value)
    assert ("model", "tester/denied") not in hub_server.repos
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text, json.dumps(hub_server.requests_log)):
        assert wrong not in text


def test_missing_token_is_a_clear_error(hub_server, tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out)
    with pytest.raises(PermissionError, match="no Hub token was found"):
        push_pruned_to_hub(out, repo_id="tester/anon")


def test_token_never_leaks(hub_server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "pruned"
    save_pruned_llama(out, sweep=True)
    write_fake_importance(out / "importance")
    push_pruned_to_hub(out, repo_id="tester/secret", token=hub_server.token, private=True, include_importance=True)
    snapshot_download("tester/secret", token=hub_server.token)

    token = hub_server.token
    captured = capsys.readouterr()
    assert token not in captured.out and token not in captured.err and token not in caplog.text
    assert any(e["auth"] == "ok" for e in hub_server.requests_log)
    assert token not in json.dumps(hub_server.requests_log)
    for path, content in hub_server.files("tester/secret").items():
        assert token.encode() not in content, path
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- bad folders


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_pruned_to_hub(tmp_path / "nope", repo_id="tester/x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_model_card(tmp_path / "nope")


def test_not_a_pruned_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a pruned checkpoint"):
        push_pruned_to_hub(tmp_path / "dense", repo_id="tester/x")
    with pytest.raises(ValueError, match="not a pruned checkpoint"):
        write_model_card(tmp_path / "dense")


# --------------------------------------------------------------------------- the card


def test_card_front_matter_and_body(tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(
        out,
        sweep=True,
        schedule={
            "initial_sparsity": 0.0,
            "final_sparsity": 0.6,
            "start": 10,
            "end": 80,
            "every_n_steps": 10,
            "ramp": "cubic",
        },
    )
    path = write_model_card(out, license="llama3.2", repo_id="tester/card")
    text = path.read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["license"] == "llama3.2"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) >= {"pruned", "sparsity", "hf-weightprune", "unstructured-sparsity", "temporal-magnitude"}
    # a local file is no Hub dataset: no model-index (its dataset.type would link hf.co/datasets/valid.txt); the
    # results with a Hub dataset id: tests/publish/test_card_meta.py
    assert "model-index" not in meta and ModelCard.load(path).data.eval_results is None
    assert "Evaluated on `valid.txt`, 4,096 tokens: dense model at step 120 vs pruned model at step 120" in text
    # the dense model at step 120 is not the base model as published: the row names its step, not the Hub id
    assert "| Dense (step 120) | 3.1000 |" in text and "| Dense (meta-llama" not in text and "data/kjv" not in text

    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert f"| `{module}` | 2 |" in text  # two layers each
    # The criterion's formula and paper come from its scorer class (the one source)
    assert "**Criterion**: `temporal_magnitude`: `sum_t t*|w(t)| / sum_t t`." in text
    # References: the methods this model was made with (the criterion's paper, the gradual schedule), nothing else
    refs = text.split("## References")[1].split("<sub>")[0].strip().splitlines()
    assert refs == ["- `temporal_magnitude` criterion: [arXiv:2502.17071](https://arxiv.org/abs/2502.17071)",
                    "- Gradual pruning (cubic schedule): Zhu & Gupta 2017, [arXiv:1710.01878](https://arxiv.org/abs/1710.01878)"]
    assert "| `wanda` |" not in text and "2306.11695" not in text and "2310.04573" not in text
    assert "between steps 10 and 80" in text and "cubic" in text
    assert "![Eval loss vs. sparsity](sweep.png)" in text
    assert "save\nneither memory nor time" in text or "save neither memory nor time" in text
    assert 'AutoModelForCausalLM.from_pretrained("tester/card")' in text
    assert not list(out.glob(".*.tmp"))  # atomic write left nothing behind


def test_card_without_eval_or_plot(tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out, eval_report=False, base_model=None)
    card = render_model_card(out)
    meta = front_matter(str(card))
    assert "model-index" not in meta and "base_model" not in meta and "license" not in meta
    assert "sweep.png" not in card.text and "## Evaluation" not in card.text


def test_card_license_from_existing_readme(tmp_path):
    out = tmp_path / "pruned"
    save_pruned_llama(out, base_model=None)
    (out / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/dense-base\n---\n# Base card\n")
    meta = front_matter(str(render_model_card(out)))
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/dense-base"


@pytest.mark.parametrize(
    "structure, tag, note",
    [
        ("2:4", "2:4-sparsity", "semi-structured sparse"),
        ("neurons", "structured-pruning", "really smaller"),
        ("heads", "structured-pruning", "really smaller"),
    ],
)
def test_card_structures(tmp_path, structure, tag, note):
    structured = None
    if structure in ("neurons", "heads"):
        # the shape `surgery.prune_structured_` returns (PruningReport.structured)
        structured = {
            "config": {"before": {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
                       "after": {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}},
            "num_parameters": {"before": 30000, "after": 21000},
        }
    out = tmp_path / "pruned"
    save_pruned_llama(out, structure=structure, structured=structured)
    card = render_model_card(out)
    assert tag in card.data.tags
    assert note in card.text
    if structured:
        assert "| MLP intermediate size | 64 | 48 |" in card.text and "| Parameters | 30,000 | 21,000 |" in card.text


# --------------------------------------------------------------------------- packaging


def test_wheel_ships_the_card_template(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"
        ),
    )
    if not (src / "README.md").exists():
        (src / "README.md").write_text("# hf-weightprune\n")  # pyproject's `readme`
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "-w",
            str(tmp_path / "wheels"),
            "--no-deps",
            "--no-build-isolation",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("hf_weightprune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "hf_weightprune/model_cards/pruned_model_card.md" in names
        assert "hf_weightprune/publish/hub.py" in names
        shipped = zf.read("hf_weightprune/model_cards/pruned_model_card.md")
    assert shipped == (REPO_ROOT / "model_cards" / "pruned_model_card.md").read_bytes()


def test_card_of_a_real_structured_prune(tmp_path):
    from hf_weightprune import PruneConfig, prune_, save_pruned
    from hf_weightprune.prune.oneshot import oneshot_importance
    from hf_weightprune.testing import tiny_llama

    model = tiny_llama(seed=3)
    report = prune_(model, oneshot_importance(model), PruneConfig(structure="neurons", sparsity=0.25), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    text = (tmp_path / "pruned" / "README.md").read_text()
    count = report.structured["num_parameters"]
    assert count["after"] == sum(p.numel() for p in model.parameters()) < count["before"]
    assert f"| Parameters | {count['before']:,} | {count['after']:,} |" in text
    assert "| MLP intermediate size | 64 | 48 |" in text
