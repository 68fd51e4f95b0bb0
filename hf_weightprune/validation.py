"""The shared validators: a bad value gets the same one-line message wherever it enters (configs, mask builders,
structured pruning, schedules, the CLI). A leaf: the math modules import it without importing the config dataclasses.
"""

from __future__ import annotations

import os
import re
from numbers import Real
from typing import Any


def check_regex(name: str, pattern: str) -> str:
    """
    Compile a module-name regex when it is given, so a typo is refused before any work instead of deep inside it.

    Args:
        name (`str`):
            How the pattern is named in the error message, e.g. `"target_modules"` or `"sparsity key"`.
        pattern (`str`):
            The regular expression (matched with `re.fullmatch` against module names).

    Returns:
        `str`: `pattern`, unchanged.

    Raises:
        `ValueError`: one line naming `name`, the pattern, what is wrong and how to write a literal character.
    """
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name} {pattern!r} is not a valid regular expression ({e.msg} at position {e.pos}): escape "
                         r"a literal character with a backslash, e.g. 'model\.layers\.0\..*'") from None
    return pattern


def check_modules(name: str, value: Any) -> Any:
    """`value` as peft takes `target_modules` / `exclude_modules`: `None`, a regex `str` (compiled here), or
    module-name suffixes (a set comes back sorted). Raises `ValueError` naming `name` for anything else."""
    if value is None:
        return value
    if isinstance(value, str):
        return check_regex(name, value)
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{name} must be a regex str, a list of module-name suffixes, or None; got {value!r}")


def check_sparsity(name: str, value: Any) -> float:
    """
    The one sparsity check of the package (configs, mask builders, structured pruning, schedules).

    Args:
        name (`str`):
            How the value is named in the error message, e.g. `"sparsity"` or `"sparsity['mlp.*']"`.
        value (`float`):
            The sparsity to check: a real number (not a `bool`) in `[0.0, 1.0)`.

    Returns:
        `float`: `value` as a Python float.

    Raises:
        `ValueError`: if `value` is not a real number in `[0, 1)` (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1); got {value!r}")
    return float(value)


def check_nm(n: Any, m: Any) -> None:
    for arg, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{arg}` must be an int, got {value!r}.")
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < n < m, got n={n}, m={m}.")


def parse_nm(spec: str) -> tuple[int, int]:
    """
    Parse an N:M sparsity pattern.

    Args:
        spec (`str`):
            Pattern such as `"2:4"`: keep `n` of every `m` consecutive input elements, with `0 < n < m`.

    Returns:
        `tuple[int, int]`: `(n, m)`.

    Raises:
        `ValueError`: if `spec` is not two positive integers joined by `":"` with `0 < n < m`.
    """
    if not isinstance(spec, str):
        raise ValueError(f"N:M pattern must be a string like '2:4', got {type(spec).__name__}.")
    parts = spec.strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdecimal() for p in parts):
        raise ValueError(f"N:M pattern must look like '2:4' (two positive integers joined by ':'), got {spec!r}.")
    n, m = int(parts[0]), int(parts[1])
    check_nm(n, m)
    return n, m


# Structures that physically shrink the model (`prune/structured.py`); several may be combined ("layers,neurons").
STRUCTURED_KINDS = ("neurons", "heads", "hidden", "layers")


def parse_structure(structure) -> tuple[str, tuple[int, int] | None]:
    """
    Parse a pruning structure.

    Args:
        structure (`str`, `tuple` or `list`):
            `"unstructured"`, an N:M pattern such as `"2:4"`, one of `STRUCTURED_KINDS` (`"neurons"`, `"heads"`,
            `"hidden"`, `"layers"`), several of those (a tuple/list, or comma-separated: `"layers,neurons"`), or
            `"experts"` (whole MoE experts, alone).

    Returns:
        `tuple[str, tuple[int, int] | None]`: `(kind, nm)` with `kind` one of `"unstructured"`, `"N:M"`, a
        structured kind, `"experts"`, or `"combined"` (several structured kinds), and `nm = (n, m)` for N:M, else
        `None`.

    Raises:
        `ValueError`: for any other value, a repeated structure, or a malformed N:M pattern.
    """
    if structure in ("unstructured", "experts") or structure in STRUCTURED_KINDS:
        return structure, None
    if isinstance(structure, str) and ":" in structure:
        return "N:M", parse_nm(structure)
    parts = structure_parts(structure)
    if parts is not None and len(parts) > 1:
        return "combined", None
    raise ValueError(f"structure must be 'unstructured', an N:M pattern like '2:4', one of {STRUCTURED_KINDS} or a "
                     f"combination of them ('layers,neurons'), or 'experts'; got {structure!r}")


def structure_parts(structure) -> tuple[str, ...] | None:
    """The structured kinds of `structure` (`("layers", "neurons")` for `"layers,neurons"`), `None` if it is not made
    only of `STRUCTURED_KINDS`, each at most once."""
    items = structure.split(",") if isinstance(structure, str) else structure
    if not isinstance(items, (list, tuple)) or not items:
        return None
    parts = tuple(p.strip() if isinstance(p, str) else p for p in items)
    if any(p not in STRUCTURED_KINDS for p in parts) or len(set(parts)) != len(parts):
        return None
    return parts


def looks_like_local_path(path: str) -> bool:
    """
    Whether a string that is not an existing path was meant as a local folder rather than a Hub repo id.

    A Hub id is `name` or `namespace/name` made of letters, digits, `-`, `_` and `.`. A string that starts with
    `.`, `/` or `~`, holds an OS separator or more than one `/`, whose first part is an existing folder (`out/modle`:
    a typo below a local folder), or that is no valid repo id, is a local path.

    Args:
        path (`str`): what the user passed.

    Returns:
        `bool`: `True` for a local path (then "no such folder" is the right answer), `False` for a Hub id.
    """
    path = os.fspath(path)
    if path.startswith(("/", ".", "~")) or os.sep in path.replace("/", "") or path.count("/") > 1:
        return True
    if "/" in path and os.path.isdir(path.split("/", 1)[0]):
        return True
    return not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", path) or ".." in path \
        or path.endswith((".", "-"))


def check_local_path(name: str, path: str, expected: str = "a local folder") -> None:
    """
    Refuse, before any work, a path that does not exist and was meant as a local one ([`looks_like_local_path`]); a
    missing path that looks like a Hub repo id is left to the Hub.

    Args:
        name (`str`): the argument or flag, for the message (`"--importance"`, `"path_or_repo_id"`).
        path (`str`): what the user passed.
        expected (`str`, *optional*, defaults to `"a local folder"`): what to pass instead, for the message.

    Raises:
        `FileNotFoundError`: one line naming `name` and the path.
    """
    path = os.fspath(path)
    if not os.path.exists(path) and looks_like_local_path(path):
        raise FileNotFoundError(f"{name} {path}: no such folder; pass {expected} or a Hub repo id")
