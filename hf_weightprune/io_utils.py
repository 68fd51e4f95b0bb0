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


def process_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux `/proc`), else by the set-and-restore
    idiom (`os.umask` has no getter)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_file(folder: str | os.PathLike, name: str, suffix: str = ".tmp") -> tuple[int, str]:
    """`tempfile.mkstemp` beside `folder/name` (a hidden, unique name), with the mode a plain `open()` would give.

    mkstemp creates its file `0600` so that no one else can read it before it is renamed into place; the renamed file
    would keep that mode, while `save_pretrained` writes `0644` under umask 022: a teammate on a shared cluster could
    read `config.json` but not the card, plots, sweep or importance files. The umask decides, as for any other file.

    Args:
        folder (`str` or `os.PathLike`): the folder the final file goes to (the rename stays on one file system).
        name (`str`): the final file's name (the temporary one starts with `.{name}.`).
        suffix (`str`, *optional*, defaults to `".tmp"`): the temporary name's suffix.

    Returns:
        `tuple[int, str]`: the open file descriptor and the temporary path, as `mkstemp` returns them.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
            os.fchmod(fd, 0o666 & ~process_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def apply_umask_modes(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode a plain `open()` gives (`0666 & ~umask`).

    For folders about to be published whole: safetensors (0.5 and later) writes its files `0600`, through a temporary
    file of its own, while transformers writes `config.json` `0644`; a folder half readable by a teammate helps no one.

    Args:
        folder (`str` or `os.PathLike`): a folder this process wrote.
    """
    if not hasattr(os, "fchmod"):  # Windows has no such modes
        return
    mode = 0o666 & ~process_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, `\n` line ends) to `path` atomically, with the umask's mode (`0644` under umask 022).

    Args:
        path (`str` or `os.PathLike`): the file to write; its folder must exist.
        text (`str`): the content.

    Raises:
        OSError: the folder is missing or not writable; `path` is left as it was.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = make_temp_file(folder, name)
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
    """An absolute path, POSIX or Windows (a `sparsity.json` may come from either), or one recorded relative to a
    pruned folder (`./x`, `../x`); a Hub id never is one."""
    return isinstance(value, str) and (posixpath.isabs(value) or ntpath.isabs(value)
                                       or value.startswith(("./", "../", ".\\", "..\\")) or value in (".", ".."))


def path_name(path: str) -> str:
    """The last part of a POSIX or Windows path (`ntpath` splits on both separators)."""
    return ntpath.basename(ntpath.normpath(path))


def _short_repr(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
