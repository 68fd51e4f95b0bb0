"""Atomic file writes (a temporary file in the same folder, flushed to disk, then renamed into place, so a crash
never leaves a half-written file under the final name) and the one-line argument check of public entry points."""

from __future__ import annotations

import contextlib
import json
import ntpath
import os
import posixpath
import tempfile
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def check_arg_type(fn: str, name: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
    """Raise a one-line `TypeError` naming the function, the argument and what it expects, unless
    `isinstance(value, types)`.

    Args:
        fn (`str`): the public function being called, for the message.
        name (`str`): the argument's name.
        value (`Any`): the value passed.
        types (`type` or `tuple[type, ...]`): accepted types.
        expected (`str`): what to pass, in words (`"a bool"`).

    Raises:
        TypeError: `value` is not an instance of `types`.
    """
    if not isinstance(value, types):
        raise TypeError(f"{fn}: {name} must be {expected}; got {type(value).__name__} {_short_repr(value)}")


def is_local_path(value: Any) -> bool:
    """An absolute path, POSIX or Windows (a `sparsity.json` may come from either); a Hub id never is one."""
    return isinstance(value, str) and (posixpath.isabs(value) or ntpath.isabs(value))


def path_name(path: str) -> str:
    """The last part of a POSIX or Windows path (`ntpath` splits on both separators)."""
    return ntpath.basename(ntpath.normpath(path))


def _short_repr(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
