"""Atomic writes and the one-line argument check of public entry points.

Files: a temporary file in the same folder, flushed to disk, then renamed into place, so a crash never leaves a
half-written file under the final name. Folders: the one temp-name rule of the package, `.NAME.<pid>-<hex>.tmp`
beside the final folder ([`temp_sibling`]), published with one rename ([`publish_folder`], or [`atomic_folder`]
around a write). Every temporary name is hidden and ends in `.tmp`, which `publish/hub.py`'s uploads ignore; the pid
lets the next writer remove what a killed one left ([`remove_dead_temporaries`]).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import ntpath
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, fields
from typing import Any

TEMP_SUFFIX = ".tmp"

logger = logging.getLogger(__name__)


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


def temp_sibling(path: str | os.PathLike, *, pid: int | None = None, token: int | None = None) -> str:
    """A unique hidden name beside `path` for a folder being written: `.NAME.<pid>-<hex>.tmp`.

    Unique (two writers never share it), hidden and `.tmp`-suffixed (never uploaded, see `publish/hub.py`), and it
    carries the writer's pid so that [`remove_dead_temporaries`] can tell a killed writer's folder from a live one's.

    Args:
        path (`str` or `os.PathLike`): the final folder.
        pid (`int`, *optional*): the writing process, when the name is agreed between processes (several ranks
            writing one folder use rank 0's); defaults to this process.
        token (`int`, *optional*): the random part, likewise agreed; defaults to a fresh random one.

    Returns:
        `str`: an absolute path in the same parent folder (so publishing it is one `rename`).
    """
    parent, name = os.path.split(os.path.abspath(path))
    tag = uuid.uuid4().hex[:12] if token is None else f"{token:012x}"
    return os.path.join(parent, f".{name}.{os.getpid() if pid is None else pid}-{tag}{TEMP_SUFFIX}")


def temp_siblings(path: str | os.PathLike) -> list[str]:
    """The temporary folders of [`temp_sibling`] that exist beside `path` (any writer's, live or dead)."""
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    return [os.path.join(parent, e) for e in entries
            if e.startswith(prefix) and e.endswith(TEMP_SUFFIX) and e[len(prefix):].split("-", 1)[0].isdigit()]


def remove_dead_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporary folders beside `path` that a killed writer left (a full model each); a live writer's stay.

    A writer is alive when its pid exists on this machine (`os.kill(pid, 0)`); this process's own are kept too.

    Args:
        path (`str` or `os.PathLike`): the final folder whose temporaries to clean.
    """
    prefix = f".{os.path.basename(os.path.abspath(path))}."
    for tmp in temp_siblings(path):
        pid = int(os.path.basename(tmp)[len(prefix):].split("-", 1)[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def publish_folder(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Move the complete folder `src` to `dst` with one `rename`, the one way this package publishes a folder.

    Its files first get the modes the process umask gives (as `save_pretrained`'s). `rename` replaces an empty folder
    but refuses a non-empty one: that is the atomic "did someone else write it" check. With `overwrite` an existing `dst` is first renamed aside (to a [`temp_sibling`]) and removed once `src` is
    in place; if the publish fails for another reason, the old folder goes back.

    Args:
        src (`str` or `os.PathLike`): the complete folder (a temporary or staging folder on the same filesystem).
        dst (`str` or `os.PathLike`): the final folder.
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing `dst`.

    Returns:
        `str`: `dst`.

    Raises:
        FileExistsError: `dst` exists and is not empty (without `overwrite`, or written by another process between
            the move aside and the rename).
        OSError: the rename failed for another reason (`src` is left where it was).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    apply_umask_modes(src)  # safetensors (and mkstemp) write 0600: published files get the umask's modes, as config.json
    aside = None
    if overwrite and os.path.lexists(dst):
        aside = temp_sibling(dst)
        try:
            os.rename(dst, aside)
        except FileNotFoundError:  # another writer moved it aside first
            aside = None
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            if aside is not None and not os.path.lexists(dst):
                os.rename(aside, dst)  # failed for another reason: the old folder goes back
                aside = None
            raise
        raise FileExistsError(f"{dst} was written by another process while this one ran; this run's result "
                              "was discarded (write to another folder)") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yield a new [`temp_sibling`] of `path`; on success publish it as `path` ([`publish_folder`]), on error remove it.

    Temporaries of killed writers beside `path` are removed first. The folder is made with `mkdir` (exclusive, and
    with the umask's mode, unlike `tempfile.mkdtemp`'s private 0700 that would be published with it).

    Args:
        path (`str` or `os.PathLike`): the final folder (its parent is created if needed).
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing `path`.

    Yields:
        `str`: the temporary folder to write into.

    Raises:
        FileExistsError: as [`publish_folder`] (nothing of this call is kept then).
        OSError: a failed write (a full disk, ...), naming `path`, never the temporary folder.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_dead_temporaries(path)
    tmp = temp_sibling(path)
    os.mkdir(tmp)
    try:
        yield tmp
        publish_folder(tmp, path, overwrite=overwrite)
    except OSError as e:
        if e.filename is None or TEMP_SUFFIX not in os.fspath(e.filename):
            raise
        # e.g. the disk filled up mid-write: name the output, never the internal temporary folder
        raise type(e)(e.errno, f"writing {path} failed: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def plural(n: int, unit: str) -> str:
    """`n` with `unit` in the singular or plural: `"1 expert"`, `"3 experts"`, `"2 forward passes"` (a unit ending in
    `s` takes `es`). The one plural rule of every message and card line that counts something.

    Args:
        n (`int`): the count (shown with thousands separators).
        unit (`str`): the singular noun, possibly after words (`"KV group"`, `"sampled training step"`).

    Returns:
        `str`
    """
    return f"{n:,} {unit}" if n == 1 else f"{n:,} {unit}{'es' if unit.endswith('s') else 's'}"


def path_name(path: str) -> str:
    """The last part of a POSIX or Windows path (`ntpath` splits on both separators)."""
    return ntpath.basename(ntpath.normpath(path))


def _short_repr(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


class JsonConfigMixin:
    """`to_dict`, `save_pretrained` and `from_pretrained` for the config dataclasses."""

    config_name: str = "config.json"  # each config class names its file
    section: str = "config"

    def to_dict(self) -> dict[str, Any]:
        """
        Returns:
            `dict[str, Any]`: every field, JSON-serialisable.
        """
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """
        Write the config as `{section: fields}` to `save_directory/config_name` (atomically, sorted keys).

        Args:
            save_directory (`str` or `os.PathLike`):
                Folder to write into; created if missing.

        Returns:
            `str`: the path of the written file.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        atomic_write_json(path, {self.section: self.to_dict()}, sort_keys=True)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """
        Build a config from its fields; unknown keys (from a newer version) are logged and ignored.

        Args:
            data (`dict[str, Any]`):
                Field values, as `to_dict` returns them.

        Returns:
            The config.

        Raises:
            `ValueError`: as the config's own validation.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A newer version may add fields: warn instead of refusing the file.
            logger.warning("Ignoring unknown %s keys (written by a newer hf-weightprune?): %s", cls.__name__, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs):
        """
        Read a config written by `save_pretrained`.

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A folder holding `config_name`, the file itself, or a Hub repo id.
            hub_kwargs (*optional*):
                Passed to `huggingface_hub.hf_hub_download` for a repo id (`revision`, `token`, ...).

        Returns:
            The config.

        Raises:
            `FileNotFoundError`: if there is no such file.
            `ValueError`: if the file is not valid JSON, or as the config's own validation.
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        elif not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path, cls.config_name, **hub_kwargs)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {cls.config_name} in {path_or_repo_id}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data.get(cls.section, data))
