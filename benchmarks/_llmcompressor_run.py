"""One llm-compressor one-shot pruning run, executed inside `benchmarks/_cache/llmc-venv` by `quality.py`.

llm-compressor pins an older transformers than the project's, so it cannot share the project's environment; this
script imports nothing from `hf_weightprune`. It loads a float32 checkpoint, runs `llmcompressor.oneshot` with
`SparseGPTModifier` (Frantar & Alistarh 2023, arXiv 2301.00774) or `WandaPruningModifier` (Sun et al. 2023, arXiv
2306.11695) on the given token windows, and writes the pruned decoder weights as plain safetensors (no
compressed-tensors format, so the project's transformers loads them) plus `run.json` with timings.

    benchmarks/_cache/llmc-venv/bin/python benchmarks/_llmcompressor_run.py --model DIR --calibration FILE.json \
        --method sparsegpt --sparsity 0.5 --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="float32 safetensors checkpoint folder")
    p.add_argument("--calibration", required=True, help='JSON {"input_ids": [[int, ...], ...]} of equal-length windows')
    p.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned (0.5 for 2:4)")
    p.add_argument("--mask-structure", default="0:0", help='"0:0" unstructured or "N:M", e.g. "2:4"')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", required=True, help="folder for pruned.safetensors and run.json")
    args = p.parse_args()
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity must be in (0, 1), got {args.sparsity}")

    start = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import __version__ as llmc_version
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as tf_version

    torch.set_num_threads(args.threads)
    windows = json.loads(Path(args.calibration).read_text())["input_ids"]
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    modifier = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    # lm_head is tied to the embedding here and is not pruned by any row of the benchmark.
    recipe = modifier(sparsity=args.sparsity, mask_structure=args.mask_structure, targets=["Linear"],
                      ignore=["re:.*lm_head"])
    loaded = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=dataset, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]), shuffle_calibration_samples=False)
    done = time.perf_counter()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    # Only the decoder Linears changed; lm_head shares the embedding's storage, so it is left out.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if k.startswith("model.layers.") and k.endswith("proj.weight")}
    tmp = out / f".pruned.{uuid.uuid4().hex}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "pruned.safetensors")
    info = {"method": args.method, "sparsity": args.sparsity, "mask_structure": args.mask_structure,
            "calibration_windows": len(windows), "calibration_tokens": sum(map(len, windows)),
            "oneshot_seconds": done - loaded, "load_seconds": loaded - start,
            "llmcompressor": llmc_version, "transformers": tf_version, "torch": torch.__version__}
    tmp = out / f".run.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / "run.json")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
