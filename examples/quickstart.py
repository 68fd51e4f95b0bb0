"""The demo: fine-tune a small Phi-3-architecture model with the importance callback on the shipped King James
Bible text, prune it, sweep sparsities, and write the pruned checkpoint, its model card and the plot.

    bash scripts/demo.sh                      # = python examples/quickstart.py (after setting up .venv)
    python examples/quickstart.py --push_to_hub me/kjv-phi3-pruned   # also publish (needs a Hub token)

Everything is built in code (Phi3Config, a BPE tokenizer trained on the text): no Hub access. Measured on 2 idle
CPU cores: 74 s wall clock, 124 s of CPU time; 20 minutes on a 2-core machine shared with other jobs (load average
about 6). For a real model, see examples/finetune_phi3_with_pruning.py --model_name_or_path ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch
from transformers import Phi3Config, Phi3ForCausalLM, Trainer, TrainingArguments

from hf_weightprune import (
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    load_importance,
    prune_,
    save_pruned,
    sweep,
    write_model_card,
)
from hf_weightprune.perplexity import perplexity_text
from hf_weightprune.testing import train_tokenizer
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "demo"))
    p.add_argument("--train_file", default=os.path.join(ROOT, "data", "kjv", "train.txt"))
    p.add_argument("--valid_file", default=os.path.join(ROOT, "data", "kjv", "valid.txt"))
    p.add_argument("--criterion", default="wanda", help="the library default; temporal_magnitude is the seed paper's")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--push_to_hub", "--push-to-hub", default=None, metavar="REPO_ID")  # old spelling kept
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    if os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)  # the demo's own folder: rerunning starts clean
    train_texts, valid_texts = load_texts(args.train_file), load_texts(args.valid_file)
    tokenizer = train_tokenizer(train_texts, vocab_size=2048)
    train_ds = make_windows(tokenizer, train_texts, seq_len=args.seq_len)
    valid_ds = make_windows(tokenizer, valid_texts, seq_len=args.seq_len, max_windows=64)

    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = Phi3ForCausalLM(config)
    print(f"Phi-3 architecture, {model.num_parameters():,} parameters; {len(train_ds)} training windows")

    callback = ImportanceCallback(ImportanceConfig(criterion=args.criterion))
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "train"), max_steps=args.max_steps, per_device_train_batch_size=16,
        learning_rate=3e-3, warmup_steps=20, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=50,
        save_steps=200, save_total_limit=2, report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, callbacks=[callback])
    trainer.train()
    trainer.save_model()
    tokenizer.save_pretrained(training_args.output_dir)

    dense = evaluate_loss(model, valid_ds, batch_size=16)
    importance = load_importance(training_args.output_dir)  # what the callback wrote in output_dir/importance
    report = prune_(model, importance, PruneConfig(sparsity=args.sparsity), progress=False)
    pruned = evaluate_loss(model, valid_ds, batch_size=16)
    pruned_dir = os.path.join(args.output_dir, "pruned")
    # One-shot pruning after training: the dense and the pruned model are the same model at the same step, evaluated on
    # the same windows, so the card may compare them (it refuses a comparison whose dataset, tokens or step differ).
    assert dense["tokens"] == pruned["tokens"]
    save_pruned(model, pruned_dir, report=report, tokenizer=tokenizer, eval_results={
        "dense_loss": dense["loss"], "pruned_loss": pruned["loss"], "dataset": "data/kjv/valid.txt",
        "tokens": pruned["tokens"], "step": trainer.state.global_step})

    # Loss vs sparsity for the trained importance and the one-shot magnitude baseline; written into the pruned
    # checkpoint so its card shows the plot.
    rows = sweep(training_args.output_dir, {args.criterion: training_args.output_dir}, args.valid_file,
                 sparsities=[round(0.1 * i, 1) for i in range(10)], seq_len=args.seq_len, max_windows=64,
                 batch_size=16, output_dir=pruned_dir, progress=False)
    write_model_card(pruned_dir)
    print("\nLoss vs sparsity (validation):")
    for row in rows:
        print(f"  {row['criterion']:>20} {row['sparsity']:4.0%}  loss {row['loss']:.3f}")

    print(f"\nEvaluated on data/kjv/valid.txt, {pruned['tokens']:,} tokens, both at step {trainer.state.global_step}:")
    print(f"Dense  eval loss {dense['loss']:.3f} (perplexity {perplexity_text(dense['loss'], '.1f')})")
    print(f"Pruned eval loss {pruned['loss']:.3f} (perplexity {perplexity_text(pruned['loss'], '.1f')}) -- "
          f"{report.summary()}")
    print(f"\nOutputs ({time.time() - start:.0f} s):")
    print(f"  trained model + importance: {training_args.output_dir} (importance/ and checkpoint-*/importance/)")
    print(f"  pruned checkpoint + card:   {pruned_dir} (README.md, sparsity.json)")
    print(f"  loss-vs-sparsity plot:      {os.path.join(pruned_dir, 'sweep.png')} (+ sweep.csv, sweep.json)")
    if args.push_to_hub:
        from hf_weightprune import push_pruned_to_hub

        print(f"  pushed: {push_pruned_to_hub(pruned_dir, repo_id=args.push_to_hub)}")


if __name__ == "__main__":
    main()
