"""Structured pruning that makes SmolLM2-135M smaller and faster, at equal training tokens: ours vs the peers.

The real SmolLM2-135M-Instruct and the texts, windows and evaluation sets of `quality.py` / `recovery.py` (training:
Python docs, Linux kernel docs, KJV; out of domain: the Debian handbook; in domain: held-out documents of the
training sources). A size is a fraction of the decoder layers' parameters removed; every row of a size ends with the
same parameter count (within one unit per layer) and sees the same training windows in the same order:

- dense: plain fine-tune of `--steps` steps (the reference);
- ours: the first quarter of the steps dense, with `ImportanceConfig(criterion="sparsegpt", units=True)` (unit
  statistics and input Hessians from training, no calibration pass); candidate shapes (which axes take the budget,
  ranked by which unit statistic, then which compensation) pruned one-shot with `target_params`, the one with the
  lowest loss on `--search-windows` training windows kept (Minitron's candidate search, scored without its short
  retraining; the same procedure as `hf_weightprune.search_structures`); then the remaining steps
  with distillation from the dense weights of that first quarter (logits KL + CE; shapes differ, no hidden term);
- ours-ablation: the same structure and units with the other choice of compensation (the refit if the search chose
  none, none if it chose one): the effect of compensation;
- ours-depth: ours restricted to depth, the statistics phase's block influence (`structure="layers"`, no
  compensation: the structured OBS refit serves neurons and KV groups only), then ours' recovery: against `shortgpt`
  it shows training statistics against a calibration pass for the same structure (ours' search picked width only at
  every size so far, so `ours` is the width-only row);
- ours-lr4x, ours-hidden: probes of the gap to the dense fine-tune, not peer comparisons: ours with one change to
  its recovery, a 4x learning rate, or SquareHead's hidden-state term (`hidden_weight` 1.0; MLP-neuron pruning keeps
  every hidden state's shape);
- tp: Torch-Pruning (PyPI `torch-pruning`) MLP-neuron pruning of the pretrained model with its `GroupTaylorImportance`
  from `--calibration-windows` windows of the training documents, then all `--steps` steps with distillation from
  the pretrained model;
- shortgpt: ShortGPT's layer removal (arXiv 2403.03853): block influence `1 - cos(input, output)` of every decoder
  layer over the calibration windows, the lowest removed, then the same recovery;
- minitron: the Minitron recipe written from its paper (arXiv 2407.14679): activation importance of MLP neurons
  (mean over tokens, L2 over the batch) and embedding channels (LayerNorm outputs, same aggregation) from the
  calibration windows, width pruning of neurons and hidden channels (the split with the lowest calibration loss out
  of a few), then logit-only distillation (KL, alpha 1) for all `--steps` steps.

Every row is evaluated on both sets after training (and right after pruning, before recovery). The speed part runs
`hf_weightprune.publish.measure.measure_model` (what `save_pruned(measure_speed=True)` uses) on every saved pruned
model beside the dense pretrained one, the two alternating in one process: prefill tokens/s (batch 1 x
`--speed-seq-len`) and greedy decode tokens/s (`--new-tokens`, KV cache on), median [min-max] of `--repeats`; and
the peak memory (VmHWM) of a separate process per model that loads it and runs one prefill and decode.

    python benchmarks/structured.py --sizes 20% --rows ours,tp,shortgpt,minitron,ours-ablation,dense
    python benchmarks/structured.py --speed-only

One JSON per cell under `benchmarks/_cache/structured/`, so an interrupted run goes on where it stopped; writes
benchmarks/results/structured.md and structured.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the shared model, texts and windows)
import recovery as R  # noqa: E402  (training and saving helpers of the recovery benchmark)

WORK = Q.CACHE / "structured"
TP_SITE = Q.CACHE / "tp-site"
TP_VERSION = "1.6.1"
ALPHA, TEMPERATURE = 0.5, 2.0
ROWS = {
    "dense": "dense fine-tune (no pruning)",
    "ours": "ours: unit statistics + Hessians from training (first 25% of steps), shape search, distillation",
    "ours-ablation": "ours with the other choice of compensation (refit if the search chose none, else none)",
    "ours-depth": "ours, depth only: layers by block influence from training, distillation",
    "ours-lr4x": "ours with a 4x recovery learning rate (a probe of the gap to dense, not a peer comparison)",
    "ours-hidden": "ours with SquareHead hidden-state distillation (hidden_weight 1.0; a probe, as ours-lr4x)",
    "tp": "Torch-Pruning group Taylor (calibration), MLP neurons, then distillation",
    "shortgpt": "ShortGPT block influence (calibration), layers, then distillation",
    "minitron": "Minitron activation importance (calibration), neurons + hidden, logit distillation",
}
CANDIDATES = ("neurons", "neurons,heads", "layers,neurons", "neurons,hidden", "layers,neurons,hidden")
STATISTICS = ("activation", "activation_l2", "taylor")  # Minitron's activation importance; first-order Taylor
COMPENSATIONS = ("refit", "mean")


def _log(msg: str) -> None:
    print(f"[structured {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def decoder_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def keep_target(dense, size: float) -> int:
    """Parameters a pruned model of this size keeps: the dense count less `size` of the decoder layers' parameters."""
    return _params(dense) - round(size * decoder_params(dense))


