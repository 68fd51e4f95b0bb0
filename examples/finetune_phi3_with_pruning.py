"""Fine-tune Phi-3 with pruning to a target sparsity (or a smaller shape), then save a standard pruned checkpoint.

Three recipes, all with no calibration pass (the training run is the calibration):

- `--recipe oneshot-hold` (the default; the best measured, benchmarks/README.md section 11): the first quarter of the
  steps trains densely while `ImportanceCallback(ImportanceConfig(criterion="sparsegpt"))` sums each Linear's input
  Hessian; `prune_` then prunes once, with SparseGPT's OBS update of the kept weights from those Hessians; the rest
  of the steps fine-tune the pruned model with its mask held (`PruneSchedule(mode="hold")`) and distil from the
  dense model as it was at pruning (`DistillConfig(teacher=...)`, on by default here: `--no_distill` turns it off).
- `--recipe gradual`: one `ImportanceCallback` accumulates the importance and, through its `PruneSchedule`, prunes
  along a cubic ramp from 30% to 80% of training, holding the masks after every optimizer step (`--distill` adds
  distillation from a frozen copy of the model as training began). `--lora` trains LoRA adapters on the frozen base
  and merges them keeping the zeros (gradual recipe only).
- `--recipe structured`: a smaller model rather than zeros (README "Structured pruning"). The first quarter of the
  steps trains densely while `ImportanceConfig(criterion="sparsegpt", units=True)` gathers the unit statistics
  (neurons, KV groups, hidden channels, layers) and the input Hessians; `prune_` removes units along `--structure`
  (default `layers,neurons`; any of neurons, heads, hidden, layers) down to `--target_params` of the parameters,
  every width it cuts a multiple of `--round_to` (default 64: tensor cores and quantization kernels; 0 for any width),
  refitting the kept `down_proj` / `o_proj` columns by least squares (`compensate="refit"`); the rest of the steps
  recover by distillation from the dense model as it was at pruning, logits only (`hidden_weight=0`: the shapes
  differ). The smaller checkpoint is reloaded with stock `AutoModelForCausalLM` and generates with and without the
  KV cache. It is saved with `measure_speed=True` beside the dense model at pruning (`baseline=`), so
  `sparsity.json` and the card state its measured prefill and decode tokens/s and peak memory against the dense
  model's on this machine (`--no_measure_speed` skips that).

Sparsity and a per-module-type importance summary are logged to the Trainer's reporters. A dense control run (same seed, data and steps; skip it with `--no_dense_control`) gives the
card a dense loss measured by the same evaluation at the same step as the pruned model's.

Default (no download, CPU, 2 cores, a few minutes): a tiny Phi-3 trained from scratch on the shipped King James
Bible text with a tokenizer trained on it:

    python examples/finetune_phi3_with_pruning.py --output_dir out/phi3-tiny-pruned

On a real model (bf16, the default recipe; one GPU or several with DDP):

    accelerate launch --num_processes 8 examples/finetune_phi3_with_pruning.py \\
        --model_name_or_path microsoft/Phi-3-mini-4k-instruct --sparsity 0.5 \\
        --max_steps 1000 --batch_size 4 --seq_len 2048 --output_dir out/phi3-mini-pruned-50

The whole model is fine-tuned (masks also hold the optimizer's moments at zero). DeepSpeed and FSDP are not
supported by the schedule (DDP is). Distillation makes the loss `(1 - alpha) * CE + alpha * T^2 * KL(teacher ||
student)`, plus SquareHead's per-layer hidden-state loss (arXiv 2310.06927) with `--distill_hidden_weight` > 0
(`--distill_alpha`, `--distill_temperature`). The gradual recipe with distillation:

    python examples/finetune_phi3_with_pruning.py --recipe gradual --distill --output_dir out/phi3-tiny-gradual

The structured recipe, 80% of the parameters kept as fewer decoder layers and MLP neurons:

    python examples/finetune_phi3_with_pruning.py --recipe structured --structure layers,neurons \\
        --target_params 0.8 --round_to 64 --output_dir out/phi3-tiny-smaller
"""

import argparse
import inspect
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Phi3Config,
    Phi3ForCausalLM,
    Trainer,
    TrainingArguments,
)

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    load_sparsity,
    merge_and_unload_sparse,
    prune_,
    save_pruned,
)

# helpers of the demo, not the public API: a tokenizer trained on the text, windows of it, and an eval loop
from hf_weightprune.testing import train_tokenizer
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows

