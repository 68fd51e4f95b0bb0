#!/usr/bin/env python3
"""Extract the King James Bible from Debian's `bible-kjv` package into plain-text train/valid splits.

What it installs: the Debian package `bible-kjv` (and its dependency `bible-kjv-text`) with
`apt-get install -y --no-install-recommends bible-kjv`, only when the `bible` program is missing (needs root).

What it runs: `bible -f Gen1:1-Rev22:21`, which prints one verse per line as `Ge1:1 In the beginning ...`.
The `Ge1:1` reference is stripped, verses are kept one per line and chapters are separated by one blank line
(so `hf_weightprune.tools.data.load_texts` reads one document per chapter).

The split is by whole book, so no book is in both files: the books in `VALID_BOOKS` go to `valid.txt`, every
other book to `train.txt`. `data/README.md` is rewritten with the package version and the sizes.

Usage (from the repository root):

    python scripts/extract_text.py            # writes data/kjv/train.txt, data/kjv/valid.txt, data/README.md
    python scripts/extract_text.py --check    # rebuilds in memory and fails if the shipped files differ

The text of the King James Version is in the public domain. Only the Python standard library is used.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Canonical order of the 66 books; `bible` prints them in this order, so names are assigned by position.
BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
]  # fmt: skip

# Held-out books (~6% of the text): narrative, wisdom, poetry, prophecy, gospel and epistles, so that the
# validation loss is not dominated by one genre. Fixed by name: the split never depends on a random seed.
VALID_BOOKS = ["Ruth", "Esther", "Ecclesiastes", "Lamentations", "Jonah", "Mark", "Romans", "James", "1 John"]

COMMAND = ["bible", "-f", "Gen1:1-Rev22:21"]
VERSE_RE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def ensure_bible():
    """Installs Debian's `bible-kjv` when the `bible` program is not on the PATH."""
    if shutil.which("bible"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "bible-kjv"], check=True, env=env)


def package_version():
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bible-kjv"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def parse_books(raw):
    """Returns `[(book_name, [[verse, ...] per chapter]), ...]` from the output of `bible -f`."""
    books, last_abbrev, last_chapter = [], None, None
    for line in raw.splitlines():
        line = line.rstrip()
        if not line:
            continue
        match = VERSE_RE.match(line)
        if match is None:
            # `-f` may wrap long verses when a line width is set; a line without a reference continues the verse.
            if not books:
                raise ValueError(f"Unexpected first line from bible: {line!r}")
            books[-1][1][-1][-1] += " " + line.strip()
            continue
        abbrev, chapter, _, text = match.groups()
        if abbrev != last_abbrev:
            if len(books) == len(BOOKS):
                raise ValueError(f"More than {len(BOOKS)} books in the output of bible (at {abbrev}).")
            books.append((BOOKS[len(books)], []))
            last_abbrev, last_chapter = abbrev, None
        if chapter != last_chapter:
            books[-1][1].append([])
            last_chapter = chapter
        books[-1][1][-1].append(" ".join(text.split()))
    if len(books) != len(BOOKS):
        raise ValueError(f"Expected {len(BOOKS)} books from bible, got {len(books)}.")
    return books


def render(books):
    """One verse per line, one blank line between chapters (and books)."""
    chapters = ["\n".join(verses) for _, book in books for verses in book]
    return "\n\n".join(chapters) + "\n"


def atomic_write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0o022)  # mkstemp's 0600 would be kept by the rename: use the umask's mode, as open() does
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def readme(version, train, valid, books):
    valid_books = [(name, book) for name, book in books if name in VALID_BOOKS]
    total = len(train) + len(valid)
    rows = "\n".join(f"| {name} | {len(book)} | {sum(len(v) for v in book)} |" for name, book in valid_books)
    return f"""# Data

## `kjv/`: the King James Bible (Authorized Version, 1611)

Plain English prose shipped with the repository so that the demo, the sparsity sweep, the benchmarks and the
tests train and evaluate on real text without downloading anything.

- **Source**: the Debian package `bible-kjv`, version `{version}` (text from its dependency `bible-kjv-text`).
- **Licence**: the text of the King James Version is in the public domain.
- **Format**: UTF-8 (pure ASCII), one verse per line without its reference (`Ge1:1` etc. are stripped), one blank
  line between chapters. `hf_weightprune.tools.data.load_texts` therefore reads one document per chapter.
- **Split**: by whole book, so no book is in both files.

| file | bytes | chapters | verses |
| --- | ---: | ---: | ---: |
| `kjv/train.txt` | {len(train)} | {train.count(chr(10) + chr(10)) + 1} | {train.count(chr(10)) - train.count(chr(10) + chr(10))} |
| `kjv/valid.txt` | {len(valid)} | {valid.count(chr(10) + chr(10)) + 1} | {valid.count(chr(10)) - valid.count(chr(10) + chr(10))} |

`valid.txt` holds {len(valid_books)} books, {100 * len(valid) / total:.1f}% of the bytes, in canonical order:

| book | chapters | verses |
| --- | ---: | ---: |
{rows}

`train.txt` holds the other {len(books) - len(valid_books)} books, in canonical order.

## Reproduce

From the repository root, as root on Debian or Ubuntu (the script installs `bible-kjv` with
`apt-get install -y --no-install-recommends bible-kjv` when the `bible` program is missing):

```bash
python scripts/extract_text.py          # runs `{" ".join(COMMAND)}` and rewrites the three files
python scripts/extract_text.py --check  # fails if the shipped files differ from a fresh extraction
```
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)

    unknown = sorted(set(VALID_BOOKS) - set(BOOKS))
    if unknown:
        raise ValueError(f"Unknown validation books: {unknown}")
    ensure_bible()
    # A fixed, huge width so that `-f` never wraps a verse, whatever the caller's terminal says.
    env = {**os.environ, "COLUMNS": "100000"}
    raw = subprocess.run(COMMAND, capture_output=True, text=True, check=True, env=env).stdout
    books = parse_books(raw)
    train = render([b for b in books if b[0] not in VALID_BOOKS])
    valid = render([b for b in books if b[0] in VALID_BOOKS])
    outputs = {
        args.out / "kjv" / "train.txt": train,
        args.out / "kjv" / "valid.txt": valid,
        args.out / "README.md": readme(package_version(), train, valid, books),
    }
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print("Out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("Shipped files match a fresh extraction.")
        return 0
    for path, text in outputs.items():
        atomic_write(path, text)
        print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
