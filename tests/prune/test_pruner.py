import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import (
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    load_importance,
    load_sparsity,
    prune_,
    save_pruned,
)
from hf_weightprune.testing import tiny_llama, tiny_phi3
from hf_weightprune.tools.cli import main
from tests.helpers import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained tiny Phi-3 saved to disk, with temporal_magnitude and wanda importance."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for criterion in ("temporal_magnitude", "wanda"):
        model = tiny_phi3(seed=11, intermediate_size=64, hidden_size=32)
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        train(model, [cb], root / criterion, max_steps=4)
        model.save_pretrained(root / criterion / "model")
        out[criterion] = root / criterion
    return out


def _fresh(trained, criterion="temporal_magnitude"):
    return AutoModelForCausalLM.from_pretrained(trained[criterion] / "model")


def _reference_masks(imp, cfg):
    """Full sort of every score (fine for tiny models): the brute-force answer prune_ must equal."""
    scores = {n: imp.score(n).float() for n in imp.names}
    k_of = lambda numel, s: round(numel * s)  # noqa: E731
    masks = {}
    if cfg.kind == "N:M":
        n, m = cfg.nm
        for name, s in scores.items():
            groups = s.reshape(-1, m)
            order = torch.sort(groups, dim=1, stable=True).indices[:, : m - n]
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, order, False)
            masks[name] = mask.view_as(s)
    elif cfg.scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        order = torch.sort(flat, stable=True).indices[: k_of(flat.numel(), cfg.sparsity)]
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[order] = False
        offset = 0
        for name, s in scores.items():
            masks[name] = keep[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
    elif cfg.scope == "layer":
        for name, s in scores.items():
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[torch.sort(s.reshape(-1), stable=True).indices[: k_of(s.numel(), cfg.sparsity)]] = False
            masks[name] = keep.view_as(s)
    else:  # row
        for name, s in scores.items():
            idx = torch.sort(s, dim=1, stable=True).indices[:, : k_of(s.shape[1], cfg.sparsity)]
            masks[name] = torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)
    return masks


