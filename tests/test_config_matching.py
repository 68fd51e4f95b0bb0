import json

import pytest

from hf_weightprune import ImportanceConfig
from hf_weightprune.matching import canonical_name, find_tracked_weights, module_matches
from hf_weightprune.testing import tiny_llama, tiny_phi3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"criterion": "nope"}, "criterion must be one of"),
        ({"every_n_steps": 0}, "every_n_steps must be an int >= 1"),
        ({"every_n_steps": 1.5}, "every_n_steps must be an int >= 1"),
        ({"window": 0}, "window must be None or an int >= 1"),
        ({"state_dtype": "float16"}, "state_dtype must be one of"),
        ({"target_modules": 3}, "target_modules must be a regex str"),
        ({"exclude_modules": [1]}, "exclude_modules must be a regex str"),
        ({"per_epoch": "yes"}, "per_epoch must be a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImportanceConfig(**kwargs)


@pytest.mark.parametrize(("criterion", "reads"), [
    ("taylor", "reads grads during steps"),
    ("wanda", "reads activations during steps"),
    ("magnitude", "reads only the weights at the end of training"),
])
def test_per_epoch_refused_for_criteria_that_sample_no_weights(criterion, reads):
    from hf_weightprune import ImportanceCallback

    with pytest.raises(ValueError, match=f"per_epoch=True .*{criterion!r} {reads}.*use every_n_steps"):
        ImportanceCallback(ImportanceConfig(criterion=criterion, per_epoch=True))


def test_config_round_trip_and_unknown_keys(tmp_path, caplog):
    cfg = ImportanceConfig(criterion="fisher", target_modules=["q_proj", "v_proj"], window=3, state_dtype="bfloat16")
    cfg.save_pretrained(tmp_path)
    assert ImportanceConfig.from_pretrained(tmp_path) == cfg
    data = json.loads((tmp_path / "importance_config.json").read_text())
    data["config"]["from_the_future"] = 1
    (tmp_path / "importance_config.json").write_text(json.dumps(data))
    assert ImportanceConfig.from_pretrained(tmp_path) == cfg
    assert "from_the_future" in caplog.text
    assert cfg.diff(ImportanceConfig(criterion="fisher")) == {
        "target_modules": (["q_proj", "v_proj"], "all-linear"), "window": (3, None), "state_dtype": ("bfloat16", "float32")}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("module.model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
        ("_orig_mod.model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
        ("model.layers.0._fsdp_wrapped_module.mlp.down_proj", "model.layers.0.mlp.down_proj"),
        ("base_model.model.model.layers.0.self_attn.qkv_proj.base_layer", "model.layers.0.self_attn.qkv_proj"),
        ("model.layers._checkpoint_wrapped_module.0.mlp", "model.layers.0.mlp"),
    ],
)
def test_canonical_name(name, expected):
    assert canonical_name(name) == expected


# peft's rules: str = regex fullmatch; list = exact name or ".suffix"
@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # suffix must follow a dot
        ("model.layers.0.self_attn.xq_proj", ["q_proj"], False),
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # regex must fullmatch
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
        ("model.layers.10.mlp.up_proj", r"model\.layers\.1\d\..*", True),
        ("model.layers.1.mlp.up_proj", r"model\.layers\.1\d\..*", False),
        ("anything", None, False),
    ],
)
def test_module_matches_peft_rules(name, pattern, expected):
    assert module_matches(name, pattern) is expected


def test_default_targets_exclude_lm_head_and_embeddings():
    model = tiny_llama()
    names = [t.name for t in find_tracked_weights(model)]
    assert len(names) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in names)
    phi = [t.name for t in find_tracked_weights(tiny_phi3())]
    assert set(phi[:4]) == {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                            "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_target_and_exclude_and_tied_lm_head():
    model = tiny_llama(tie_word_embeddings=True)
    names = [t.name for t in find_tracked_weights(model, ["lm_head", "down_proj"], exclude_modules=r".*layers\.1\..*")]
    assert names == ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match="No nn.Linear module matches"):
        find_tracked_weights(model, ["does_not_exist"])