def _slug(size: float) -> str:
    return f"{round(100 * size)}pct"


def _loss(model, windows, args) -> float:
    from hf_weightprune.tools.data import evaluate_loss

    return evaluate_loss(model, windows, batch_size=args.eval_batch_size)["loss"]


def _distill(teacher: Path, alpha: float = ALPHA, hidden_weight: float = 0.0):
    from hf_weightprune import DistillConfig

    return DistillConfig(teacher=str(teacher), alpha=alpha, temperature=TEMPERATURE, hidden_weight=hidden_weight)


def _recover(model, train, first: int, args, teacher: Path, tag: str, alpha: float = ALPHA,
             hidden_weight: float = 0.0) -> dict:
    """Fine-tune the pruned `model` on training windows `first..steps` with distillation from `teacher`."""
    from hf_weightprune import ImportanceCallback

    rest = train.select(range(first * args.batch_size, args.steps * args.batch_size))
    cb = ImportanceCallback(distill=_distill(teacher, alpha, hidden_weight))
    return R._train(model, rest, args.steps - first, [cb], args, tag, seed=0)


# ----------------------------------------------------------------------------------------------- ours


def stats_phase(train, args) -> tuple[Path, Path, dict]:
    """The first quarter of the steps, dense, with unit statistics and Hessians; the weights and importance saved."""
    out = WORK / f"stats-{args.steps}"
    info = out / "info.json"
    if info.is_file():
        return out / "model", out / "importance", json.loads(info.read_text())
    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune.files.unit_files import save_unit_state
    from hf_weightprune.testing import save_importance_dir

    first = args.steps // 4
    model = R._load(Q.base_model_dir())
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    res = R._train(model, train.select(range(first * args.batch_size)), first, [cb], args, "stats", seed=0)
    R._save(model, out / "model")
    imp = cb.importance()
    save_importance_dir(str(out / "importance"), imp.state_dict(), config=cb.config, meta=imp.meta, shapes=imp.shapes)
    save_unit_state(str(out / "importance"), imp.unit_state())
    res["steps"] = first
    out.mkdir(parents=True, exist_ok=True)
    Q._write_json(info, res)
    return out / "model", out / "importance", res


def _prune_ours(model_dir: Path, imp, structure: str, statistic: str, target: int, compensate: str | None):
    from hf_weightprune import PruneConfig, prune_

    model = R._load(model_dir)
    config = PruneConfig(structure=structure, target_params=target, unit_statistic=statistic, compensate=compensate)
    return model, prune_(model, imp, config, progress=False)