@pytest.mark.parametrize("criterion", ["temporal_magnitude", "wanda"])
@pytest.mark.parametrize(
    "cfg",
    # allow_collapse: on this tiny Phi-3 a global threshold over wanda scores empties o_proj (the math is the point here)
    [PruneConfig(sparsity=0.5, scope="global", allow_collapse=True), PruneConfig(sparsity=0.7, scope="layer"), PruneConfig(sparsity=0.3, scope="row"),
     PruneConfig(structure="2:4"), PruneConfig(structure="4:8")],
    ids=["global50", "layer70", "row30", "2:4", "4:8"],
)
def test_masks_equal_bruteforce(trained, criterion, cfg):
    model = _fresh(trained, criterion)
    imp = load_importance(trained[criterion], model=model)
    expected = _reference_masks(imp, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_(model, imp, cfg, progress=False)
    params = dict(model.named_parameters())
    total = zeros = 0
    for name, mask in expected.items():
        w = params[name].detach()
        assert torch.equal(w != 0, mask & (before[name] != 0)), name
        assert torch.equal(w[mask], before[name][mask]), name  # kept weights untouched
        assert report.tensors[name]["sparsity"] == pytest.approx((~mask).float().mean().item())
        total, zeros = total + mask.numel(), zeros + int((~mask).sum())
    assert report.global_sparsity == pytest.approx(zeros / total)
    if cfg.kind == "N:M":  # every group of M along the input dim keeps exactly N
        n, m = cfg.nm
        for name in expected:
            kept = (params[name] != 0).reshape(params[name].shape[0], -1, m).sum(-1)
            assert (kept == n).all()


def test_per_module_sparsity_targets(trained, tmp_path):
    model = _fresh(trained)
    imp = load_importance(trained["temporal_magnitude"], model=model)
    report = prune_(model, imp, PruneConfig(sparsity={r".*mlp\..*": 0.6, r".*o_proj": 0.2}), progress=False)
    assert set(report.tensors) == {n for n in imp.names if "mlp" in n or "o_proj" in n}
    mlp = [v for n, v in report.tensors.items() if "mlp" in n]
    assert sum(v["sparsity"] * v["numel"] for v in mlp) / sum(v["numel"] for v in mlp) == pytest.approx(0.6, abs=1e-3)
    card = (save_pruned(model, tmp_path / "p", report=report) and (tmp_path / "p" / "README.md").read_text())
    assert r"per module: `.*mlp\..*` 60.00%" in card


def test_saved_checkpoint_reloads_with_equal_logits(trained, tmp_path):
    model = _fresh(trained)
    imp = load_importance(trained["temporal_magnitude"], model=model)
    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    out = save_pruned(model, tmp_path / "pruned", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    meta = load_sparsity(out)
    params = dict(reloaded.named_parameters())
    for name, info in meta["tensors"].items():
        assert (params[name] == 0).float().mean().item() == pytest.approx(info["sparsity"])
    assert meta["global_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert meta["criterion"] == "temporal_magnitude" and meta["importance"]["step"] == 4
    assert (tmp_path / "pruned" / "README.md").is_file()


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_structured_prune_shrinks_and_reloads(arch, structure, tmp_path):
    make = tiny_phi3 if arch == "phi3" else tiny_llama
    model = make(seed=3, num_attention_heads=4, num_key_value_heads=4 if structure == "heads" else 2)
    cb = ImportanceCallback(ImportanceConfig(criterion="taylor"))
    train(model, [cb], tmp_path / "run", max_steps=2)
    before = sum(p.numel() for p in model.parameters())
    report = prune_(model, cb.importance(), PruneConfig(structure=structure, sparsity=0.5), progress=False)
    assert report.structured["num_parameters"] == {"before": before, "after": sum(p.numel() for p in model.parameters())}
    out = save_pruned(model, tmp_path / "pruned", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    if structure == "neurons":
        assert reloaded.config.intermediate_size == model.config.intermediate_size == 32
    else:
        assert reloaded.config.num_key_value_heads == 2 and reloaded.config.num_attention_heads == 2
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be a float in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a float in \[0, 1\)"),
        ({"structure": "4:2"}, "N:M pattern needs 0 < n < m"),
        ({"structure": "2:4", "sparsity": 0.3}, "implies sparsity 0.5"),
        ({"structure": "blocks"}, "structure must be"),
        ({"scope": "tensor"}, "scope must be one of"),
        ({"structure": "neurons", "scope": "global"}, "use scope='layer'"),
        ({"sparsity": {"mlp.*": 1.5}}, r"sparsity\['mlp.\*'\] must be a float"),
        ({"structure": "neurons", "exclude_modules": ["layers.0.mlp"]}, "target_modules/exclude_modules do not apply"),
        ({"structure": "heads", "target_modules": ".*"}, "structure 'heads' shrinks every decoder layer"),
        ({"structure": "2:4", "sparsity": {"mlp.*": 0.5}}, "implies sparsity 0.5"),
    ],
)
def test_prune_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize(
    "target, weight, in_features",
    [(None, "model.layers.0.self_attn.q_proj.weight", 30), (["down_proj"], "model.layers.0.mlp.down_proj.weight", 65)],
    ids=["q_proj", "down_proj"],
)
def test_nm_refuses_input_dim_not_multiple_of_m(tmp_path, target, weight, in_features):
    """One-shot N:M names the weight and the fix (not an internal variable), before touching the model."""
    model = tiny_llama(hidden_size=30, num_attention_heads=3, num_key_value_heads=3, intermediate_size=65)
    cb = ImportanceCallback()
    train(model, [cb], tmp_path, max_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = (f"{weight}: in_features {in_features} is not a multiple of 4 (structure '2:4' prunes groups of 4 "
                "consecutive input weights); exclude it (exclude_modules=[...]) or use unstructured pruning")
    config = PruneConfig(structure="2:4", target_modules=target)
    with pytest.raises(ValueError) as err:
        prune_(model, cb.importance(), config, progress=False)
    assert str(err.value) == expected
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The file-to-file twin refuses with the same line, before writing anything.
    from hf_weightprune.publish.export import prune_checkpoint

    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError) as err:
        prune_checkpoint(tmp_path / "model", cb.importance(), config, tmp_path / "pruned", progress=False)
    assert str(err.value) == expected
    assert not (tmp_path / "pruned").exists()


def test_importance_from_another_model_is_refused(trained):
    other = tiny_phi3(seed=0, intermediate_size=96)
    imp = load_importance(trained["temporal_magnitude"])
    with pytest.raises(ValueError, match=r"does not match this model: .*gate_up_proj.weight: importance shape \[128, 32\]"):
        prune_(other, imp, PruneConfig(sparsity=0.5), progress=False)


def test_save_pruned_refuses_input_and_nonempty_folders(trained, tmp_path):
    model = _fresh(trained)
    report = prune_(model, load_importance(trained["temporal_magnitude"]), PruneConfig(sparsity=0.5), progress=False)
    src = trained["temporal_magnitude"] / "model"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ValueError, match="input checkpoint"):
        save_pruned(model, src, report=report, overwrite=True)
    with pytest.raises(ValueError, match="importance folder"):
        save_pruned(model, trained["temporal_magnitude"] / "importance" / "x", report=report)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(model, tmp_path / "busy", report=report)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_prune_inspect_round_trip(trained, tmp_path, capsys):
    root = trained["wanda"]
    out = tmp_path / "cli"
    assert main(["prune", str(root / "model"), "--importance", str(root), "--sparsity", "0.4", "--scope", "row",
                 "--output_dir", str(out)]) == 0
    meta = json.loads((out / "sparsity.json").read_text())
    assert meta["scope"] == "row" and meta["criterion"] == "wanda"
    assert meta["global_sparsity"] == pytest.approx(0.4, abs=0.02)
    # the CLI and the library give the same weights
    model = _fresh(trained, "wanda")
    prune_(model, load_importance(root, model=model), PruneConfig(sparsity=0.4, scope="row"), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), n
    assert main(["inspect", str(root), "--model", str(root / "model"), "--plot", str(tmp_path / "l.png")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in text and (tmp_path / "l.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sparsity", "1.2"], "sparsity must be a float in [0, 1)"),
        (["--structure", "3:2"], "N:M pattern needs 0 < n < m"),
        (["--importance", "/nonexistent/imp"], "--importance /nonexistent/imp: no such folder"),
        (["--importance", "MODEL"], "No importance in"),
    ],
)
def test_cli_bad_input_one_line_error_writes_nothing(trained, tmp_path, capsys, argv, match):
    root = trained["temporal_magnitude"]
    args = {"--importance": str(root), "--sparsity": "0.5"}
    for k, v in zip(argv[::2], argv[1::2]):
        args[k] = str(root / "model") if v == "MODEL" else v
    out = tmp_path / "never"
    argv = ["prune", str(root / "model"), "--output_dir", str(out)] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_push_to_hub_round_trip(trained, tmp_path, hub_server, monkeypatch, capsys):
    """`prune --push-to-hub` and `push --include-importance` through huggingface_hub to the loopback Hub."""
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    root = trained["temporal_magnitude"]
    out = tmp_path / "pushed"
    assert main(["prune", str(root / "model"), "--importance", str(root), "--sparsity", "0.5", "--output_dir", str(out),
                 "--push_to_hub", "tester/cli-pruned", "--private"]) == 0
    assert {"sparsity.json", "README.md", "model.safetensors"} <= set(hub_server.files("tester/cli-pruned"))
    assert main(["push", str(out), "--repo_id", "tester/cli-again", "--include_importance"]) == 0
    assert "importance/importance_config.json" in hub_server.files("tester/cli-again")
    remote = load_importance("tester/cli-again", token=hub_server.token)
    local = load_importance(root)
    for name in local.names:
        assert torch.equal(remote.state(name), local.state(name))
    before = capsys.readouterr()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    assert main(["push", str(out), "--repo_id", "tester/cli-denied"]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("hf-weightprune push: error:")
    for secret in (hub_server.token, "hf_wrong_token_value"):
        assert secret not in before.out + before.err + captured.out + captured.err


@pytest.mark.parametrize("criterion", ["temporal_magnitude", "taylor"])
def test_bf16_state_ranks_like_its_float32_scores(criterion, tmp_path):
    """prune_ thresholds the raw bf16 state (one histogram pass, no division); masks equal the score reference."""
    model = tiny_phi3(seed=12)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, state_dtype="bfloat16"))
    train(model, [cb], tmp_path, max_steps=3)
    imp = cb.importance()
    assert imp.ranking(imp.names[0]).dtype == torch.bfloat16
    cfg = PruneConfig(sparsity=0.5, scope="global")
    expected = _reference_masks(imp, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune_(model, imp, cfg, progress=False)
    for name, mask in expected.items():
        assert torch.equal(dict(model.named_parameters())[name] != 0, mask & (before[name] != 0)), name


def _file_digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("criterion", ["temporal_magnitude", "wanda"])
@pytest.mark.parametrize("cfg", [PruneConfig(sparsity=0.5, scope="global", allow_collapse=True),
                                 PruneConfig(sparsity=0.3, scope="row"),
                                 PruneConfig(structure="2:4")], ids=["global50", "row30", "2:4"])
def test_prune_checkpoint_equals_prune_and_save(trained, criterion, cfg, tmp_path):
    from hf_weightprune.publish.export import prune_checkpoint

    root = trained[criterion]
    sharded = tmp_path / "sharded"  # several shards and an index, as big checkpoints have
    _fresh(trained, criterion).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    before = _file_digests(sharded)

    report = prune_checkpoint(sharded, load_importance(root), cfg, tmp_path / "stream", progress=False)
    model = _fresh(trained, criterion)
    ref = prune_(model, load_importance(root, model=model), cfg, progress=False)
    assert _file_digests(sharded) == before  # the input is never written to
    assert report.tensors == ref.tensors and list(report.tensors) == list(ref.tensors)
    assert report.global_sparsity == ref.global_sparsity
    assert report.model_sparsity == ref.model_sparsity
    out = tmp_path / "stream"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    assert load_sparsity(out)["tensors"] == ref.tensors and (out / "README.md").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), n


