"""Tests for the `inspect --plot` chart: name parsing, layer_stats, the (layer x module type) grid, the figure, the CLI."""

import math
import random

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance, oneshot_importance
from hf_weightprune.collect.summary import layer_stats
from hf_weightprune.testing import tiny_llama, tiny_phi3
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.plotting import (
    layer_grid,
    layer_stats_figure,
    parse_layer_name,
    plot_layer_stats,
)
from tests.helpers import train

LLAMA_TYPES = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A 32-layer Llama (224 tracked tensors, Phi-3-mini's count) trained 2 steps with the callback, saved."""
    root = tmp_path_factory.mktemp("llama32")
    model = tiny_llama(seed=3, num_hidden_layers=32)
    train(model, [ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))], root, max_steps=2)
    return root


def _brute_below_median(imp):
    """Exact reference: the median of all tracked scores pooled, and each tensor's fraction strictly below it."""
    scores = {n: imp.score(n).float().reshape(-1) for n in imp.names}
    pooled = torch.cat(list(scores.values())).sort().values
    median = pooled[math.ceil(len(pooled) / 2) - 1]
    return {n: (s < median).double().mean().item() for n, s in scores.items()}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.12.self_attn.q_proj.weight", (12, "q")),
        ("model.layers.0.mlp.down_proj.weight", (0, "down")),
        ("model.layers.3.self_attn.qkv_proj.weight", (3, "qkv")),  # Phi-3 fused
        ("model.layers.31.mlp.gate_up_proj.weight", (31, "gate_up")),
        ("model.decoder.layers.5.self_attn.out_proj.weight", (5, "out")),  # OPT / BART
        ("model.decoder.layers.5.fc1.weight", (5, "fc1")),
        ("transformer.h.7.attn.c_proj.weight", (7, "c_proj")),  # GPT-2: not an unreadable "c"
        ("transformer.h.10.mlp.c_fc.bias", (10, "c_fc")),
        ("lm_head.weight", (None, "lm_head")),
        ("model.embed_tokens.weight", (None, "embed_tokens")),
    ],
)
def test_parse_layer_name(name, expected):
    assert parse_layer_name(name) == expected


def test_layer_stats_and_grid_at_real_model_scale(llama32):
    imp = load_importance(llama32)
    stats = layer_stats(imp)
    assert [s["name"] for s in stats] == imp.names and len(stats) == 224
    q12 = "model.layers.12.self_attn.q_proj.weight"
    row = stats[imp.names.index(q12)]
    score = imp.score(q12)
    assert row["shape"] == "32x32" and row["numel"] == 1024
    assert row["mean"] == pytest.approx(score.mean().item(), rel=1e-6)
    assert row["std"] == pytest.approx(score.std().item(), rel=1e-6)
    assert (row["min"], row["max"]) == (score.min().item(), score.max().item())
    # Every tensor is smaller than the sample size, so the fraction below the global median is exact.
    reference = _brute_below_median(imp)
    for s in stats:
        assert s["below_median"] == pytest.approx(reference[s["name"]], abs=1e-12), s["name"]
    assert 0.4 < sum(s["below_median"] * s["numel"] for s in stats) / sum(s["numel"] for s in stats) <= 0.5

    grid = layer_grid(stats)
    assert grid.rows == [str(i) for i in range(32)] and grid.columns == LLAMA_TYPES
    assert grid.values.shape == (32, 7) and not torch.isnan(torch.from_numpy(grid.values)).any()
    assert grid[12, "q"] == pytest.approx(score.mean().item(), rel=1e-6)
    assert grid.names[12][0] == q12
    assert grid[31, "down"] == pytest.approx(imp.score("model.layers.31.mlp.down_proj.weight").mean().item(), rel=1e-6)
    assert grid[0, "k"] != grid[0, "v"]
    percent = layer_grid(stats, "below_median")
    assert percent[12, "q"] == pytest.approx(100 * reference[q12])  # fractions are drawn in %


def test_layer_stats_sampled_median_is_close_and_repeatable(llama32):
    imp = load_importance(llama32)
    reference = _brute_below_median(imp)
    sampled = layer_stats(imp, sample_size=256)
    assert sampled == layer_stats(imp, sample_size=256)  # seeded
    assert sampled != layer_stats(imp, sample_size=256, seed=1)
    errors = [abs(s["below_median"] - reference[s["name"]]) for s in sampled]
    assert max(errors) < 0.15 and sum(errors) / len(errors) < 0.05
    with pytest.raises(ValueError, match="sample_size"):
        layer_stats(imp, sample_size=0)


