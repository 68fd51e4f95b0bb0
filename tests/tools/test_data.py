"""Tests for hf_weightprune.tools.data, hf_weightprune.tools.plotting and the shipped KJV text."""

import json
import math
import re
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer

from hf_weightprune.testing import train_tokenizer
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows
from hf_weightprune.tools.plotting import plot_layer_stats
from hf_weightprune.tools.sweep_plot import plot_sweep, sweep_figure
from tests.helpers import training_args

REPO = Path(__file__).resolve().parents[2]
KJV = REPO / "data" / "kjv"


@pytest.fixture(scope="module")
def kjv_texts():
    return load_texts(KJV / "train.txt")


@pytest.fixture(scope="module")
def tokenizer(kjv_texts):
    # A slice of the corpus and a small vocabulary keep this to a fraction of a second.
    return train_tokenizer(kjv_texts[:150], vocab_size=512)


def _tiny_llama(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Far from the default 0.02, so that windows get clearly different losses and averaging schemes differ.
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config)


def _trainer_eval_loss(model, windows, batch_size, tmp_path):
    args = training_args(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=batch_size)
    return Trainer(model, args=args).evaluate(windows)["eval_loss"]


def _reference_stream(tokenizer, texts):
    """The token stream built independently of make_windows: per-document encode, EOS between documents."""
    stream = []
    for i, text in enumerate(texts):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
    return stream


# ---------------------------------------------------------------- load_texts


def test_load_texts_txt_paragraphs_and_lines(tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("first line\nsame doc\n\n  \nsecond doc\n\n\nthird doc\n", encoding="utf-8")
    assert load_texts(para) == ["first line\nsame doc", "second doc", "third doc"]

    lines = tmp_path / "lines.txt"
    lines.write_text("one\r\ntwo\n  three  \n", encoding="utf-8")
    assert load_texts(str(lines)) == ["one", "two", "three"]


def test_load_texts_json_jsonl_and_saved_dataset(tmp_path):
    docs = ["alpha beta", "gamma\ndelta", "epsilon"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    assert load_texts(jsonl) == docs

    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    assert load_texts(as_json) == docs

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "n": [1, 2, 3]}).save_to_disk(str(folder))
    assert load_texts(folder) == docs

    dict_folder = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:2]})}).save_to_disk(str(dict_folder))
    assert load_texts(dict_folder) == docs[:2]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "is empty"),
        ("blank.txt", " \n\n \n", "is empty"),
        ("empty.jsonl", "", "is empty"),
        ("data.csv", "text\nhello\n", "Unknown file type"),
        ("notext.jsonl", '{"content": "hello"}\n', "no 'text' field"),
        ("corrupt.jsonl", '{"text": "hello"\n{{{ not json\n', "Could not read"),
        ("numbers.jsonl", '{"text": 3}\n', "must hold strings"),
        ("latin1.txt", b"caf\xe9 \xff\xfe", "not valid UTF-8"),
    ],
)
def test_load_texts_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_texts(path)
    assert "\n" not in str(info.value)


def test_load_texts_corrupt_saved_dataset(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not load a saved dataset") as info:
        load_texts(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="Could not load a saved dataset"):
        load_texts(tmp_path)  # a folder that is no dataset at all

    other = tmp_path / "other"
    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(other))
    with pytest.raises(ValueError, match="no 'text' field"):
        load_texts(other)


# ---------------------------------------------------------------- make_windows


def test_make_windows_cover_the_token_stream(tokenizer, kjv_texts):
    texts = kjv_texts[:12]
    seq_len = 48
    stream = _reference_stream(tokenizer, texts)
    windows = make_windows(tokenizer, texts, seq_len=seq_len)

    assert set(windows.column_names) == {"input_ids", "labels"}
    assert len(windows) == len(stream) // seq_len
    assert all(len(ids) == seq_len for ids in windows["input_ids"])
    assert windows["labels"] == windows["input_ids"]
    joined = [t for ids in windows["input_ids"] for t in ids]
    assert joined == stream[: len(joined)]
    assert len(stream) - len(joined) < seq_len  # only the short tail is dropped
    # One EOS between each pair of documents, none at the ends.
    assert stream.count(tokenizer.eos_token_id) == len(texts) - 1


