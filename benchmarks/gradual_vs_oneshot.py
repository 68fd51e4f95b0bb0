"""Gradual pruning during training vs one-shot pruning after it, with and without a recovery fine-tune.

Protocol, per model (Phi-3 architecture, trained from scratch on the shipped KJV text, tokenizer trained on it):
1. dense: train `--dense_steps` steps with an `ImportanceCallback` (temporal_magnitude); eval.
2. for each sparsity s (global unstructured, all Linear layers but lm_head), starting from the same dense model:
   - one-shot: `prune_` with the dense run's importance; no further training;
   - one-shot + recovery: the one-shot model, fine-tuned `--finetune_steps` steps with its masks held
     (`PruneSchedule(mode="hold")`);
   - gradual: fine-tuned the same `--finetune_steps` steps (same fresh data) while pruning along a cubic ramp from
     0 to s over the first 75% (mask updates every 10% of the steps; importance from this fine-tune).
   Recovery and gradual cost the same compute. Eval loss: mean next-token loss on KJV validation windows.

    OMP_NUM_THREADS=2 python benchmarks/gradual_vs_oneshot.py
"""

import argparse
import os
import sys
import tempfile
import time

import torch
from transformers import Phi3Config, Phi3ForCausalLM, PrinterCallback, Trainer, TrainingArguments

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.config import PruneConfig
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import train_tokenizer
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows
from hf_weightprune.train.schedule import PruneSchedule

KJV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "kjv")
MODELS = {  # name -> Phi3Config overrides
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,30m")
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    p.add_argument("--dense_steps", type=int, default=80)
    p.add_argument("--finetune_steps", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--eval_windows", type=int, default=64)
    return p.parse_args()


def train(model, data, steps, lr, out, callbacks, batch_size):
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                             warmup_steps=max(1, steps // 10), report_to="none", save_strategy="no",
                             logging_steps=10**6, disable_tqdm=True, seed=0, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def run_model(name, args, tokenizer, train_windows, valid, tmp):
    sparsities = [float(s) for s in args.sparsities.split(",")]
    bs, n, f = args.batch_size, args.dense_steps, args.finetune_steps
    dense_data = train_windows.select(range(n * bs))
    ft_data = train_windows.select(range(n * bs, (n + f) * bs))
    config = Phi3Config(vocab_size=len(tokenizer), max_position_embeddings=args.seq_len, tie_word_embeddings=True,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **MODELS[name])
    torch.manual_seed(0)
    dense = Phi3ForCausalLM(config)
    params = sum(p.numel() for p in dense.parameters())
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))  # what the recorded rows used
    train(dense, dense_data, n, 2e-3, os.path.join(tmp, f"{name}-dense"), [cb], bs)
    importance = cb.importance()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}

    def fresh():
        torch.manual_seed(0)
        model = Phi3ForCausalLM(config)
        model.load_state_dict(dense_state)
        return model

    def loss(model):
        return evaluate_loss(model, valid, batch_size=16)["loss"]

    rows = [(name, params, "dense", None, loss(dense))]
    for s in sparsities:
        model = fresh()
        report = prune_(model, importance.bind(model), PruneConfig(sparsity=s), progress=False)
        rows.append((name, params, "one-shot", s, loss(model)))
        folder = os.path.join(tmp, f"{name}-oneshot-{s}")
        save_pruned(model, folder, report=report, write_card=False)
        hold = PruneSchedule(mode="hold", masks_from=folder)
        train(model, ft_data, f, 5e-4, folder + "-ft", [ImportanceCallback(schedule=hold)], bs)
        rows.append((name, params, "one-shot + recovery", s, loss(model)))
        model = fresh()
        gradual = PruneSchedule(final_sparsity=s, start=0.0, end=0.75, every_n_steps=max(1, f // 10))
        train(model, ft_data, f, 5e-4, os.path.join(tmp, f"{name}-gradual-{s}"),
              [ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=gradual)], bs)
        rows.append((name, params, "gradual", s, loss(model)))
        print(f"  {name} s={s}: " + ", ".join(f"{r[2]} {r[4]:.4f}" for r in rows[-3:]), file=sys.stderr)
    return rows


def main():
    args = parse_args()
    t0 = time.time()
    texts = load_texts(os.path.join(KJV, "train.txt"))
    tokenizer = train_tokenizer(texts[:300], vocab_size=2048)
    need = (args.dense_steps + args.finetune_steps) * args.batch_size
    train_windows = make_windows(tokenizer, texts, seq_len=args.seq_len, max_windows=need)
    valid = make_windows(tokenizer, load_texts(os.path.join(KJV, "valid.txt")), seq_len=args.seq_len,
                         max_windows=args.eval_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run_model(name, args, tokenizer, train_windows, valid, tmp)
    by_key = {(r[0], r[2], r[3]): r[4] for r in rows}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"\n`{' '.join(['python', *sys.argv])}` (dense {args.dense_steps} steps, fine-tune {args.finetune_steps} "
          f"steps, batch {args.batch_size}x{args.seq_len} tokens; {time.time() - t0:.0f} s)\n")
    print("| model | params | method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|---|" + "---|" * len(sparsities))
    for name in args.models.split(","):
        params = next(r[1] for r in rows if r[0] == name)
        print(f"| {name} | {params / 1e6:.1f}M | dense | " + " | ".join(
            f"{by_key[(name, 'dense', None)]:.3f}" for _ in sparsities) + " |")
        for method in ("one-shot", "one-shot + recovery", "gradual"):
            print(f"| {name} | {params / 1e6:.1f}M | {method} | " + " | ".join(
                f"{by_key[(name, method, s)]:.3f}" for s in sparsities) + " |")


if __name__ == "__main__":
    main()