def test_prune_checkpoint_refuses_bad_input_and_writes_nothing(trained, tmp_path):
    from hf_weightprune.publish.export import prune_checkpoint

    root = trained["temporal_magnitude"]
    model_dir = root / "model"
    with pytest.raises(ValueError, match="changes tensor shapes"):
        prune_checkpoint(model_dir, load_importance(root), PruneConfig(structure="neurons"), tmp_path / "a")
    with pytest.raises(ValueError, match="input checkpoint"):  # even with overwrite (a subfolder is allowed)
        prune_checkpoint(model_dir, load_importance(root), output_dir=model_dir, overwrite=True)
    other = tmp_path / "other"
    tiny_llama(seed=0).save_pretrained(other)
    with pytest.raises(ValueError, match="does not match this model"):
        prune_checkpoint(other, load_importance(root), output_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        prune_checkpoint(model_dir, load_importance(root), output_dir=tmp_path / "c")
    truncated = tmp_path / "truncated"  # a shard cut short: a one-line error, no output
    _fresh(trained).save_pretrained(truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        prune_checkpoint(truncated, load_importance(root), PruneConfig(sparsity=0.5, scope="layer"), tmp_path / "d")
    sharded = tmp_path / "sharded"  # the same for one shard of an index: caught by the file-to-file copy
    _fresh(trained).save_pretrained(sharded, max_shard_size="40KB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        prune_checkpoint(sharded, load_importance(root), PruneConfig(sparsity=0.5, scope="layer"), tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abde")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".*.tmp"))