def test_make_windows_stride_and_max_windows(tokenizer, kjv_texts):
    texts = kjv_texts[:6]
    stream = _reference_stream(tokenizer, texts)
    seq_len, stride = 40, 15
    windows = make_windows(tokenizer, texts, seq_len=seq_len, stride=stride)
    assert len(windows) == (len(stream) - seq_len) // stride + 1
    for i, ids in enumerate(windows["input_ids"]):
        assert ids == stream[i * stride : i * stride + seq_len]

    # max_windows stops tokenizing early (over a corpus bigger than one chunk) but gives the same first windows.
    full = make_windows(tokenizer, kjv_texts[:300], seq_len=32)
    few = make_windows(tokenizer, kjv_texts[:300], seq_len=32, max_windows=5)
    assert len(few) == 5
    assert few["input_ids"] == full["input_ids"][:5]


def test_make_windows_errors(tokenizer):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        make_windows(tokenizer, ["In the beginning"], seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(tokenizer, ["a b c"], seq_len=1)
    with pytest.raises(ValueError, match="stride"):
        make_windows(tokenizer, ["a b c"], seq_len=2, stride=0)
    with pytest.raises(ValueError, match="max_windows"):
        make_windows(tokenizer, ["a b c"], seq_len=2, max_windows=0)
    with pytest.raises(ValueError, match="single string"):
        make_windows(tokenizer, "a b c", seq_len=2)


# ---------------------------------------------------------------- evaluate_loss


@pytest.mark.parametrize("num_windows, batch_size", [(16, 4), (21, 8), (5, 8)])
def test_evaluate_loss_matches_trainer(tokenizer, kjv_texts, tmp_path, num_windows, batch_size):
    seq_len = 32
    windows = make_windows(tokenizer, kjv_texts, seq_len=seq_len, max_windows=num_windows)
    model = _tiny_llama(len(tokenizer))
    model.train()

    result = evaluate_loss(model, windows, batch_size=batch_size)
    assert model.training  # the previous mode is restored
    expected = _trainer_eval_loss(model, windows, batch_size, tmp_path)
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens"] == num_windows * (seq_len - 1)

    # Independent reference: the mean over every predicted token, from one full forward pass per window.
    with torch.no_grad():
        model.eval()
        ids = torch.tensor(windows["input_ids"])
        logits = model(input_ids=ids).logits[:, :-1]
        token_mean = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result["loss"] == pytest.approx(token_mean.item(), abs=1e-5)

    if num_windows > batch_size and num_windows % batch_size:
        # The uneven case really discriminates: a plain mean of batch means would be off.
        batch_means = [
            model(input_ids=ids[s : s + batch_size], labels=ids[s : s + batch_size]).loss.item()
            for s in range(0, num_windows, batch_size)
        ]
        assert abs(sum(batch_means) / len(batch_means) - expected) > 1e-4


def test_evaluate_loss_masked_labels_and_max_batches(tokenizer, kjv_texts, tmp_path):
    windows = make_windows(tokenizer, kjv_texts, seq_len=24, max_windows=11)
    # Masking a different number of labels per window makes per-sample and per-token averages differ.
    labels = [[-100] * (i % 5) + ids[i % 5 :] for i, ids in enumerate(windows["input_ids"])]
    masked = datasets.Dataset.from_dict({"input_ids": windows["input_ids"], "labels": labels})
    model = _tiny_llama(len(tokenizer), seed=1)

    result = evaluate_loss(model, masked, batch_size=4)
    assert result["loss"] == pytest.approx(_trainer_eval_loss(model, masked, 4, tmp_path), abs=1e-5)
    assert result["tokens"] == sum(sum(t != -100 for t in row[1:]) for row in labels)

    head = evaluate_loss(model, masked, batch_size=4, max_batches=2)
    expected = _trainer_eval_loss(model, masked.select(range(8)), 4, tmp_path)
    assert head["loss"] == pytest.approx(expected, abs=1e-5)

    with pytest.raises(ValueError, match="batch_size"):
        evaluate_loss(model, masked, batch_size=0)
    with pytest.raises(ValueError, match="input_ids"):
        evaluate_loss(model, datasets.Dataset.from_dict({"text": ["a"]}))


# ---------------------------------------------------------------- train_tokenizer


def test_tokenizer_round_trip_and_determinism(tokenizer, kjv_texts, tmp_path, monkeypatch):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"

    again = train_tokenizer(kjv_texts[:150], vocab_size=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    other = train_tokenizer(kjv_texts[150:300], vocab_size=512)
    assert other.backend_tokenizer.to_str() != tokenizer.backend_tokenizer.to_str()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "And God said, Let there be light.\n\tZebra caf\u00e9 \u65e5\u672c \U0001f600 <|endoftext|>"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    assert reloaded.encode(sample, add_special_tokens=False) == ids
    assert reloaded.decode(ids) == sample  # byte-level: lossless even for characters never seen in training
    assert reloaded.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids.count(tokenizer.eos_token_id) == 1  # the special token is one id, not split into bytes
    assert reloaded.pad_token == reloaded.bos_token == "<|endoftext|>"


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", ""])


# ---------------------------------------------------------------- plotting


def _read_png(path):
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def test_plot_sweep(tmp_path):
    rows = [
        {"criterion": c, "sparsity": s, "loss": 3.0 + k + 4 * s**2, "perplexity": math.exp(3.0 + k + 4 * s**2)}
        for k, c in enumerate(["magnitude", "taylor"])
        for s in (0.5, 0.0, 0.25, 0.75)  # unsorted on purpose
    ]
    out = plot_sweep(rows, tmp_path / "sub" / "sweep.png", dense_loss=3.0, title="tiny sweep")
    assert out == tmp_path / "sub" / "sweep.png"
    image = _read_png(out)
    assert image.shape[1] > image.shape[0] > 200  # landscape, a real chart
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["sweep.png"]  # no temporary file left behind

    with pytest.raises(ValueError, match="empty"):
        plot_sweep([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'loss'"):
        plot_sweep([{"criterion": "m", "sparsity": 0.1, "perplexity": 2.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="fraction"):
        plot_sweep([{"criterion": "m", "sparsity": 50, "loss": 1.0, "perplexity": 2.0}], tmp_path / "x.png")


@pytest.mark.parametrize("ppl, expected_ticks", [
    # the real model's recovery knee (benchmarks/results/recovery_knee.json): 29 to 2,314 over 40% to 80%
    ([28.68, 38.10, 50.69, 96.31, 301.9, 2314.1], [30, 50, 100, 200, 300, 500, 1000, 2000]),
    # a narrow range (benchmarks/results/knee.json): round numbers, not one lone log tick
    ([96.75, 98.30, 103.2, 117.4, 180.1], [100, 125, 150, 175]),
])
def test_sweep_figure_draws_perplexity_on_a_log_axis(ppl, expected_ticks):
    rows = [{"criterion": "f", "sparsity": 0.1 * i, "loss": math.log(p), "perplexity": p} for i, p in enumerate(ppl)]
    fig = sweep_figure(rows, dense_loss=math.log(ppl[0]))
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "perplexity (log scale)"
    low, high = ax.get_ylim()
    assert low < min(ppl) and high > max(ppl)  # every point inside, the lowest not on the frame
    assert [t for t in ax.get_yticks() if low <= t <= high] == expected_ticks
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels == [f"{t:,}" for t in expected_ticks]  # plain numbers, no 10^2 mathtext
    assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
    loss_axis = ax.child_axes[0]  # the secondary axis: the same heights in nats, ln(perplexity)
    loss_labels = [float(t.get_text()) for t in loss_axis.get_yticklabels() if t.get_text()]
    assert len(loss_labels) >= 3 and all(math.log(low) <= v <= math.log(high) for v in loss_labels)
    assert loss_axis.get_ylabel() == "eval loss (nats)"


@pytest.mark.parametrize("lines", [3, 14, 24])
def test_every_sweep_line_is_solid_with_a_colour_and_marker_pair_of_its_own(lines, tmp_path):
    """Past the 10 colours of the cycle no line changes style (a dashed block would read as a group): each line's
    colour and marker both change at every line, so no two lines share both, and the legend shows each pair."""
    from matplotlib.colors import to_hex

    rows = [{"criterion": "sparsegpt", "candidate": f"sparsegpt: c{i}", "sparsity": s, "loss": 3.0 + 0.1 * i + s}
            for i in range(lines) for s in (0.2, 0.35, 0.5)]
    fig = sweep_figure(rows, dense_loss=2.9, structured=True)
    drawn = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("sparsegpt")]
    assert len(drawn) == lines
    assert {ln.get_linestyle() for ln in drawn} == {"-"}
    pairs = [(to_hex(ln.get_color()), ln.get_marker()) for ln in drawn]
    assert len(set(pairs)) == lines, pairs
    handles = fig.axes[0].get_legend().legend_handles
    shown = [(to_hex(h.get_color()), h.get_marker()) for h in handles if h.get_label().startswith("sparsegpt")]
    assert shown == pairs
    image = _read_png(plot_sweep(rows, tmp_path / "sweep.png", dense_loss=2.9, structured=True))
    assert image.shape[0] > 300


def test_plot_layer_stats(tmp_path):
    def stats(n, sparsity):
        rows = [{"name": f"model.layers.{i // 7}.proj_{i % 7}.weight", "mean": 1e-3 * 1.5**i} for i in range(n)]
        if sparsity:
            for i, row in enumerate(rows):
                row["sparsity"] = (i % 10) / 10
        return rows

    small = _read_png(plot_layer_stats(stats(5, sparsity=False), tmp_path / "small.png"))
    large = _read_png(plot_layer_stats(stats(60, sparsity=True), tmp_path / "large.png", title="inspect"))
    assert large.shape[1] > small.shape[1]  # the chart widens with the number of tensors
    with pytest.raises(ValueError, match="'mean'"):
        plot_layer_stats([{"name": "w"}], tmp_path / "x.png")


def test_plotting_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = [{"criterion": "m", "sparsity": 0.5, "loss": 1.0, "perplexity": 2.7}]
    with pytest.raises(ImportError, match=re.escape("pip install hf-weightprune[plot]")):
        plot_sweep(rows, tmp_path / "x.png")


# ---------------------------------------------------------------- shipped text


def test_shipped_kjv_files():
    train, valid = KJV / "train.txt", KJV / "valid.txt"
    train_text = train.read_text(encoding="ascii")
    valid_text = valid.read_text(encoding="ascii")
    total = len(train_text) + len(valid_text)
    assert 3_500_000 < total < 4_500_000
    assert 0.05 <= len(valid_text) / total <= 0.08

    # Split by book: whole verses of valid never occur in train (checked on the first verse of every valid chapter).
    train_lines = set(train_text.splitlines())
    valid_chapters = valid_text.strip().split("\n\n")
    assert len(valid_chapters) > 50
    assert valid_text.splitlines()[0] not in train_lines
    assert not any(chapter.splitlines()[0] in train_lines for chapter in valid_chapters)

    # Plain prose: no verse references were left in.
    assert re.search(r"^[1-3]?[A-Za-z]+\d+:\d+ ", train_text + valid_text, flags=re.M) is None
    assert train_text.startswith("In the beginning God created the heaven and the earth.\n")

    # The README is in step with the files it describes.
    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    assert f"| `kjv/train.txt` | {len(train_text)} |" in readme
    assert f"| `kjv/valid.txt` | {len(valid_text)} |" in readme
    assert "public domain" in readme and "bible -f Gen1:1-Rev22:21" in readme
