"""Does weighting SparseGPT's training Hessian by step help? Uniform vs step-weighted `H` (issue 16).

The setting of `knee.py`: a small Llama (~2.2M parameters) trained from scratch on the shipped KJV text, where
weights and activations drift a lot during training. Three `sparsegpt` ImportanceCallbacks on one Trainer (one run,
identical weights): `uniform` (`H = sum_t X_t^T X_t`, the default), `step` (`H = sum_t t * X_t^T X_t`,
`ImportanceConfig(weighting="step")`, arXiv 2502.17071's time weighting) and `last10` (uniform over the last 10% of
the steps only, `window`), a recency reference. Each is pruned with the OBS sweep (`prune_`, reconstruction) at each
`--targets` (unstructured sparsities, layer scope, and N:M patterns; default 50%, 70%, 90%, 2:4), and evaluated on
held-out KJV windows (mean next-token loss).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/hessian_weighting.py --seeds 0,1,2

Prints a Markdown table (per seed and the mean over seeds, lower is better) and writes it to `--output` if given.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("uniform", "step", "last10")


def train_and_prune(seed: int, args, tok, train_ds, eval_ds) -> dict[str, float]:
    """One training run with the three callbacks; eval loss per (variant, target), plus `dense`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
    from hf_weightprune.tools.data import evaluate_loss

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    configs = {
        "uniform": ImportanceConfig(criterion="sparsegpt", name="uniform"),
        "step": ImportanceConfig(criterion="sparsegpt", weighting="step", name="step"),
        "last10": ImportanceConfig(criterion="sparsegpt", window=max(1, args.steps // 10), name="last10"),
    }
    callbacks = {v: ImportanceCallback(c) for v, c in configs.items()}
    targs = TrainingArguments(str(ROOT / "benchmarks" / "_cache" / "hessian_weighting"), max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              warmup_steps=args.steps // 10, lr_scheduler_type="cosine", weight_decay=0.1,
                              logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                              disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=list(callbacks.values())).train()
    losses = {"dense": evaluate_loss(model, eval_ds, batch_size=16)["loss"]}
    prune_configs = {t: PruneConfig(structure=t) if ":" in t else PruneConfig(sparsity=float(t)) for t in args.targets}
    for variant, cb in callbacks.items():
        imp = cb.importance()
        for target, cfg in prune_configs.items():
            pruned = copy.deepcopy(model)
            prune_(pruned, imp, cfg, progress=False)
            losses[variant, target] = evaluate_loss(pruned, eval_ds, batch_size=16)["loss"]
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval_windows", type=int, default=64)
    p.add_argument("--targets", default="0.5,0.7,0.9,2:4", help="comma-separated sparsities and N:M patterns")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="write the Markdown table here too")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",")]

    import torch

    from hf_weightprune.testing import train_tokenizer
    from hf_weightprune.tools.data import load_texts, make_windows

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_texts = load_texts(ROOT / "data" / "kjv" / "train.txt")
    tok = train_tokenizer(train_texts, vocab_size=2048)
    train_ds = make_windows(tok, train_texts, seq_len=args.seq_len, max_windows=args.steps * args.batch_size)
    eval_ds = make_windows(tok, load_texts(ROOT / "data" / "kjv" / "valid.txt"), seq_len=args.seq_len,
                           max_windows=args.eval_windows)
    runs = {}
    for seed in seeds:
        runs[seed] = train_and_prune(seed, args, tok, train_ds, eval_ds)
        print(f"seed {seed}: {runs[seed]} ({time.perf_counter() - start:.0f} s)", flush=True)
    wall = time.perf_counter() - start

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    targets = args.targets
    heads = [t if ":" in t else f"{float(t):.0%}" for t in targets]
    lines = [f"| H | {' | '.join(heads)} |", "|---|" + "---:|" * len(targets)]
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(cell([runs[s][variant, t] for s in seeds]) for t in targets) + " |")
    lines.append("| dense | " + " | ".join(cell([runs[s]["dense"] for s in seeds]) for _ in targets) + " |")
    lines += ["", "Step minus uniform, per seed (negative = step-weighted is better):", "",
              f"| seed | {' | '.join(heads)} |", "|---|" + "---:|" * len(targets)]
    for seed in seeds:
        lines.append(f"| {seed} | " + " | ".join(f"{runs[seed]['step', t] - runs[seed]['uniform', t]:+.4f}"
                                               for t in targets) + " |")
    if len(seeds) > 1:
        diffs = {t: [runs[s]["step", t] - runs[s]["uniform", t] for s in seeds] for t in targets}
        lines.append("| mean ± sd | " + " | ".join(f"{statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f}"
                                                  for d in diffs.values()) + " |")
    lines += ["", f"Seeds {seeds}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, eval on "
              f"{args.eval_windows} windows; wall time {wall / 60:.1f} min ({args.threads} thread(s))."]
    text = "\n".join(lines)
    print(text)
    if args.output:
        from hf_weightprune.io_utils import atomic_write_text

        atomic_write_text(args.output, text + "\n")


if __name__ == "__main__":
    main()
