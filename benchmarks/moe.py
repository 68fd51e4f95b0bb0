"""Whole-expert pruning of a small MoE: router statistics from training vs a calibration pass vs random (issue 26).

A small Mixtral (8 experts, top-2) is trained from scratch on the shipped KJV text with two ImportanceCallbacks on
one Trainer (`magnitude`, whose run also counts the router statistics, and `wanda`). Then, from the same trained
weights:

- whole-expert removal at 25% and 50% of each layer's experts, chosen by the tokens the routers sent each expert
  during training (`PruneConfig(structure="experts")`), by the same count from a calibration pass (the routing
  frequencies of `--calib-windows` training windows after training, `RouterCollector`), and at random (mean and
  spread over `--random-seeds` draws);
- per-expert unstructured 50% (`wanda`, every expert slice and every Linear at 50%, row scope).

Eval loss on held-out KJV windows before and after. `--seeds N` repeats all of it for seeds 0..N-1 (model init and
training data order; the random draws and the calibration windows stay the same) and reports each figure's mean and
range over the seeds, so a margin can be read against the spread between runs.

    python benchmarks/moe.py                 # ~3 min on 2 busy CPU cores
    python benchmarks/moe.py --seeds 3       # ~9 min
Writes benchmarks/results/moe.md and moe.json (every seed's figures).
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="training runs (model init + data order seeds 0..N-1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.seeds < 1:
        p.error("--seeds must be >= 1")

    import torch

    from hf_weightprune.io_utils import atomic_write_json, atomic_write_text
    from hf_weightprune.testing import train_tokenizer
    from hf_weightprune.tools.data import load_texts, make_windows

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_texts = load_texts(ROOT / "data" / "kjv" / "train.txt")
    tok = train_tokenizer(train_texts, vocab_size=2048)
    train_ds = make_windows(tok, train_texts, seq_len=args.seq_len, max_windows=args.steps * args.batch_size)
    valid = make_windows(tok, load_texts(ROOT / "data" / "kjv" / "valid.txt"), seq_len=args.seq_len,
                         max_windows=args.eval_windows)
    runs = [run_seed(seed, args, tok, train_ds, valid) for seed in range(args.seeds)]
    total_s = time.perf_counter() - start

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0]
    atomic_write_json(out / "moe.json", {"seeds": runs, "params": first["params"], "args": vars(args),
                                         # seed 0's figures at the top level, as a one-seed run writes them
                                         **{k: first[k] for k in ("dense_loss", "rows", "per_expert_unstructured_50",
                                                                  "tokens_routed_in_training")}})
    train_min = sum(r["train_s"] for r in runs) / 60
    seeds = "seed 0" if args.seeds == 1 else f"seeds 0..{args.seeds - 1}: mean (min, max) over the seeds"
    lines = [
        "# Whole-expert pruning of a small MoE: training router statistics vs calibration vs random",
        "",
        f"Mixtral, {first['params'] / 1e6:.2f}M parameters (4 layers, hidden 128, {args.experts} experts of "
        f"intermediate 256, top-2, tied embeddings), trained from scratch for {args.steps} steps x {args.batch_size} x "
        f"{args.seq_len} tokens on `data/kjv/train.txt`; eval loss on the first {args.eval_windows} windows of "
        f"`data/kjv/valid.txt`. Command: `python benchmarks/moe.py` ({' '.join(sys.argv[1:]) or 'defaults'}); wall "
        f"time {total_s / 60:.1f} min on 2 shared CPU cores (training {train_min:.1f} min). {seeds}.",
        "",
        f"Dense loss {_spread([r['dense_loss'] for r in runs])}.",
        "",
        "| experts removed per layer | chosen by | eval loss | vs dense |",
        "|---:|---|---:|---:|",
    ]
    for i, r in enumerate(first["rows"]):
        losses = [run["rows"][i]["loss"] for run in runs]
        deltas = [run["rows"][i]["loss"] - run["dense_loss"] for run in runs]
        draws = f"; draws min {min(x['rows'][i]['loss_min'] for x in runs):.4f}, max " \
                f"{max(x['rows'][i]['loss_max'] for x in runs):.4f}" if "loss_min" in r else ""
        lines.append(f"| {r['experts_removed']:.0%} | {r['method']} | {_spread(losses)}{draws} | "
                     f"{_spread(deltas, signed=True)} |")
    unstructured = [r["per_expert_unstructured_50"] for r in runs]
    lines += ["", "Per-expert unstructured 50% (`wanda`, row scope, every expert slice and Linear): eval loss "
                  f"{_spread([u['loss'] for u in unstructured])} "
                  f"({_spread([u['loss'] - r['dense_loss'] for u, r in zip(unstructured, runs)], signed=True)}), "
                  f"{unstructured[0]['model_sparsity']:.1%} of all parameters zero.", ""]
    atomic_write_text(out / "moe.md", "\n".join(lines))
    print("\n".join(lines))


def _spread(values: list[float], *, signed: bool = False) -> str:
    """One value as is; several as `mean (min, max)`."""
    f = "{:+.4f}" if signed else "{:.4f}"
    if len(values) == 1:
        return f.format(values[0])
    return f"{f.format(statistics.mean(values))} ({f.format(min(values))}, {f.format(max(values))})"


def run_seed(seed: int, args: argparse.Namespace, tok, train_ds, valid) -> dict:
    """Train the MoE with model init and data order from `seed`, then every pruning of the table from its weights."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
    from hf_weightprune.collect.router import RouterCollector
    from hf_weightprune.moe import find_moe_blocks
    from hf_weightprune.prune.experts import choose_experts, remove_experts_
    from hf_weightprune.tools.data import evaluate_loss

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=args.experts, num_experts_per_tok=2, router_aux_loss_coef=0.01,
        output_router_logits=True, max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    callbacks = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in ("magnitude", "wanda")]
    targs = TrainingArguments(str(ROOT / "benchmarks" / "_cache" / "moe"), max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              warmup_steps=args.steps // 10, lr_scheduler_type="cosine", weight_decay=0.1,
                              logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                              disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks).train()
    train_s = time.perf_counter() - start
    model.eval()
    imp = {cb.config.criterion: cb.importance() for cb in callbacks}

    def loss(m) -> float:
        return evaluate_loss(m, valid, batch_size=16)["loss"]

    dense = loss(model)
    # calibration: the routing frequencies of training windows seen again after training (no gradient, eval mode)
    calib = RouterCollector(model, training_only=False)
    calib.register()
    with torch.no_grad():
        for i in range(0, args.calib_windows, 16):
            batch = torch.tensor(train_ds[i : min(i + 16, args.calib_windows)]["input_ids"])
            model(input_ids=batch)
    calib.remove()
    blocks = find_moe_blocks(model)
    scores = {
        "training router statistics": {
            b.name: torch.tensor(imp["magnitude"].sections["router"][b.name]["tokens"], dtype=torch.float64)
            for b in blocks},
        f"calibration pass ({args.calib_windows} windows)": {
            b.name: calib.stats(b.name)["tokens"].double() for b in blocks},
    }
    rows = []
    for fraction in (0.25, 0.5):
        pruned = copy.deepcopy(model)
        report = prune_(pruned, imp["magnitude"], PruneConfig(structure="experts", sparsity=fraction), progress=False)
        rows.append({"method": "training router statistics", "experts_removed": fraction, "loss": loss(pruned),
                     "params_after": report.structured["num_parameters"]["after"]})
        for method, s in scores.items():
            if method.startswith("training"):
                assert choose_experts(s, sparsity=fraction) == report.structured["removed"]  # the same choice
                continue
            pruned = copy.deepcopy(model)
            remove_experts_(pruned, choose_experts(s, sparsity=fraction))
            rows.append({"method": method, "experts_removed": fraction, "loss": loss(pruned)})
        randoms = []
        for draw in range(args.random_seeds):
            g = torch.Generator().manual_seed(draw)
            pruned = copy.deepcopy(model)
            remove_experts_(pruned, choose_experts({b.name: torch.rand(b.num_experts, generator=g, dtype=torch.float64)
                                                    for b in blocks}, sparsity=fraction))
            randoms.append(loss(pruned))
        rows.append({"method": f"random ({args.random_seeds} draws)", "experts_removed": fraction,
                     "loss": statistics.mean(randoms), "loss_min": min(randoms), "loss_max": max(randoms)})
    pruned = copy.deepcopy(model)
    report = prune_(pruned, imp["wanda"], PruneConfig(sparsity=0.5), progress=False)
    per_expert = {"loss": loss(pruned), "model_sparsity": report.model_sparsity,
                  "global_sparsity": report.global_sparsity}

    routed = {b: [int(t) for t in s.tolist()] for b, s in scores["training router statistics"].items()}
    return {"seed": seed, "dense_loss": dense, "rows": rows, "per_expert_unstructured_50": per_expert,
            "tokens_routed_in_training": routed, "params": n_params, "train_s": train_s}


if __name__ == "__main__":
    main()