def test_phi3_fused_columns_any_tensor_order_and_an_other_row():
    model = tiny_phi3(seed=5, num_hidden_layers=32)
    imp = oneshot_importance(model, "magnitude", target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                                 "lm_head"])
    stats = layer_stats(imp)
    shuffled = list(stats)
    random.Random(0).shuffle(shuffled)  # e.g. wanda's hook order: the columns must not follow it
    for rows in (stats, shuffled):
        grid = layer_grid(rows)
        assert grid.columns == ["qkv", "o", "gate_up", "down", "lm_head"]
        assert grid.rows == [str(i) for i in range(32)] + ["other"]
        w = model.model.layers[12].self_attn.qkv_proj.weight
        assert grid[12, "qkv"] == pytest.approx(w.abs().mean().item(), rel=1e-6)
        assert grid["other", "lm_head"] == pytest.approx(model.lm_head.weight.abs().mean().item(), rel=1e-6)
        assert math.isnan(grid["other", "qkv"]) and math.isnan(grid[3, "lm_head"])
        assert int(torch.isnan(torch.from_numpy(grid.values)).sum()) == 4 + 32  # other row, lm_head column
    with pytest.raises(KeyError, match="No cell"):
        grid[40, "qkv"]


def test_ambiguous_types_keep_their_path_and_stacks_their_name():
    stats = [{"name": f"model.{stack}.layers.{i}.{m}.weight", "mean": float(i)}
             for stack in ("encoder", "decoder") for i in range(2)
             for m in ["fc1", "self_attn.q_proj"] + (["encoder_attn.q_proj"] if stack == "decoder" else [])]
    grid = layer_grid(stats)
    assert grid.columns == ["self_attn.q", "encoder_attn.q", "fc1"]
    assert grid.rows == ["encoder.layers 0", "encoder.layers 1", "decoder.layers 0", "decoder.layers 1"]
    assert grid["decoder.layers 1", "encoder_attn.q"] == 1.0 and math.isnan(grid["encoder.layers 0", "encoder_attn.q"])
    with pytest.raises(ValueError, match="same cell"):
        layer_grid(stats + [{"name": "model.encoder.layers.0.fc1.bias", "mean": 0.0}])


def test_figure_is_labelled_and_nothing_covers_the_title(llama32):
    imp = load_importance(llama32)
    stats = layer_stats(imp)
    fig = layer_stats_figure(stats, title="temporal_magnitude importance, step 2", value_label="score, |w|")
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(heatmaps) == 2 and len(bars) == 2
    assert heatmaps[0].get_ylabel().startswith("layer index")
    assert all(ax.get_xlabel() == "module type" for ax in heatmaps)
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == LLAMA_TYPES * 2  # top, and bottom (32 rows)
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == [str(i) for i in range(32)]
    assert bars[0].get_ylabel() == "mean score, |w|"
    assert "global median (%)" in bars[1].get_ylabel()
    assert fig.get_suptitle().splitlines() == ["temporal_magnitude importance, step 2",
                                               "224 tensors: 32 layers x 7 module types"]
    # The drawn cells are the grid: layer 12 is row 12, "q" column 0.
    drawn = heatmaps[0].images[0].get_array()
    assert drawn[12, 0] == pytest.approx(layer_grid(stats)[12, "q"])

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert not title.overlaps(ax.get_tightbbox(renderer)), "the title is covered"
    for ax in heatmaps:  # the panel title sits above the module-type labels, not on them
        assert ax.title.get_window_extent(renderer).y0 >= ax.xaxis.get_tightbbox(renderer).y1 - 1
        assert min(t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels()) >= 9
    boxes = [ax.get_tightbbox(renderer) for ax in heatmaps + bars]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), "panels overlap"


def test_plot_layer_stats_png_and_bad_input(tmp_path):
    from matplotlib.image import imread

    stats = [{"name": f"model.layers.{i}.self_attn.{t}_proj.weight", "mean": 1e-3 * (i + 1), "std": 0.5,
              "sparsity": 0.1 * (i % 10)} for i in range(32) for t in "qkvo"]
    out = plot_layer_stats(stats, tmp_path / "sub" / "layers.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.shape[0] > 700 and image.shape[1] > 900  # 32 rows, three panels (mean, std, sparsity)
    assert [p.name for p in out.parent.iterdir()] == ["layers.png"]
    with pytest.raises(ValueError, match="'below_median'"):
        plot_layer_stats(stats, tmp_path / "x.png", panels=["mean", "below_median"])
    with pytest.raises(ValueError, match="empty"):
        plot_layer_stats([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_inspect_plot(llama32, tmp_path, capsys):
    from matplotlib.image import imread

    png = tmp_path / "inspect.png"
    assert main(["inspect", str(llama32), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.12.self_attn.q_proj.weight" in text and "<median" in text and f"Plot: {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.shape[0] > 700 and image[..., :3].std() > 0.05  # tall enough for 32 rows, not blank