def choose_structure(model_dir: Path, imp, target: int, search, args) -> tuple[dict, dict]:
    """The candidate (structure, unit statistic, compensation) with the lowest one-shot loss on the search windows
    (training documents, never an evaluation set), in two stages: every structure x unit statistic without
    compensation, then the winner with each compensation."""
    losses: dict[str, float] = {}

    def score(s: str, stat: str, comp: str | None) -> None:
        key = f"{s} / {stat} / {comp}"
        try:
            model, _ = _prune_ours(model_dir, imp, s, stat, target, comp)
        except ValueError as e:  # a candidate the budget or the config cannot take
            _log(f"candidate {key}: {e}")
            return
        losses[key] = _loss(model, search, args)
        _log(f"candidate {key}: loss {losses[key]:.4f}, {_params(model):,} parameters")

    for s in CANDIDATES:
        for stat in STATISTICS:
            score(s, stat, None)
    if not losses:
        raise RuntimeError("no candidate structure could be pruned")
    s, stat, _ = min(losses, key=losses.get).split(" / ")
    for comp in COMPENSATIONS:
        score(s, stat, comp)
    s, stat, comp = min(losses, key=losses.get).split(" / ")
    return {"structure": s, "unit_statistic": stat, "compensate": None if comp == "None" else comp}, losses


def _structured_record(report) -> dict:
    s = getattr(report, "structured", None) or {}
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str, list, dict))} if isinstance(s, dict) else {}


# ----------------------------------------------------------------------------------------------- peers


def _calibration_batches(calibration, args):
    import torch

    ids = torch.tensor(calibration["input_ids"])
    return [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]


def prune_tp(model, calibration, target: int, args) -> dict:
    """Torch-Pruning `GroupTaylorImportance` MLP-neuron pruning, ratio set so the model keeps `target` parameters."""
    import torch

    sys.path.insert(0, str(TP_SITE))
    import torch_pruning as tp

    # The 1.6.1 wheel's `__version__` still says 1.6.0: check the installed distribution instead.
    if not (TP_SITE / f"torch_pruning-{TP_VERSION}.dist-info").is_dir():
        raise RuntimeError(f"torch-pruning {TP_VERSION} not in {TP_SITE}: pip install --no-deps --target {TP_SITE} "
                           f"torch-pruning=={TP_VERSION}")
    layers = model.model.layers
    per_neuron = 3 * model.config.hidden_size
    ratio = (_params(model) - target) / (per_neuron * model.config.intermediate_size * len(layers))
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith(("gate_proj", "up_proj"))]
    example = torch.randint(0, 100, (1, 16))
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupTaylorImportance(),
                                  pruning_ratio=ratio, ignored_layers=ignored + [model.model.embed_tokens],
                                  global_pruning=False, output_transform=lambda out: out.logits)
    model.zero_grad()
    for batch in _calibration_batches(calibration, args):
        model(input_ids=batch, labels=batch).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.config.intermediate_size = layers[0].mlp.gate_proj.out_features
    return {"ratio": ratio, "intermediate_size": model.config.intermediate_size}


