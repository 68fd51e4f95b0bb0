"""Every relative link of the Markdown docs points at a file of the repo, and every `#anchor` at one of its headings
(GitHub's slugs), so a reader following one never lands on a 404 or the top of a long page."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)|^ {0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s|$)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def tracked_files() -> set[str] | None:
    """The files git tracks (a link to an ignored or untracked file is a 404 on GitHub), or None outside a clone."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.decode().split("\0")) - {""}


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
        seen[slug] = n + 1
    return out


def test_github_slug_matches_known_headings():
    assert github_slug("11. Fine-tuning with pruning that recovers, at equal tokens (`recovery.py`, issue 17)") == (
        "11-fine-tuning-with-pruning-that-recovers-at-equal-tokens-recoverypy-issue-17")
    assert github_slug("What `sparsity.json` holds") == "what-sparsityjson-holds"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    tracked = tracked_files()
    for target in (a or b for a, b in LINK.findall(FENCE.sub("", doc.read_text()))):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        rel = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else None
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif tracked is not None and file.is_file() and rel not in tracked:
            broken.append(f"{target} (not in git: a 404 on GitHub)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_license_file_is_apache_and_shipped_in_the_wheel():
    """pyproject says Apache-2.0: the full text is in LICENSE, which `license-files` puts in the wheel."""
    import tomllib

    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and "## 0.1.0" in changelog


CITED_TEST = re.compile(r"`?(tests/[\w/]+\.py)::(\w+)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_test_exists(doc):
    """`tests/<stage>/test_x.py::test_name` in a doc (the compatibility matrix cites its evidence so) names a test
    function that is defined in that file: a renamed or moved test leaves no claim without its proof."""
    missing = []
    for path, name in CITED_TEST.findall(doc.read_text()):
        file = ROOT / path
        if not file.is_file() or not re.search(rf"^\s*(?:async )?def {name}\(", file.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"{doc.name} cites tests that do not exist: {missing}"
