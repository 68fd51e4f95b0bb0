"""Where does the loss-vs-sparsity curve bend? A scaled-down version of arXiv 2502.17071's experiment.

A small Llama (~2.2M parameters) is trained from scratch on the shipped KJV text with one ImportanceCallback per
criterion on the same Trainer (temporal_magnitude, magnitude, taylor, fisher: one run, identical weights), then
pruned at 0-90% and evaluated on held-out KJV windows. The knee is the first sparsity whose loss exceeds the dense
loss by more than `--tolerance` (5%).

    python benchmarks/knee.py                # ~10 min on 2 busy CPU cores
Writes benchmarks/results/knee.md, knee.png, knee.csv and knee.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CRITERIA = ("temporal_magnitude", "magnitude", "taylor", "fisher")


def knee(rows, dense_loss: float, tolerance: float) -> dict[str, float | None]:
    """First sparsity per criterion whose loss exceeds `dense_loss * (1 + tolerance)` (None: never)."""
    out: dict[str, float | None] = {}
    for r in sorted(rows, key=lambda r: r["sparsity"]):
        out.setdefault(r["criterion"], None)
        if out[r["criterion"]] is None and r["loss"] > dense_loss * (1 + tolerance):
            out[r["criterion"]] = r["sparsity"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--scope", default="global", help="global | layer | row")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune.perplexity import perplexity_text
    from hf_weightprune.testing import train_tokenizer
    from hf_weightprune.tools.data import load_texts, make_windows
    from hf_weightprune.tools.sweep import SWEEP_CSV, SWEEP_JSON, SWEEP_PNG, format_table, sweep

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cache = ROOT / "benchmarks" / "_cache" / "knee"
    train_texts = load_texts(ROOT / "data" / "kjv" / "train.txt")
    tok = train_tokenizer(train_texts, vocab_size=2048)
    train_ds = make_windows(tok, train_texts, seq_len=args.seq_len, max_windows=args.steps * args.batch_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    callbacks = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in CRITERIA]
    targs = TrainingArguments(str(cache / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, warmup_steps=args.steps // 10, lr_scheduler_type="cosine",
                              weight_decay=0.1, logging_steps=50, save_strategy="no", report_to=[], use_cpu=True,
                              seed=0, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks).train()
    train_s = time.perf_counter() - start
    shutil.rmtree(cache / "model", ignore_errors=True)
    model.save_pretrained(cache / "model")
    tok.save_pretrained(cache / "model")

    out = Path(args.output)
    tmp = cache / "sweep"
    rows = sweep(cache / "model", {cb.config.criterion: cb.importance() for cb in callbacks},
                 ROOT / "data" / "kjv" / "valid.txt", sparsities=[i / 10 for i in range(10)], scope=args.scope,
                 baselines=(), seq_len=args.seq_len, max_windows=args.eval_windows, batch_size=16, output_dir=tmp,
                 title=f"Llama {n_params / 1e6:.1f}M trained from scratch on KJV, {args.scope} unstructured")
    out.mkdir(parents=True, exist_ok=True)
    for name, dest in ((SWEEP_CSV, "knee.csv"), (SWEEP_JSON, "knee.json"), (SWEEP_PNG, "knee.png")):
        part = out / f".{dest}.{os.getpid()}.tmp"  # a reader never sees a half-copied file
        shutil.copyfile(tmp / name, part)
        os.replace(part, out / dest)
    total_s = time.perf_counter() - start

    dense = rows[0]
    knees = knee(rows[1:], dense["loss"], args.tolerance)
    points = {(r["criterion"], r["sparsity"]): r["loss"] for r in rows[1:]}
    cols = [0.5, 0.7, 0.8, 0.9]
    lines = [
        "# Knee of the loss-vs-sparsity curve (scaled-down arXiv 2502.17071)",
        "",
        f"Llama, {n_params / 1e6:.2f}M parameters (4 layers, hidden 192, tied embeddings), trained from scratch for "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens on `data/kjv/train.txt` (byte-level BPE, "
        f"vocab {len(tok)}) with four ImportanceCallbacks on one Trainer (one run, identical weights). Pruned "
        f"{args.scope} unstructured (all Linear layers but `lm_head`), evaluated on the first {args.eval_windows} "
        f"windows of {args.seq_len} tokens of `data/kjv/valid.txt`. Knee = first sparsity (10% grid) whose loss "
        f"exceeds the dense loss by more than {args.tolerance:.0%}.",
        "",
        f"Command: `python benchmarks/knee.py` ({' '.join(sys.argv[1:]) or 'defaults'}); wall time {total_s / 60:.1f} "
        f"min on 2 CPU cores shared with other jobs (training {train_s / 60:.1f} min). Dense loss {dense['loss']:.4f} "
        f"(perplexity {perplexity_text(dense['loss'])}).",
        "",
        f"| criterion | knee (loss > dense +{args.tolerance:.0%}) | "
        + " | ".join(f"loss @ {c:.0%}" for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for crit, k in knees.items():
        cells = " | ".join(f"{points[crit, c]:.4f}" for c in cols)
        lines.append(f"| {crit} | {'none' if k is None else f'{k:.0%}'} | {cells} |")
    lines += ["", "Perplexity at every point:", "", format_table(rows), "", "![loss vs sparsity](knee.png)", ""]
    from hf_weightprune.io_utils import atomic_write_text

    atomic_write_text(out / "knee.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
