"""Every `hf-weightprune` command the docs name in running text (not in a fenced block, which `tests/test_docs.py`
runs) parses: a reader who copies one gets no "the following arguments are required" and no unknown option, and
every `--flag` an inline `prune --flag` / `sweep --flag` mention names is an option of that subcommand."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from hf_weightprune.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
COMMANDS = ("prune", "inspect", "sweep", "push")


def inline_spans() -> list[tuple[str, str]]:
    """`(document, text)` of every inline code span outside fenced blocks, whitespace (line breaks) collapsed."""
    spans = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        spans += [(path.name, " ".join(m.split())) for m in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", text)]
    return spans


def subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


# Full command lines: `hf-weightprune COMMAND POSITIONAL ...`, no placeholder (`MODEL`, a trailing `...`)
FULL = [(doc, span) for doc, span in inline_spans()
        if re.match(rf"hf-weightprune ({'|'.join(COMMANDS)}) [^-]", span) and not span.endswith("...")
        and not re.search(r"\b[A-Z]{3,}\b", span)]


def test_some_inline_commands_are_found():
    assert FULL, "the README names at least one full command in its running text"


@pytest.mark.parametrize("doc, line", FULL, ids=[f"{d}:{s[:60]}" for d, s in FULL])
def test_inline_command_parses(doc, line, capsys):
    try:
        build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as e:
        pytest.fail(f"{doc}: `{line}` does not parse ({e.code}): {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_inline_flag_mentions_exist():
    options = subcommand_options()
    wrong = []
    for doc, span in inline_spans():
        m = re.match(rf"(?:hf-weightprune )?({'|'.join(COMMANDS)}) (--.*)", span)
        if m:
            wrong += [f"{doc}: `{span}`: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z_]+", m.group(2))
                      if flag not in options[m.group(1)]]
    assert not wrong, wrong