HERE = os.path.dirname(os.path.abspath(__file__))
# transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns in 5.2x, the new one
# does not exist in 5.10): use whichever this version has.
_CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in
                      inspect.signature(TrainingArguments.__init__).parameters else "gradient_checkpointing")
KJV = os.path.join(HERE, "..", "data", "kjv")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="Hub id or folder; default: a tiny Phi-3 from scratch")
    p.add_argument("--recipe", choices=("oneshot-hold", "gradual", "structured"), default="oneshot-hold",
                   help="oneshot-hold: sparsegpt statistics, one-shot OBS prune, then held masks + distillation (the "
                   "best measured); gradual: a cubic ramp; structured: unit statistics, fewer units with a refit, "
                   "then distillation (default: %(default)s)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the frozen (pruned) base (gradual)")
    p.add_argument("--train_file", default=os.path.join(KJV, "train.txt"))
    p.add_argument("--eval_file", default=os.path.join(KJV, "valid.txt"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--structure", default=None,
                   help="unstructured (default) or N:M such as 2:4; structured recipe: neurons, heads, hidden, layers "
                   "or several, comma-separated (default: layers,neurons)")
    p.add_argument("--target_params", type=float, default=0.8,
                   help="structured recipe: the fraction of the parameters to keep (default: %(default)s)")
    p.add_argument("--round_to", type=int, default=64,
                   help="structured recipe: keep every MLP / hidden width it cuts a multiple of this, for tensor cores "
                   "and group-wise quantization kernels (Phi-3-mini's MLP is 8192 wide; 0: any width; default: "
                   "%(default)s)")
    p.add_argument("--criterion", default=None, help="gradual recipe: default the library's (wanda, per-row scope)")
    p.add_argument("--no_dense_control", action="store_true",
                   help="skip the dense control run (same seed, data and steps, no pruning); the card then shows the "
                   "pruned model's loss only")
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--eval_windows", type=int, default=64)
    p.add_argument("--output_dir", default="out/phi3-pruned")
    p.add_argument("--distill", action="store_true", help="gradual recipe: distil from the dense model while pruning")
    p.add_argument("--no_distill", action="store_true",
                   help="oneshot-hold and structured recipes: recover without distillation")
    p.add_argument("--no_measure_speed", action="store_true",
                   help="structured recipe: save without measuring speed and memory beside the dense model")
    p.add_argument("--distill_alpha", type=float, default=0.5, help="weight of the KL term (default: %(default)s)")
    p.add_argument("--distill_temperature", type=float, default=2.0, help="softmax temperature (default: %(default)s)")
    p.add_argument("--distill_hidden_weight", type=float, default=0.0,
                   help="weight of SquareHead's hidden-state loss; 0 = logits only (default: %(default)s)")
    args = p.parse_args(argv)
    if args.lora and args.recipe != "gradual":
        p.error("--lora needs --recipe gradual (the one-shot recipe prunes and fine-tunes the base weights)")
    if args.structure is None:
        args.structure = "layers,neurons" if args.recipe == "structured" else "unstructured"
    return args


def build(args):
    if args.model_name_or_path is None:
        texts = load_texts(args.train_file)
        tokenizer = train_tokenizer(texts[:300], vocab_size=2048)
        config = Phi3Config(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        return Phi3ForCausalLM(config), tokenizer, texts
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.bfloat16)
    return model, tokenizer, load_texts(args.train_file)


def run_trainer(args, model, windows, cb, folder, steps):
    """Fine-tune `model` on `windows` for `steps` with the callback `cb` (or none); the Trainer's files in `folder`."""
    pretrained = args.model_name_or_path is not None
    training_args = TrainingArguments(
        os.path.join(args.output_dir, folder), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (2e-4 if pretrained else 2e-3), lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 10), save_strategy="no",
        bf16=pretrained and torch.cuda.is_available(), report_to="none", disable_tqdm=True,
        seed=0, **{_CHECKPOINTING_ARG: pretrained})
    trainer = Trainer(model=model, args=training_args, train_dataset=windows, callbacks=[cb] if cb else [])
    if cb is not None:
        cb.attach(trainer)  # importance and sparsity scalars reach the Trainer's loggers
    trainer.train()
    return trainer


def distill_config(args, teacher=None):
    return DistillConfig(teacher=teacher, alpha=args.distill_alpha, temperature=args.distill_temperature,
                         hidden_weight=args.distill_hidden_weight)