def block_influence(model, calibration, args):
    """ShortGPT's BI of every decoder layer: mean over real tokens of 1 - cos(layer input, layer output)."""
    import torch

    n = len(model.model.layers)
    total, count = torch.zeros(n, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in _calibration_batches(calibration, args):
            hs = model(input_ids=batch, output_hidden_states=True).hidden_states
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
                total[i] += (1 - cos).sum()
            count += batch.numel()
    return total / count


def prune_shortgpt(model, calibration, target: int, args) -> dict:
    from hf_weightprune.prune.depth import remove_layers_

    bi = block_influence(model, calibration, args)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    n = max(1, round((_params(model) - target) / per_layer))
    drop = sorted(bi.argsort()[:n].tolist())
    remove_layers_(model, drop)
    return {"removed_layers": drop, "block_influence": [round(float(x), 5) for x in bi]}


def minitron_scores(model, calibration, args):
    """Neuron (down_proj input) and embedding-channel (every RMSNorm output) activation importance, Minitron's
    aggregation: mean over the sequence, then L2 over the batch."""
    import torch

    layers = model.model.layers
    neuron = {i: torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for i, layer in enumerate(layers)}
    channel = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    hooks = []

    def on_down(i):
        def hook(mod, inputs):
            neuron[i].add_(inputs[0].double().mean(dim=1).pow(2).sum(dim=0))
        return hook

    def on_norm(mod, inputs, output):
        channel.add_(output.double().mean(dim=1).pow(2).sum(dim=0))

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    try:
        with torch.no_grad():
            for batch in _calibration_batches(calibration, args):
                model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return {i: v.sqrt() for i, v in neuron.items()}, channel.sqrt()


def prune_minitron(model_dir: Path, calibration, search, target: int, args):
    """Minitron width pruning: 0, 1 or 2 steps of hidden channels (a step: the least multiple of 8 and the head count
    that the config accepts, 72 channels = 12.5% for SmolLM2), neurons filling the rest of the budget; the split with
    the lowest loss on the search windows is kept (the paper's candidate search, without its retraining)."""
    import torch

    from hf_weightprune.prune.hidden import shrink_hidden_
    from hf_weightprune.prune.surgery import shrink_mlp_

    probe = R._load(model_dir)
    neuron, channel = minitron_scores(probe, calibration, args)
    hidden, inter, n_layers = probe.config.hidden_size, probe.config.intermediate_size, len(probe.model.layers)
    best = None
    step = math.lcm(8, probe.config.num_attention_heads)
    for drop_h in (0, step, 2 * step):
        model = R._load(model_dir)
        if drop_h:
            keep = channel.argsort(descending=True)[: hidden - drop_h].sort().values
            shrink_hidden_(model, keep)
        per_neuron = 3 * model.config.hidden_size * n_layers
        drop_n = round((_params(model) - target) / per_neuron)
        if not 0 <= drop_n < inter:
            continue
        keep_n = {i: s.argsort(descending=True)[: inter - drop_n].sort().values for i, s in neuron.items()}
        shrink_mlp_(model, keep_n)
        loss = _loss(model, search, args)
        _log(f"minitron split: hidden -{drop_h}, neurons -{drop_n}: loss {loss:.4f}, {_params(model):,} parameters")
        if best is None or loss < best[0]:
            best = (loss, model, {"hidden_removed": drop_h, "neurons_removed_per_layer": drop_n})
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------- rows


def cell_path(row: str, size: float, steps: int) -> Path:
    return WORK / "cells" / f"{row}@{_slug(size)}@{steps}.json"


def oneshot_path(row: str, size: float, steps: int) -> Path:
    """A row pruned but not recovered (`--oneshot-only`); `steps` names the statistics phase ours read."""
    return WORK / "oneshot" / f"{row}@{_slug(size)}@{steps}.json"


def _save_oneshot(cell: dict, model, path: Path) -> dict:
    cell["params"] = _params(model)
    cell["decoder_params"] = decoder_params(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    Q._write_json(path, cell)
    _log(f"{cell['row']} @ {_slug(cell['size'])} one-shot: ppl ood {cell['oneshot']['ppl_ood']:.2f}, valid "
         f"{cell['oneshot']['ppl_valid']:.2f}, {cell['params']:,} parameters")
    return cell


def model_path(row: str, size: float, steps: int) -> Path:
    return WORK / "models" / f"{row}@{_slug(size)}@{steps}"


def run_row(row: str, size: float, sets, args) -> dict:
    """Prune (when the row prunes), evaluate, recover, evaluate, save: one cell."""
    path = cell_path(row, size, args.steps)
    if path.is_file():
        return json.loads(path.read_text())
    once = oneshot_path(row, size, args.steps)
    if args.oneshot_only and once.is_file():
        return json.loads(once.read_text())
    from hf_weightprune import load_importance

    train, calibration, valid, ood = sets
    search = calibration.select(range(args.search_windows))
    base = Q.base_model_dir()
    dense = R._load(base)
    target = keep_target(dense, size)
    cell: dict = {"row": row, "size": size, "params_dense": _params(dense), "decoder_params_dense":
                  decoder_params(dense), "target_params": target, "calibration_tokens": 0,
                  "train_tokens": args.steps * args.batch_size * args.seq_len}
    del dense
    _log(f"{row} @ {_slug(size)}: start (keep {target:,} parameters)")
    t = time.perf_counter()
    if row == "dense":
        model = R._load(base)
        cell.update(R._train(model, train, args.steps, [], args, row, seed=0))
    elif row in ("ours", "ours-ablation", "ours-depth", "ours-lr4x", "ours-hidden"):
        teacher, imp_dir, stats = stats_phase(train, args)
        imp = load_importance(str(imp_dir))
        chosen_path = WORK / "cells" / f"structure@{_slug(size)}@{args.steps}.json"
        if chosen_path.is_file():
            chosen = json.loads(chosen_path.read_text())
        else:
            best, losses = choose_structure(teacher, imp, target, search, args)
            chosen = {**best, "search_losses": losses}
            chosen_path.parent.mkdir(parents=True, exist_ok=True)
            Q._write_json(chosen_path, chosen)
        cell.update(chosen)
        t = time.perf_counter()
        comp = chosen["compensate"]
        if row == "ours-ablation":  # the same units, the other side of compensation
            comp = "refit" if comp is None else None
        structure = chosen["structure"]
        if row == "ours-depth":  # depth only: no compensation serves whole layers (config.COMPENSATED_AXES)
            structure, comp = "layers", None
            cell["structure"] = structure
        cell["compensate"] = comp
        model, report = _prune_ours(teacher, imp, structure, chosen["unit_statistic"], target, comp)
        cell["prune_seconds"] = time.perf_counter() - t
        cell["report"] = _structured_record(report)
        cell["oneshot"] = Q.evaluate_cell(model, valid, ood, args)
        if args.oneshot_only:
            return _save_oneshot(cell, model, once)
        first = args.steps // 4
        # The probes change one thing of the recovery: its learning rate, or SquareHead's hidden-state term (MLP
        # neurons keep every hidden state's shape; another structure's shapes would be refused by DistillConfig).
        rec_args = copy.copy(args)
        if row == "ours-lr4x":
            rec_args.lr = 4 * args.lr
        cell["recovery_lr"] = rec_args.lr
        rec = _recover(model, train, first, rec_args, teacher, f"{row}-{_slug(size)}",
                       hidden_weight=1.0 if row == "ours-hidden" else 0.0)
        cell.update(train_seconds=stats["train_seconds"] + rec["train_seconds"], steps=args.steps,
                    train_loss=rec["train_loss"], phase_steps=[first, args.steps - first])
    else:
        model = R._load(base)
        cell["calibration_tokens"] = args.calibration_windows * args.seq_len
        if row == "tp":
            cell["pruning"] = prune_tp(model, calibration, target, args)
        elif row == "shortgpt":
            cell["pruning"] = prune_shortgpt(model, calibration, target, args)
        elif row == "minitron":
            model, cell["pruning"] = prune_minitron(base, calibration, search, target, args)
        else:
            raise ValueError(f"unknown row {row!r}; choose from {list(ROWS)}")
        cell["prune_seconds"] = time.perf_counter() - t
        cell["oneshot"] = Q.evaluate_cell(model, valid, ood, args)
        if args.oneshot_only:
            return _save_oneshot(cell, model, once)
        rec = _recover(model, train, 0, args, base, f"{row}-{_slug(size)}", alpha=1.0 if row == "minitron" else ALPHA)
        cell.update(rec)
    cell["params"] = _params(model)
    cell["decoder_params"] = decoder_params(model)
    cell["config"] = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                             "num_attention_heads", "num_key_value_heads")}
    cell.update(Q.evaluate_cell(model, valid, ood, args))
    saved = R._save(model, model_path(row, size, args.steps))
    cell["file_bytes"] = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    path.parent.mkdir(parents=True, exist_ok=True)
    Q._write_json(path, cell)
    _log(f"{row} @ {_slug(size)}: ppl ood {cell['ppl_ood']:.2f}, valid {cell['ppl_valid']:.2f}, "
         f"{cell['params']:,} parameters, train {cell['train_seconds']:.0f} s")
    return cell


