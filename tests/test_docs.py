"""The docs are tests: every code block of README.md and docs/*.md runs here, and docs/architecture.md's import rules
are the package's real imports.

- Python blocks run in one namespace per document, in order (like a notebook), with placeholders (`model`, `tok`,
  `args`, `train_ds`, `peft_model`, `out`, Hub repo ids) filled by the fixtures of `tests/doc_blocks.py`: a tiny Llama
  trained a few steps with the real Trainer on the shipped KJV text, and the loopback Hub (`hub_server`).
- Shell blocks: every `hf-weightprune ...` line runs through `hf_weightprune.tools.cli.main(shlex.split(...))` (the first
  `inspect` line through a real subprocess) and must exit 0 and write the files the docs say it writes.
- A block that cannot run here carries `<!-- doctest: skip REASON -->`; `SKIPPED` lists them all.
- `LANDING` lists blocks written for behaviour another branch is landing now; they are expected to fail until it
  does. When one passes, the test fails asking to delete its entry: that is how a merge shows what drifted.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests import doc_blocks as D

# (document, a substring of the block or command line) -> why it cannot run here. Must equal the docs' directives.
SKIPPED = {
    ("README.md", "bash scripts/demo.sh"): "builds .venv and trains for minutes; the demo script runs in tests/test_quickstart_demo.py",
}

# (document, a substring of the block or command line) -> the branch whose behaviour it documents.
LANDING: dict[tuple[str, str], str] = {}


class Env:
    def __init__(self, hub):
        self.hub = hub


def _matches(table: dict, doc: str, text: str):
    return [(key, value) for key, value in table.items() if key[0] == doc and key[1] in text]


def _python(block: D.Block, ns: dict) -> list[str]:
    code = D.substitute(block, ns, block.code)
    exec(compile(code, block.where, "exec"), ns)  # noqa: S102 - the docs' own code, run as the reader would
    for (doc, key), check in D.CHECKS.items():
        if doc == block.path.name and key in block.code:
            exec(compile(check, f"{block.where} (CHECKS)", "exec"), D.check_globals(ns))  # noqa: S102
    return [f"{block.where}: the block says it writes {p}, which is missing"
            for p in D.written_paths(block.code) if not D.exists(p)]


def _command(block: D.Block, line: str, ns: dict, env: Env, state: dict) -> list[str]:
    from hf_weightprune.tools.cli import main

    argv = D.split_command(D.substitute(block, ns, line))
    if argv[0] == "python" or (argv[1] == "inspect" and not state.get("subprocess_done")):
        # One real process per document at least: what a user's shell runs (console script = `-m ...cli`)
        state["subprocess_done"] = True
        cmd = [sys.executable, *argv[1:]] if argv[0] == "python" else [sys.executable, "-m", "hf_weightprune.tools.cli",
                                                                         *argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        rc, err = proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    else:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                rc = main(argv[1:])
            except SystemExit as e:  # argparse: unknown option, bad value
                rc = e.code
        err = stderr.getvalue().strip().splitlines()[-1:]
    raw = block.code.splitlines()
    at = next((f"{block.path.name}:{block.line + 1 + i}" for i, text in enumerate(raw) if line[:40] in text),
              block.where)
    if rc != 0:
        return [f"{at}: `{line}` exited {rc}: {' '.join(err)}".rstrip()]
    missing = []
    for path in D.expected_outputs(argv[1:]):
        if path.startswith("hub:"):
            parts = path[4:].split("/")
            repo, name = "/".join(parts[:2]), "/".join(parts[2:])
            if name not in env.hub.files(repo):
                missing.append(f"{at}: `{line}` did not upload {name} to {repo}")
        elif not D.exists(path):
            missing.append(f"{at}: `{line}` did not write {path}")
    return missing


def run_document(doc: Path, env: Env) -> dict[str, list[str]]:
    """Run every runnable block of `doc` in the current directory; {label: problems} per block or command line."""
    ns: dict = {"__name__": f"doc:{doc.name}"}
    results, state = {}, {}
    for block in D.parse_blocks(doc):
        if block.skip or block.kind is None:
            continue
        try:
            for name in block.setups:
                D.SETUPS[name](ns, env)
        except Exception:
            results[f"{block.where} setup"] = [f"{block.where}: setup {block.setups} failed:\n{traceback.format_exc()}"]
            continue
        if block.kind == "python":
            try:
                results[block.code] = _python(block, ns)
            except Exception as e:
                # Point at the doc's own line (the block's code is compiled under the name `file:line`)
                lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == block.where]
                at = f"{block.path.name}:{block.line + lines[-1]}" if lines else block.where
                first = str(e).splitlines()[0] if str(e) else ""
                results[block.code] = [f"{at}: {type(e).__name__}: {first}"]
        else:
            for line in block.commands():
                try:
                    results[line] = _command(block, line, ns, env, state)
                except Exception as e:
                    results[line] = [f"{block.where}: `{line}` raised {type(e).__name__}: {e}"]
    return results


@pytest.mark.parametrize("doc", D.doc_files(), ids=lambda p: p.name)
def test_every_block_of_the_doc_runs(doc, hub_server, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # the `push` lines and Hub loads use the environment's token
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(D.ROOT), os.environ.get("PYTHONPATH")])))
    results = run_document(doc, Env(hub_server))

    failures, landed = [], []
    for label, problems in results.items():
        landing = _matches(LANDING, doc.name, label)
        if problems and not landing:
            failures += problems
        elif not problems and landing:
            landed += [f"{key}: passes now ({why}); delete it from LANDING" for key, why in landing]
    expected = [p for label, problems in results.items() if problems and _matches(LANDING, doc.name, label)
                for p in problems]
    print(f"{doc.name}: {len(results)} blocks/commands run, {len(expected)} failing as LANDING expects:",
          *expected, sep="\n  ")
    assert not failures and not landed, "\n".join(failures + landed)


def test_skips_are_listed_and_runnable_blocks_have_code():
    found, empty = {}, []
    for doc in D.doc_files():
        for block in D.parse_blocks(doc):
            if block.skip:
                keys = [k for k in SKIPPED if k[0] == doc.name and k[1] in block.code]
                assert keys, f"{block.where}: skipped ({block.skip}) but not listed in SKIPPED"
                found.update(dict.fromkeys(keys, block.skip))
            elif block.kind == "shell" and not block.commands():
                empty.append(block.where)
            for name in block.setups:
                assert name in D.SETUPS, f"{block.where}: unknown setup {name!r}; known: {sorted(D.SETUPS)}"
    assert set(found) == set(SKIPPED), f"SKIPPED entries with no skipped block: {set(SKIPPED) - set(found)}"
    assert not empty, f"shell blocks with no hf-weightprune/python line (mark them skip with a reason): {empty}"
    for key, reason in SKIPPED.items():
        print(f"skipped {key[0]}: {key[1]!r}: {reason}")
    texts = {(doc.name, b.code) for doc in D.doc_files() for b in D.parse_blocks(doc)}
    stale = [key for key in LANDING if not any(doc == key[0] and key[1] in code for doc, code in texts)]
    assert not stale, f"LANDING entries that match no block (the doc changed): {stale}"


def test_block_parser_reads_fences_directives_and_commands(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("intro\n<!-- doctest: skip needs a GPU -->\n```bash\nhf-weightprune a # c\nls\n```\n\n"
                   "- item\n  <!-- doctest: setup raw_loop -->\n  ```python\n  x = 1\n  ```\n"
                   "```console\n$ hf-weightprune push x \\\n  --repo_id me/r\n```\n```json\n{}\n```\n")
    blocks = D.parse_blocks(doc)
    assert [(b.line, b.kind, b.skip, b.setups) for b in blocks] == [
        (3, "shell", "needs a GPU", []), (10, "python", None, ["raw_loop"]), (13, "shell", None, []), (17, None, None, [])]
    assert blocks[1].code == "x = 1\n"
    assert blocks[0].commands() == ["hf-weightprune a # c"]
    assert D.split_command(blocks[0].commands()[0]) == ["hf-weightprune", "a"]
    assert blocks[2].commands() == ["hf-weightprune push x    --repo_id me/r"]
    assert D.written_paths("f()  # writes out/checkpoint-N/importance/ and out/importance/") == [
        "out/checkpoint-*/importance/", "out/importance/"]
    doc.write_text("<!-- doctest: skip -->\n```python\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        D.parse_blocks(doc)


# ------------------------------------------------------------------ docs/architecture.md: "may import" is the truth

# Module (or subpackage) of hf_weightprune -> the sibling modules it may import (`from .x import`, `from . import x`,
# lazy imports included). docs/architecture.md states the same lists; both tests below must agree.
MAY_IMPORT = {
    "__init__": {"_version", "collect/importance", "config", "files/importance_files", "files/pruned_files", "prune/lora", "prune/oneshot", "prune/pruner", "prune/report", "publish/card", "publish/export", "publish/hub", "tools/search", "tools/sweep", "train/callback", "train/distill", "train/schedule"},
    "_version": set(),
    "config": {"io_utils", "scorers", "validation"},
    "coverage": {"matching", "moe"},
    "distributed": set(),
    "io_utils": set(),
    "perplexity": set(),
    "layouts": set(),
    "matching": set(),
    "moe": {"matching"},
    "scorers": set(),
    "testing": {"files/importance_files", "files/safetensors_io", "io_utils", "scorers"},
    "validation": set(),
    "collect/accumulator": {"collect/activations", "collect/importance", "collect/router", "collect/summary", "collect/units", "config", "coverage", "distributed", "matching", "moe", "scorers"},
    "collect/activations": {"matching"},
    "collect/cross": {"collect/activations", "distributed", "matching"},
    "collect/importance": {"collect/selection", "collect/units", "config", "matching", "moe", "scorers"},
    "collect/router": {"collect/activations", "distributed", "moe"},
    "collect/selection": set(),
    "collect/summary": {"collect/importance", "matching"},
    "collect/unit_layout": {"layouts"},
    "collect/unit_scoring": {"config"},
    "collect/units": {"collect/activations", "collect/unit_layout", "collect/unit_scoring", "distributed"},
    "files/cross_files": {"files/safetensors_io"},
    "files/hub_download": set(),
    "files/importance_files": {"_version", "collect/importance", "config", "distributed", "files/cross_files", "files/hub_download", "files/safetensors_io", "files/unit_files", "io_utils", "scorers", "validation"},
    "files/pruned_files": {"_version", "files/safetensors_io", "io_utils", "prune/report"},
    "files/refit_files": {"files/safetensors_io"},
    "files/safetensors_io": set(),
    "files/training_state": {"_version", "files/safetensors_io", "io_utils"},
    "files/unit_files": {"files/safetensors_io"},
    "prune/budget": {"io_utils", "layouts", "prune/hidden", "prune/masks", "prune/surgery"},
    "prune/compensate": {"layouts"},
    "prune/depth": {"io_utils", "layouts", "prune/surgery"},
    "prune/expert_neurons": {"collect/importance", "config", "layouts", "moe", "prune/budget", "prune/masks", "prune/plan", "prune/surgery", "validation"},
    "prune/experts": {"collect/importance", "io_utils", "moe", "prune/masks", "validation"},
    "prune/global_threshold": {"prune/masks", "validation"},
    "prune/hidden": {"layouts", "prune/surgery"},
    "prune/lora": {"matching", "moe", "prune/masks", "prune/report"},
    "prune/masks": {"validation"},
    "prune/obs": {"prune/masks", "scorers", "validation"},
    "prune/oneshot": {"collect/activations", "collect/importance", "collect/router", "config", "coverage", "moe", "scorers"},
    "prune/owl": set(),
    "prune/plan": {"collect/importance", "config", "matching", "moe", "prune/global_threshold", "prune/masks", "prune/obs", "prune/owl", "prune/refit", "scorers", "validation"},
    "prune/pruner": {"collect/importance", "config", "coverage", "distributed", "io_utils", "matching", "moe", "prune/expert_neurons", "prune/experts", "prune/plan", "prune/report", "prune/structured", "prune/surgery"},
    "prune/refit": {"prune/obs", "scorers"},
    "prune/report": {"collect/importance", "config", "moe", "prune/masks", "scorers"},
    "prune/structured": {"collect/importance", "config", "layouts", "matching", "prune/budget", "prune/compensate", "prune/depth", "prune/expert_neurons", "prune/hidden", "prune/masks", "prune/surgery", "prune/unit_scores"},
    "prune/surgery": {"layouts", "prune/masks", "prune/unit_scores", "validation"},
    "prune/unit_scores": {"layouts"},
    "publish/card": {"_version", "files/pruned_files", "io_utils", "publish/card_eval", "publish/card_lineage", "publish/card_measured", "publish/card_refs", "publish/card_schedule", "publish/card_text", "validation"},
    "publish/card_eval": {"files/pruned_files", "io_utils", "perplexity"},
    "publish/card_lineage": {"io_utils", "publish/card_text"},
    "publish/card_measured": set(),
    "publish/card_refs": {"publish/card_schedule", "publish/card_text"},
    "publish/card_schedule": {"io_utils"},
    "publish/card_text": {"files/pruned_files", "files/safetensors_io", "io_utils", "matching", "perplexity", "publish/card_eval", "scorers"},
    "publish/export": {"collect/importance", "config", "distributed", "files/pruned_files", "files/safetensors_io", "io_utils", "matching", "moe", "prune/plan", "prune/pruner", "prune/report", "publish/card", "publish/measure", "publish/provenance", "publish/recipe", "train/distill", "train/schedule"},
    "publish/hub": {"_version", "files/importance_files", "files/pruned_files", "io_utils", "publish/card", "publish/card_eval", "publish/provenance"},
    "publish/measure": {"files/safetensors_io", "io_utils"},
    "publish/provenance": {"files/pruned_files", "io_utils", "publish/card_eval"},
    "publish/recipe": {"io_utils", "train/distill", "train/schedule"},
    "tools/cli": {"_version", "collect/summary", "config", "files/importance_files", "files/pruned_files", "files/safetensors_io", "moe", "prune/pruner", "prune/report", "publish/export", "publish/hub", "tools/cli_args", "tools/data", "tools/log_once", "tools/model_io", "tools/plotting", "tools/search", "tools/sweep", "validation"},
    "tools/cli_args": {"config", "validation"},
    "tools/data": {"io_utils", "perplexity"},
    "tools/log_once": set(),
    "tools/model_io": {"collect/selection", "files/pruned_files", "files/safetensors_io", "publish/provenance", "validation"},
    "tools/plotting": {"io_utils", "matching"},
    "tools/search": {"collect/importance", "config", "files/pruned_files", "io_utils", "perplexity", "prune/pruner", "prune/report", "tools/data", "tools/log_once", "train/callback", "train/distill", "train/recovery", "validation"},
    "tools/structured_sweep": {"collect/importance", "config", "files/pruned_files", "perplexity", "prune/budget", "prune/pruner", "publish/card", "tools/log_once", "tools/search", "validation"},
    "tools/sweep": {"collect/importance", "config", "distributed", "files/importance_files", "files/pruned_files", "files/safetensors_io", "io_utils", "prune/oneshot", "prune/pruner", "prune/refit", "prune/report", "publish/export", "scorers", "tools/data", "tools/model_io", "tools/structured_sweep", "tools/sweep_results", "validation"},
    "tools/sweep_plot": {"perplexity", "tools/plotting"},
    "tools/sweep_results": {"files/pruned_files", "io_utils", "perplexity", "tools/plotting", "tools/structured_sweep", "tools/sweep_plot"},
    "train/callback": {"collect/accumulator", "collect/cross", "collect/importance", "config", "moe", "train/checkpoint", "train/distill", "train/distiller", "train/holder", "train/recovery", "train/schedule", "train/stream"},
    "train/checkpoint": {"config", "distributed", "files/cross_files", "files/importance_files", "files/refit_files", "files/safetensors_io", "files/training_state", "files/unit_files", "io_utils", "train/stream"},
    "train/distill": {"io_utils"},
    "train/distiller": {"collect/activations", "io_utils", "train/distill"},
    "train/holder": {"distributed", "io_utils", "matching", "moe", "prune/masks", "prune/plan", "prune/pruner", "prune/refit", "prune/report", "scorers", "train/schedule", "train/stream"},
    "train/recovery": {"distributed", "io_utils", "train/checkpoint"},
    "train/schedule": {"config", "files/safetensors_io", "io_utils", "validation"},
    "train/stream": {"distributed", "files/pruned_files", "matching", "moe", "prune/refit"},
}
PKG = D.ROOT / "hf_weightprune"


STAGES = {"collect", "prune", "files", "train", "publish", "tools"}


def _unit(path: Path) -> str:
    """`prune/masks` for a module of a stage package, `scorers` for any file of that package, `config` at the top."""
    rel = path.relative_to(PKG)
    if len(rel.parts) == 1:
        return rel.stem
    if rel.parts[0] in STAGES:
        return rel.parts[0] if rel.stem == "__init__" else f"{rel.parts[0]}/{rel.stem}"
    return rel.parts[0]  # scorers/ is one unit: one file per criterion around its registry


def _target(parts: list[str]) -> str:
    """The unit a dotted import path (relative to hf_weightprune) names."""
    if not parts:
        return "__init__"
    if parts[0] in STAGES and len(parts) > 1:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def real_imports() -> dict[str, set[str]]:
    """{unit: sibling units it imports}, from every relative import in its source (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        unit, rel = _unit(path), path.relative_to(PKG)
        if unit in STAGES:  # a stage's __init__.py is empty (tested below): the stage is its modules
            continue
        package = list(rel.parts[:-1])  # the package the file is in, relative to hf_weightprune
        found = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                where = base + (node.module.split(".") if node.module else [])
                # `from ..files import state`: the names are modules of a package
                targets = ([where + [a.name] for a in node.names] if not node.module
                           or (len(where) == 1 and where[0] in STAGES) else [where])
                found |= {_target(t) for t in targets}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                found |= {_target(n.split(".")[1:]) for n in names if n.split(".")[0] == "hf_weightprune"}
        found.discard(unit)
    return graph


def test_real_imports_stay_within_may_import():
    graph = real_imports()
    assert set(graph) == set(MAY_IMPORT), (f"modules without a MAY_IMPORT row: {set(graph) - set(MAY_IMPORT)}; "
                                           f"rows without a module: {set(MAY_IMPORT) - set(graph)}")
    wrong = {unit: sorted(deps - MAY_IMPORT[unit]) for unit, deps in graph.items() if deps - MAY_IMPORT[unit]}
    assert not wrong, f"imports outside the rules of docs/architecture.md (module: names): {wrong}"
    assert not any("__init__" in deps for unit, deps in graph.items() if unit != "__init__"), "never import __init__"


def test_architecture_doc_states_the_same_rules():
    text = (D.ROOT / "docs" / "architecture.md").read_text()
    stated = {}
    # "**`module.py`**: what it owns ... May import: `a`, `b` (notes)." up to the paragraph's end
    for m in re.finditer(r"^\*\*`(?P<unit>[\w/]+?)(?:\.py|/)?`\*\*.*?May import:\s(?P<deps>.*?)(?:\n\n|\Z)", text,
                         re.M | re.S):
        deps = m["deps"].strip().rstrip(".")
        stated[m["unit"]] = set() if deps.lower().startswith("nothing") else set(re.findall(r"`([\w/]+)`", deps))
    assert set(stated) == set(MAY_IMPORT), (f"modules the doc misses: {set(MAY_IMPORT) - set(stated)}; "
                                            f"unknown in the doc: {set(stated) - set(MAY_IMPORT)}")
    differ = {u: (sorted(stated[u]), sorted(MAY_IMPORT[u])) for u in MAY_IMPORT if stated[u] != MAY_IMPORT[u]}
    assert not differ, f"docs/architecture.md vs MAY_IMPORT (doc, test): {differ}"


def test_stage_packages_hold_no_code_in_their_init():
    for stage in sorted(STAGES):
        init = PKG / stage / "__init__.py"
        assert init.exists(), f"{stage}/ is a package"
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]  # a docstring only
        assert not body, f"{stage}/__init__.py imports or defines something: a stage is its modules"