def train(args, schedule=None):
    """Build a fresh model (seeded) and fine-tune it for `max_steps`, pruning along `schedule` if given."""
    model, tokenizer, texts = build(args)
    windows = make_windows(tokenizer, texts, seq_len=args.seq_len, max_windows=args.max_steps * args.batch_size)
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    cb = None
    if schedule is not None:
        cb = ImportanceCallback(ImportanceConfig(criterion=args.criterion) if args.criterion else ImportanceConfig(),
                                schedule=schedule, distill=distill_config(args) if args.distill else None)
    trainer = run_trainer(args, model, windows, cb, "trainer" if schedule is not None else "dense-control",
                          args.max_steps)
    return model, tokenizer, cb, trainer


def train_oneshot_hold(args, sparsity: float, structure: str):
    """The one-shot recipe: statistics over the first quarter of the steps, a one-shot OBS prune, then the rest of
    the steps with the mask held and distilled from the dense model as it was at pruning."""
    model, tokenizer, texts = build(args)
    windows = make_windows(tokenizer, texts, seq_len=args.seq_len, max_windows=args.max_steps * args.batch_size)
    first = max(1, args.max_steps // 4)
    head = windows.select(range(min(first * args.batch_size, len(windows))))
    stats = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"))
    run_trainer(args, model, head, stats, "statistics", first)
    dense = os.path.join(args.output_dir, "dense-at-pruning")  # the teacher (prune_ works in place)
    model.save_pretrained(dense)
    target = {} if ":" in structure else {"sparsity": sparsity}  # N:M fixes the sparsity
    oneshot = prune_(model, stats.importance(), PruneConfig(structure=structure, scope="row", **target))
    print(f"one-shot OBS prune after {first} steps: {oneshot.global_sparsity:.1%} of the pruned tensors")
    masks_from = os.path.join(args.output_dir, "pruned-oneshot")
    save_pruned(model, masks_from, report=oneshot, tokenizer=tokenizer, overwrite=True)
    schedule = PruneSchedule(mode="hold", masks_from=masks_from)
    cb = ImportanceCallback(schedule=schedule, distill=None if args.no_distill else distill_config(args, dense))
    rest = windows.select(range(min(first * args.batch_size, len(windows) - 1), len(windows)))
    trainer = run_trainer(args, model, rest, cb, "trainer", args.max_steps - first)
    return model, tokenizer, cb, trainer, schedule


def train_structured(args):
    """The structured recipe: unit statistics and Hessians over the first quarter of the steps, fewer units with a
    least-squares refit of what is kept, then the rest of the steps distilled from the dense model (logits only)."""
    model, tokenizer, texts = build(args)
    windows = make_windows(tokenizer, texts, seq_len=args.seq_len, max_windows=args.max_steps * args.batch_size)
    first = max(1, args.max_steps // 4)
    head = windows.select(range(min(first * args.batch_size, len(windows))))
    stats = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    run_trainer(args, model, head, stats, "statistics", first)
    dense = os.path.join(args.output_dir, "dense-at-pruning")  # the teacher (prune_ changes the model in place)
    model.save_pretrained(dense)
    # only widths are rounded: a structure of layers or KV groups alone has none (PruneConfig refuses round_to there)
    widths = {"neurons", "hidden"} & set(args.structure.split(","))
    report = prune_(model, stats.importance(), PruneConfig(structure=args.structure, target_params=args.target_params,
                                                          compensate="refit", round_to=(args.round_to or None) if widths
                                                          else None))
    params = report.structured["num_parameters"]
    print(f"structured prune ({args.structure}) after {first} steps: {params['before']:,} -> {params['after']:,} "
          f"parameters, config {report.structured['config']['after']}")
    # The hidden states of student and teacher differ in number and width: distil the logits only.
    distill = DistillConfig(teacher=dense, alpha=args.distill_alpha, temperature=args.distill_temperature,
                            hidden_weight=0.0)
    # distill= without a config: the callback only distils (no statistics gathered, no importance files).
    cb = None if args.no_distill else ImportanceCallback(distill=distill)
    rest = windows.select(range(min(first * args.batch_size, len(windows) - 1), len(windows)))
    trainer = run_trainer(args, model, rest, cb, "trainer", args.max_steps - first)
    return model, tokenizer, cb, trainer, report


@torch.no_grad()
def check_stock_reload(model, folder: str, tokenizer, max_new_tokens: int = 12) -> str:
    """Reload `folder` with stock transformers, check it computes what `model` computes and that greedy decoding gives
    the same tokens with and without the KV cache; returns the generated text."""
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    model.eval()
    ids = tokenizer("In the beginning", return_tensors="pt").input_ids.to(model.device)
    if not torch.allclose(stock(ids).logits.float(), model(ids).logits.float(), atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"{folder} reloaded with stock transformers computes other logits than the pruned model")
    outs = [stock.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=cache,
                           pad_token_id=tokenizer.pad_token_id) for cache in (True, False)]
    if not torch.equal(*outs):
        raise RuntimeError(f"{folder}: greedy tokens differ with and without the KV cache")
    return tokenizer.decode(outs[0][0], skip_special_tokens=True)


def main(argv=None):
    args = parse_args(argv)
    if args.recipe == "gradual":
        # Prune from 30% to 80% of training; the last 20% recovers at the final sparsity.
        schedule = PruneSchedule(final_sparsity=args.sparsity if ":" not in args.structure else None,
                                 structure=args.structure, start=0.3, end=0.8,
                                 every_n_steps=max(1, args.max_steps // 20))
        model, tokenizer, cb, trainer = train(args, schedule)
    elif args.recipe == "structured":
        model, tokenizer, cb, trainer, report = train_structured(args)
        schedule = None
    else:
        model, tokenizer, cb, trainer, schedule = train_oneshot_hold(args, args.sparsity, args.structure)
    valid = make_windows(tokenizer, load_texts(args.eval_file), seq_len=args.seq_len, max_windows=args.eval_windows)
    step = args.max_steps  # optimizer steps in all, both phases of the one-shot recipe
    pruned = evaluate_loss(model, valid)
    # A card compares numbers of one evaluation only: the same windows, both models at the same step. The dense
    # reference is a control run with the same seed, data and steps, without pruning (the dense model at the step
    # pruning started is not it: it has trained less, so pruning would seem to lower the loss).
    results = {"pruned_loss": pruned["loss"], "dataset": os.path.basename(os.path.dirname(os.path.abspath(
        args.eval_file))), "tokens": pruned["tokens"], "step": step}
    dense = None
    if not args.no_dense_control:
        control, _, _, control_trainer = train(args)
        dense = evaluate_loss(control, valid)
        assert control_trainer.state.global_step == step and dense["tokens"] == pruned["tokens"]
        results["dense_loss"] = dense["loss"]
        del control

    if args.lora:
        model, merged = merge_and_unload_sparse(model, masks=cb.mask_holder.masks, return_report=True)
        print(f"LoRA merged keeping the masks: sparsity {merged.global_sparsity:.4f}")
    if args.recipe != "structured":  # the masks held after recovery (the structured model has no zeros to hold)
        report = cb.pruning_report(model, cb.importance() if args.recipe == "gradual" else None)
    out = os.path.join(args.output_dir, "pruned")
    training = cb.training_record() if cb is not None else None  # collective: every rank, before rank 0 writes
    if trainer.is_world_process_zero():
        # The structured model is really smaller: measure what that buys here, beside the dense model at pruning.
        measure = args.recipe == "structured" and not args.no_measure_speed
        baseline = os.path.join(args.output_dir, "dense-at-pruning") if measure else None
        save_pruned(model, out, report=report, tokenizer=tokenizer, overwrite=True, eval_results=results,
                    schedule=schedule.to_dict() if schedule else None,
                    distillation=cb.distill if cb is not None else None, training=training,
                    measure_speed=measure, baseline=baseline)
        if args.recipe == "structured":
            print(f"reloaded with stock transformers, greedy with and without cache: "
                  f"{check_stock_reload(model, out, tokenizer)!r}")
        print(f"evaluated on {results['dataset']}, {pruned['tokens']:,} tokens, at step {step}:")
        if dense is not None:
            print(f"eval loss dense control:                    {dense['loss']:.4f}")
        what = "of the parameters removed" if args.recipe == "structured" else "of pruned tensors"
        print(f"eval loss pruned ({report.global_sparsity:.1%} {what}): {pruned['loss']:.4f}")
        if measure:
            from hf_weightprune.publish.card_measured import ratio_words

            speed = load_sparsity(out)["measured"]["speed"]  # a ratio only where the runs' ranges do not overlap
            print(f"measured beside the dense model: prefill tokens/s {ratio_words(speed, 'prefill_tokens_per_s')}; "
                  f"decode tokens/s {ratio_words(speed, 'decode_tokens_per_s')}")
        print(f"{report.summary()}\nsaved to {out}")


if __name__ == "__main__":
    main()