# ----------------------------------------------------------------------------------------------- speed and memory


def measure_speed(folders: dict[str, Path], args) -> dict:
    """Each pruned model beside the dense one in its own alternating run (`hf_weightprune`'s `measure_model`, the
    function `save_pruned(measure_speed=True)` uses): tokens/s and the peak memory of the process doing the work."""
    from hf_weightprune.publish.measure import measure_model

    out = {}
    for name, folder in folders.items():
        _log(f"speed and memory: {name}")
        out[name] = measure_model(str(folder), str(Q.base_model_dir()), seq_len=args.speed_seq_len,
                                  new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    return out


def shape_folders(cells: list[dict]) -> dict[str, Path]:
    """One model per distinct pruned shape among the cells, built from the dense pretrained model by keeping the
    first units of each axis (speed and memory depend on the shapes, not on which units were kept)."""
    from hf_weightprune.prune.depth import remove_layers_
    from hf_weightprune.prune.surgery import shrink_mlp_

    shapes: dict[tuple[int, int], list[str]] = {}
    for c in cells:
        cfg = (c.get("report") or {}).get("config", {}).get("after") or c.get("config")
        if cfg is None and c["row"] == "shortgpt":
            cfg = {"num_hidden_layers": 30 - len(c["pruning"]["removed_layers"]), "intermediate_size": 1536}
        if cfg is None and "pruning" in c:
            cfg = {"num_hidden_layers": 30, "intermediate_size": c["pruning"].get(
                "intermediate_size", 1536 - c["pruning"].get("neurons_removed_per_layer", 0))}
        if cfg is None or cfg.get("hidden_size", 576) != 576:
            continue
        shapes.setdefault((cfg["num_hidden_layers"], cfg["intermediate_size"]), []).append(c["row"])
    out = {}
    for (layers, inter), rows in sorted(shapes.items()):
        folder = WORK / "shapes" / f"L{layers}-i{inter}"
        if not (folder / "config.json").is_file():
            model = R._load(Q.base_model_dir())
            n = len(model.model.layers)
            if layers < n:
                remove_layers_(model, range(n - layers))
            if inter < model.config.intermediate_size:
                import torch

                shrink_mlp_(model, {i: torch.arange(inter) for i in range(layers)})
            R._save(model, folder)
        out[f"{layers} layers, intermediate {inter} ({', '.join(sorted(set(rows)))})"] = folder
    return out


# ----------------------------------------------------------------------------------------------- report


def _fmt3(v: list[float]) -> str:
    return f"{v[0]:.1f} [{v[1]:.1f}-{v[2]:.1f}]"


def write_report(cells: list[dict], speed: dict | None, args, out: Path) -> str:
    by = {(c["row"], c["size"]): c for c in cells}
    dense = next((c for c in cells if c["row"] == "dense"), None)
    sizes = sorted({c["size"] for c in cells if c["row"] != "dense"})
    lines = [] if any(c["row"] != "dense" for c in cells) else [
        "No recovered row has run yet: the tables below are the rows pruned one-shot (`--oneshot-only`).", ""]
    lines += [f"Every recovered row: {args.steps} steps x {args.batch_size} x {args.seq_len} = "
             f"{args.steps * args.batch_size * args.seq_len:,} training tokens from the pretrained "
             f"SmolLM2-135M-Instruct; lr {args.lr}; distillation alpha {ALPHA} (Minitron: 1.0, logits only), "
             f"temperature {TEMPERATURE}. Cells: perplexity out of domain (Debian handbook) / in domain (held-out "
             "documents of the training sources).", ""]
    if dense:
        lines += [f"Dense fine-tune: {dense['ppl_ood']:.2f} / {dense['ppl_valid']:.2f} "
                  f"({dense['train_seconds'] / dense['steps']:.1f} s/step), {dense['params']:,} parameters.", ""]
    for size in sizes:
        got = [(r, by[(r, size)]) for r in ROWS if (r, size) in by]
        c0 = got[0][1]
        lines += [f"### {100 * size:.0f}% of the decoder layers' parameters removed (keep {c0['target_params']:,} of "
                  f"{c0['params_dense']:,})", "",
                  "| row | one-shot | after recovery | x dense (OOD / in) | structure | parameters (decoder) | file MiB "
                  "| calibration tokens | train s/step |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r, c in got:
            ratio = (f"{c['ppl_ood'] / dense['ppl_ood']:.3f}x / {c['ppl_valid'] / dense['ppl_valid']:.3f}x"
                     if dense else "-")
            one = c.get("oneshot")
            one = f"{one['ppl_ood']:.2f} / {one['ppl_valid']:.2f}" if one else "-"
            cfg = c["config"]
            shape = (f"{cfg['num_hidden_layers']}L h{cfg['hidden_size']} i{cfg['intermediate_size']} "
                     f"kv{cfg['num_key_value_heads']}")
            peer = {"tp": "neurons", "shortgpt": "layers", "minitron": "neurons,hidden"}.get(r, "-")
            if c.get("structure") == "layers":  # ranked by block influence: the unit statistic plays no part
                what = "layers (block influence)"
            elif "structure" in c:
                what = f"{c['structure']} ({c['unit_statistic']}, {c.get('compensate')})"
            else:
                what = peer
            lines.append(f"| {ROWS[r]} | {one} | {c['ppl_ood']:.2f} / {c['ppl_valid']:.2f} | {ratio} | {what}: {shape} "
                         f"| {c['params']:,} ({c['decoder_params']:,}) | {c['file_bytes'] / 2**20:.1f} | "
                         f"{c['calibration_tokens']:,} | {c['train_seconds'] / c['steps']:.1f} |")
        lines.append("")
        for r, c in got:
            if "search_losses" in c and r == "ours":
                lines.append("Shape search of ours (one-shot loss on "
                             f"{args.search_windows} calibration windows): "
                             + ", ".join(f"{s} {v:.4f}" for s, v in c["search_losses"].items()) + ".")
        lines.append("")
    once = [json.loads(f.read_text()) for f in sorted((WORK / "oneshot").glob(f"*@{args.steps}.json"))]
    full = {(c["row"], c["size"]) for c in cells}
    once = [c for c in once if (c["row"], c["size"]) not in full] + [c for c in cells if "oneshot" in c]
    if once:
        lines += ["### One-shot, before any recovery", "",
                  "Each row pruned as above, evaluated before recovery (ours from its statistics phase of "
                  f"{args.steps // 4} training steps, the peers from {args.calibration_windows} calibration windows).",
                  "", "| size | row | perplexity OOD / in domain | parameters |", "|---|---|---:|---:|"]
        path = WORK / f"dense-evals@{args.steps}.json"
        for name, c in (json.loads(path.read_text()) if path.is_file() else {}).items():
            lines.append(f"| 0% | dense: {name} | {c['ppl_ood']:.2f} / {c['ppl_valid']:.2f} | - |")
        for c in sorted(once, key=lambda c: (c["size"], list(ROWS).index(c["row"]))):
            lines.append(f"| {100 * c['size']:.0f}% | {ROWS[c['row']]} | {c['oneshot']['ppl_ood']:.2f} / "
                         f"{c['oneshot']['ppl_valid']:.2f} | {c['params']:,} |")
        lines.append("")
    if speed:
        some = next(iter(speed.values()))
        lines += ["### Speed and memory (CPU)", "",
                  f"`measure_model` (the function behind `save_pruned(measure_speed=True)`), each pruned model in its "
                  f"own run beside the dense pretrained model, the two alternating: prefill of batch 1 x "
                  f"{some['seq_len']} tokens without cache, greedy decode of {some['new_tokens']} tokens with the KV "
                  f"cache; median [min-max] of {some['repeats']}; {some['threads']} threads, {some['dtype']}, "
                  f"{some['device_name']}. Peak memory: {some['memory_measure']} of a separate process per model that "
                  "loads it and runs one prefill and decode.", "",
                  "| model | parameters | dense / pruned bytes | prefill tok/s pruned vs dense | prefill speedup (% of "
                  "bytes ratio) | decode tok/s pruned vs dense | decode speedup (% of bytes ratio) | peak RSS MiB pruned "
                  "vs dense (saved) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in speed.items():
            p, d = m["pruned"], m["dense"]
            br = d["parameter_bytes"] / p["parameter_bytes"]
            ps = p["prefill_tokens_per_s"]["median"] / d["prefill_tokens_per_s"]["median"]
            ds = p["decode_tokens_per_s"]["median"] / d["decode_tokens_per_s"]["median"]

            def f(s):
                return f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]"

            mem = (f"{p['peak_rss_bytes'] / 2**20:.0f} vs {d['peak_rss_bytes'] / 2**20:.0f} "
                   f"({(d['peak_rss_bytes'] - p['peak_rss_bytes']) / 2**20:.0f})" if "peak_rss_bytes" in p else "-")
            lines.append(f"| {name} | {p['num_parameters']:,} | {br:.3f}x | {f(p['prefill_tokens_per_s'])} vs "
                         f"{f(d['prefill_tokens_per_s'])} | {ps:.3f}x ({ps / br:.0%}) | {f(p['decode_tokens_per_s'])} vs "
                         f"{f(d['decode_tokens_per_s'])} | {ds:.3f}x ({ds / br:.0%}) | {mem} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    from hf_weightprune.io_utils import atomic_write_text

    atomic_write_text(out / "structured.md", text)
    Q._write_json(out / "structured.json", {"args": vars(args), "cells": cells, "speed": speed})
    return text


def _parse_size(s: str) -> float:
    v = float(s.rstrip("%")) / (100 if s.endswith("%") else 1)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"size {s!r}: a fraction of the decoder parameters in (0, 1), e.g. 20%")
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="20%,35%,50%", help="comma-separated fractions of the decoder parameters removed")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--search-windows", type=int, default=16, help="calibration windows scoring the candidate shapes")
    p.add_argument("--valid-windows", type=int, default=12)
    p.add_argument("--ood-windows", type=int, default=99)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--speed-seq-len", type=int, default=256, help="prefill tokens of the speed part")
    p.add_argument("--speed-only", action="store_true", help="only the speed and memory table of the saved models")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the cached cells and the "
                                                              "speed table of the last report")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--eval-dense", action="store_true", help="evaluate the pretrained model and the model after ours' "
                                                             "statistics phase (the one-shot rows' starting points)")
    p.add_argument("--speed-shapes", action="store_true", help="speed and memory of each distinct pruned shape among "
                                                               "the cells (one-shot ones included), built from the "
                                                               "dense model")
    p.add_argument("--oneshot-only", action="store_true", help="prune and evaluate, no recovery (ours still trains "
                                                               "its statistics phase)")
    p.add_argument("--deadline", default=None, help="HH:MM (UTC): start no new cell after it")
    p.add_argument("--output", default=str(Q.ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    rows = args.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown row {bad[0]!r}; choose from {list(ROWS)}")
    deadline = Q.deadline_at(args.deadline)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Q.base_model_dir())
    args.calibration_windows = max(args.calibration_windows, args.search_windows)
    if not (args.speed_only or args.report_only):
        sets = Q._windows_cached(tok, args)
        for size in sizes:
            for row in rows:
                if row == "dense" and size != sizes[0]:
                    continue
                if deadline and time.time() > deadline and not cell_path(row, size, args.steps).is_file():
                    _log(f"deadline: {row} @ {_slug(size)} not run")
                    continue
                run_row(row, sizes[0] if row == "dense" else size, sets, args)
    dense_evals = WORK / f"dense-evals@{args.steps}.json"
    if args.eval_dense and not dense_evals.is_file():
        sets = Q._windows_cached(tok, args)
        got = {"pretrained": Q.evaluate_cell(R._load(Q.base_model_dir()), sets[2], sets[3], args)}
        stats = WORK / f"stats-{args.steps}" / "model"
        if stats.is_dir():
            got[f"after {args.steps // 4} steps (ours' statistics phase)"] = Q.evaluate_cell(R._load(stats), sets[2],
                                                                                            sets[3], args)
        Q._write_json(dense_evals, got)
    cells = [json.loads(f.read_text()) for f in sorted((WORK / "cells").glob(f"*@{args.steps}.json"))
             if not f.name.startswith("structure@")]
    if args.oneshot_only and not args.speed_shapes:
        args.no_speed = True
    speed = None
    if args.report_only:
        last = Path(args.output) / "structured.json"
        speed = json.loads(last.read_text()).get("speed") if last.is_file() else None
    elif not args.no_speed:
        folders = {}
        if args.speed_shapes:
            once = [json.loads(f.read_text()) for f in sorted((WORK / "oneshot").glob(f"*@{args.steps}.json"))]
            folders = shape_folders(cells + once)
        for c in ([] if args.speed_shapes else cells):
            if c["row"] != "dense" and model_path(c["row"], c["size"], args.steps).is_dir():
                folders[f"{c['row']} @ {100 * c['size']:.0f}%"] = model_path(c["row"], c["size"], args.steps)
        speed = measure_speed(folders, args)
    print(write_report(cells, speed, args, Path(args.output)))


if __name__ == "__main__":
    main()
