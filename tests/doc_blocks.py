"""Fenced code blocks of the Markdown docs, and the fixtures that fill their placeholders (used by tests/test_docs.py).

A block is run when its fence says ```python (executed in one namespace per document, in order, like a notebook) or
```bash / ```sh / ```console / ```shell (each line starting with `hf-weightprune` or `python`, after an optional
`$ ` prompt, is one command). Other blocks (```json, untagged listings) are output shown to the reader: not code.

Conventions, written as an HTML comment on the line(s) right above a fence (invisible on GitHub):
- `<!-- doctest: skip REASON -->`: the block is not run here; REASON is required and is listed by the test.
- `<!-- doctest: setup NAME -->`: run the fixture `SETUPS[NAME]` into the document's namespace first.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "data" / "kjv"
RUN_LANGS = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "console": "shell", "shell": "shell"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"<!--\s*doctest:\s*(?P<kind>skip|setup)\b\s*(?P<arg>.*?)\s*-->")


def doc_files() -> list[Path]:
    """README.md, then docs/*.md in name order: the documents whose blocks are run."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # fence info string, lower case ("" when untagged)
    code: str  # body, dedented by the fence's own indentation
    skip: str | None = None  # reason, when marked `doctest: skip`
    setups: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str | None:
        """`"python"`, `"shell"`, or None for a block that is output or data, not code."""
        return RUN_LANGS.get(self.lang)

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"

    def commands(self) -> list[str]:
        """The command lines of a shell block (`$ ` prompts removed; continuation backslashes joined)."""
        text = self.code.replace("\\\n", " ")
        lines = (ln.strip().removeprefix("$ ") for ln in text.splitlines())
        return [ln for ln in lines if ln.split(" ", 1)[0] in ("hf-weightprune", "python")]


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path`, with the `doctest:` directives of the comment lines right above it.

    Raises:
        ValueError: a fence that is never closed, or a `doctest: skip` without a reason (one line naming the place).
    """
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: code fence {fence} is never closed")
        i += 1
        block = Block(path, start + 1, m["lang"].lower(), "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and (not lines[j].strip() or _DIRECTIVE.search(lines[j])):
            d = _DIRECTIVE.search(lines[j])
            if d and d["kind"] == "skip":
                if not d["arg"]:
                    raise ValueError(f"{block.where}: `doctest: skip` needs a reason after it")
                block.skip = d["arg"]
            elif d:
                block.setups.insert(0, d["arg"])
            j -= 1
        blocks.append(block)
    return blocks


# ----------------------------------------------------------------------------------------------------- fixtures
# Every document runs in its own empty working directory (the test chdirs there), so the docs' relative paths
# (`out`, `out-pruned`, `valid.txt`) are real folders of that run. Training is kept to a few steps of a tiny Llama.

SEQ = 32
TRAIN = dict(max_steps=6, save_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
             use_cpu=True, disable_tqdm=True, seed=0)
LORA_TRAIN = {**TRAIN, "max_steps": 20, "save_strategy": "no"}  # the schedule example prunes at steps 10 and 20


def _tok_and_data():
    from hf_weightprune.testing import train_tokenizer
    from hf_weightprune.tools.data import load_texts, make_windows

    texts = load_texts(KJV / "train.txt")[:30]
    tok = train_tokenizer(texts, vocab_size=320)
    return tok, make_windows(tok, texts, seq_len=SEQ, max_windows=64)


def _model(tok):
    from hf_weightprune.testing import tiny_llama

    # 256 positions: the CLI's default --seq_len for sweep and --eval_data windows
    return tiny_llama(vocab_size=len(tok), max_position_embeddings=256)


def setup_training(ns: dict, env) -> None:
    """`model`, `tok`, `args` (output_dir `out`), `train_ds`, `peft_model` (LoRA r=4 on another tiny Llama), and
    `valid.txt` in the working directory (the shipped KJV validation text)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    tok, train_ds = _tok_and_data()
    shutil.copy(KJV / "valid.txt", "valid.txt")
    ns.update(tok=tok, train_ds=train_ds, model=_model(tok), args=TrainingArguments("out", **TRAIN),
              peft_model=get_peft_model(_model(tok), LoraConfig(r=4, target_modules="all-linear")))


def setup_trained_run(ns: dict, env) -> None:
    """A real training run in `out/` with the callback, plus a second one named "wanda" (`importance-wanda/`),
    checkpoints every 3 steps, model and tokenizer saved, pushed by the Trainer to the loopback Hub as `me/my-run`
    (`hub_strategy="checkpoint"`: `last-checkpoint/` too)."""
    from transformers import Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig

    setup_training(ns, env)
    args = TrainingArguments("out", **TRAIN, push_to_hub=True, hub_model_id="me/my-run", hub_strategy="checkpoint",
                             hub_token=env.hub.token)
    trainer = Trainer(model=ns["model"], args=args, train_dataset=ns["train_ds"], processing_class=ns["tok"],
                      callbacks=[ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude")),
                                 ImportanceCallback(ImportanceConfig(criterion="wanda", name="wanda"))])
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub()
    ns["last_step"] = trainer.state.global_step


def setup_raw_loop(ns: dict, env) -> None:
    """What a raw training loop has before it drives the callback's events: `out`, `S` steps, `cb`, `model`, `opt`,
    the `TrainingArguments`/`TrainerState`/`TrainerControl` classes, and `loss` whose `backward()` runs the next
    batch's forward and backward (the loop's own forward is the user's code, not the doc's)."""
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig

    tok, train_ds = _tok_and_data()
    model = _model(tok)
    from transformers import default_data_collator

    batches = iter(torch.utils.data.DataLoader(train_ds, batch_size=8, collate_fn=default_data_collator))

    class NextBatchLoss:
        def backward(self):
            batch = next(batches)
            model(**batch).loss.backward()

    ns.update(out="out", S=4, model=model, cb=ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude")),
              opt=torch.optim.AdamW(model.parameters(), lr=1e-2), loss=NextBatchLoss(),
              TrainingArguments=TrainingArguments, TrainerState=TrainerState, TrainerControl=TrainerControl)


SETUPS = {"training": setup_training, "trained_run": setup_trained_run, "raw_loop": setup_raw_loop}

# A placeholder in a block -> what runs instead, per document (a str, or a function of the namespace). Only
# placeholders: the code around them runs as written.
SUBSTITUTIONS = {
    "README.md": {
        # the elided fine-tuning of the schedule example: the LoRA model trained with that callback, 20 steps
        "\n...\n": "\nfrom transformers import TrainingArguments as _Args\n"
                   f"Trainer(model=peft_model, args=_Args('out-lora', **{LORA_TRAIN!r}), train_dataset=train_ds, "
                   "callbacks=[cb]).train()\n",
        "[--include_importance]": "--include_importance",
        # the shipped training text, from the repository (each document runs in an empty folder)
        "data/kjv/train.txt": str(KJV / "train.txt"),
        "[--include-importance]": "--include-importance",
    },
    # the docs' example step; the fixture's run is shorter
    "file_formats.md": {"checkpoint-500": lambda ns: f"checkpoint-{ns['last_step']}"},
}


# (document, a substring of a Python block) -> assertions run in the namespace right after that block: the value the
# block's text promises, so a block that runs but does the wrong thing fails too.
CHECKS = {
    ("README.md", 'save_pruned(model, "out-s/measured"'): (
        # measured beside out-s/dense: fewer parameters, smaller files, and the card states the speed it measured
        "assert measured['speed']['ratios']['parameter_bytes'] < 1 and measured['speed']['dense'] is not None\n"
        "assert measured['weight_files']['bytes'] < measured['dense_weight_files']['bytes']\n"
        "assert 'Measured when it was saved' in open('out-s/measured/README.md').read()\n"
    ),
    ("README.md", "save_pruned(model, \"out-pruned\""): (
        "assert abs(report.global_sparsity - 0.5) < 0.01, report.global_sparsity\n"
        "assert json.load(open('out-pruned/sparsity.json'))['global_sparsity'] == report.global_sparsity\n"
        "assert any(k.startswith('importance/') for row in trainer.state.log_history for k in row), "
        "'attach(trainer): no importance metric reached log_history'\n"
    ),
    ("README.md", "merge_and_unload_sparse(peft_model)"): (
        # the merged LoRA model keeps the schedule's zeros: zero wherever the held masks prune, at the final 0.6
        "held = cb.mask_holder.masks\n"
        "weights = dict(model.named_parameters())\n"
        "assert held and all(bool((weights[n][~m.bool()] == 0).all()) for n, m in held.items())\n"
        "zeros = sum(int((weights[n] == 0).sum()) for n in held) / sum(weights[n].numel() for n in held)\n"
        "assert abs(zeros - 0.6) < 0.01, zeros\n"
    ),
    ("README.md", "masks_from=\"out-pruned\"),"): (
        # the recovery recipe trains: 4 steps on the pruned checkpoint, distilled from out/, its zeros held
        "from transformers import AutoModelForCausalLM, Trainer, TrainingArguments\n"
        "pruned = AutoModelForCausalLM.from_pretrained('out-pruned')\n"
        "zeros = {n: p == 0 for n, p in pruned.named_parameters() if n.endswith('proj.weight')}\n"
        "before = {n: p.detach().clone() for n, p in pruned.named_parameters()}\n"
        "Trainer(model=pruned, args=TrainingArguments('out-recover', **{**TRAIN, 'max_steps': 4, "
        "'save_strategy': 'no'}), train_dataset=train_ds, callbacks=[cb]).train()\n"
        "assert all(bool((p[zeros[n]] == 0).all()) for n, p in pruned.named_parameters() if n in zeros)\n"
        "assert any(not torch.equal(p, before[n]) for n, p in pruned.named_parameters()), 'nothing trained'\n"
    ),
    ("README.md", "refit_at=0.75, cross_term=True"): (
        # the hold re-fit ran at step 6 of 8 (the edits: out/ minus out-pruned), and the held zeros stayed zero
        "held = load_masks('out-pruned')\n"
        "weights = dict(student.named_parameters())\n"
        "assert cb.mask_holder.refitted_at == 6\n"
        "assert held and all(bool((weights[n][~m] == 0).all()) for n, m in held.items())\n"
    ),
    ("README.md", "PruneConfig(sparsity=0.5, cross_alpha=0.25)"): (
        # the offline asymmetric sweep used the run's cross term on its dense teacher (its start), and the files say so
        "meta = json.load(open('out-x/offline/sparsity.json'))\n"
        "assert load_importance('out-x/run').has_cross and report.cross_term['weights'] > 0, report.cross_term\n"
        "assert meta['cross_term'] == {'alpha': 0.25, 'weights': report.cross_term['weights']}, meta['cross_term']\n"
        "assert 'GPTAQ' in open('out-x/offline/README.md').read()\n"
    ),
    ("README.md", "masks_from=\"out-e/pruned\""): (
        # one-shot from training statistics, then hold + distillation: OBS-pruned at 0.5, the zeros held through the
        # recovery, which trained and distilled; the final files state the sparsity the weights have
        "from safetensors.torch import load_file\n"
        "masks = load_masks('out-e/pruned')\n"
        "final = load_file('out-e/final/model.safetensors')\n"
        "assert report.reconstruction == 'OBS' and abs(report.global_sparsity - 0.5) < 1e-3, report.global_sparsity\n"
        "assert all(torch.equal(final[n] != 0, m) for n, m in masks.items())\n"
        "assert any(not torch.equal(final[n], load_file('out-e/pruned/model.safetensors')[n]) for n in masks)\n"
        "assert json.load(open('out-e/final/sparsity.json'))['global_sparsity'] == report.global_sparsity\n"
        "assert [r['distill/kl'] for r in trainer.state.log_history if 'distill/kl' in r][-1] > 0\n"
        # local folders recorded relative to the pruned folder: no absolute path of this machine in it
        "assert json.load(open('out-e/final/sparsity.json'))['distillation']['teacher'] == '../dense'\n"
        "final_meta = json.load(open('out-e/final/sparsity.json'))\n"
        "assert final_meta['criterion'] == 'sparsegpt' and final_meta['scope'] == 'row' and final_meta['importance']\n"
        "assert 'unknown' not in open('out-e/final/README.md').read()\n"
        "assert 'trained against the local checkpoint `dense`' in open('out-e/final/README.md').read()\n"
    ),
    ("README.md", "search_structures(dense"): (
        # the lowest measured loss won, 2 recovery steps each, the folder's files state the table and the choice
        "losses = [r['loss'] for r in search.candidates if r['skipped'] is None]\n"
        "assert search.candidates[search.best_index]['loss'] == min(losses) and len(losses) == 3, search.table()\n"
        "assert search.recovery_steps == 2 and search.distillation['teacher'] == 'dense', search.distillation\n"
        "meta = json.load(open('out-s/searched/sparsity.json'))\n"
        "assert meta['search'] == json.loads(json.dumps(search.to_dict())) and meta['structure'] == search.best.structure\n"
        "assert '**Shape search**' in open('out-s/searched/README.md').read()\n"
        "assert sum(p.numel() for p in dense.parameters()) == meta['structured']['num_parameters']['before']\n"
    ),
    ("README.md", "target_params=0.8, compensate=\"refit\""): (
        # the structured recipe: 80% of the parameters kept (within a unit per layer), refit, distilled from the dense
        # teacher, and the files state the parameter counts the reloaded checkpoint really has
        "from transformers import AutoModelForCausalLM\n"
        "count = report.structured['num_parameters']\n"
        "assert count['after'] < count['before'] and abs(count['after'] / count['before'] - 0.8) < 0.02, count\n"
        "small, dense = (AutoModelForCausalLM.from_pretrained(f'out-s/{d}') for d in ('final', 'dense'))\n"
        "assert sum(p.numel() for p in small.parameters()) == count['after']\n"
        "assert sum(p.numel() for p in dense.parameters()) == count['before']\n"
        "meta = json.load(open('out-s/final/sparsity.json'))\n"
        "assert meta['structured']['num_parameters'] == count and meta['structured']['compensation'] == 'refit'\n"
        "assert meta['distillation']['hidden_weight'] == 0.0 and meta['distillation']['teacher'] == '../dense'\n"
        "assert f\"| Parameters | {count['before']:,} | {count['after']:,} |\" in open('out-s/final/README.md').read()\n"
        "assert [r['distill/kl'] for r in trainer.state.log_history if 'distill/kl' in r][-1] > 0\n"
        # the recovery only distilled: no importance gathered, logged or written
        "import os\n"
        "assert not any('importance' in n for _, ds, fs in os.walk('out-s/distill') for n in ds + fs)\n"
        "assert not any(k.startswith('importance/') for r in trainer.state.log_history for k in r)\n"
        # the card says what was done: the refit, no "no reconstruction", no axis that did not change, the papers
        "card = open('out-s/final/README.md').read()\n"
        "assert 're-fitted by least squares' in card and 'unchanged by pruning' not in card\n"
        "assert 'layers,neurons' not in card and '2412.18110' in card.split('## References')[1]\n"
        # units ranked by the unit statistic, not the importance's criterion; the budget stated as a budget
        "assert 'not used for the units, which are ranked by mean activation magnitude' in card\n"
        "assert f\"**Target**: keep {meta['structured']['target_params']:,} of {count['before']:,} parameters\" in card\n"
        "assert ('no decoder layer removed at this budget' in card) == (meta['structured']['axes']['layers']['removed'] == [])\n"
        # the title and the Structure line name the units removed, not every axis the structure allowed
        "no_layer = meta['structured']['axes']['layers']['removed'] == []\n"
        "assert ('structured pruning of decoder layers' in card) != no_layer, card.split('## Method')[1][:600]\n"
        "assert ('decoder layers could also be removed; none were at this budget' in card) == no_layer\n"
        "assert ('2403.03853' in card) != no_layer  # ShortGPT cited only when a layer went\n"
        # the recovery after the one-shot prune is stated, not only the teacher
        "assert 'pruned in one shot, then fine-tuned with distillation' in card\n"
        "assert 'the pruned model was then fine-tuned with the distillation below' in card\n"
        "assert '## Sparsity per module type' not in card  # a combination has no per-module-type table\n"
        "assert not any(f'{r} {n} -> {n}' in card.split('## Method')[0] for r in ('decoder layers', 'mlp intermediate size')\n"
        "               for n in range(1, 4096))\n"
    ),
    ("distributed.md", "cb.on_train_end"): (
        "assert load_importance('out/importance').meta['num_samples'] == S\n"
    ),
}


def check_globals(ns: dict) -> dict:
    """The namespace a CHECKS snippet runs in: the document's, plus helpers the document itself never sees."""
    import json

    import torch

    from hf_weightprune import load_importance
    from hf_weightprune.files.pruned_files import load_masks

    return {**ns, "json": json, "torch": torch, "load_importance": load_importance, "load_masks": load_masks,
            "TRAIN": TRAIN}


def substitute(block: Block, ns: dict, text: str) -> str:
    for placeholder, value in SUBSTITUTIONS.get(block.path.name, {}).items():
        if placeholder in text:
            text = text.replace(placeholder, value(ns) if callable(value) else value)
    return text


# What each CLI subcommand says it writes (README / docs): checked after the command exits 0.
def expected_outputs(argv: list[str]) -> list[str]:
    """Paths (or `hub:REPO/FILE`) a command line must have produced, from the docs' description of that command."""
    opt = _options(argv)
    cmd = argv[0]
    if cmd == "prune":
        out = opt.get("output_dir") or opt.get("output")
        return [f"{out}/{f}" for f in ("config.json", "sparsity.json", "README.md")]
    if cmd == "sweep":
        out = opt.get("output_dir") or opt.get("output")
        return [f"{out}/{f}" for f in ("sweep.csv", "sweep.json", "sweep.png")]
    if cmd == "inspect":
        return [opt["plot"]] if "plot" in opt else []
    if cmd == "push":
        repo = opt.get("repo_id")
        files = ["README.md", "sparsity.json", "config.json"]
        if "include_importance" in opt:
            files.append("importance/importance_config.json")
        return [f"hub:{repo}/{f}" for f in files]
    return []


def _options(argv: list[str]) -> dict[str, str]:
    """`--name value` / `--name` flags with dashes folded to underscores (both spellings appear in docs)."""
    opt, i = {}, 1
    while i < len(argv):
        if argv[i].startswith("--"):
            key = argv[i][2:].replace("-", "_")
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            opt[key] = argv[i + 1] if has_value else ""
            i += 2 if has_value else 1
        else:
            i += 1
    return opt


def split_command(line: str) -> list[str]:
    """shlex words of a doc command line, `# comments` dropped."""
    return shlex.split(line, comments=True)


def written_paths(code: str) -> list[str]:
    """Paths a Python block's comments say it writes: `# writes out/checkpoint-N/importance/ and out/importance/`.

    `N` stands for any step (a glob), so the check is that at least one such folder exists."""
    found = []
    for comment in re.findall(r"#.*?\bwrites\s+(.*)", code):
        found += [p.replace("-N/", "-*/") for p in re.findall(r"[\w.-]+(?:/[\w.*-]+)+/?", comment)]
    return found


def exists(path: str) -> bool:
    from glob import glob

    return bool(glob(path)) if "*" in path else os.path.exists(path)
