"""The package's log messages while a tool prunes one model many times (a structured sweep, a structure search): each
warning said once, and, in a sweep, in the words of what the user gave (its `sizes`, not the `target_params` each point
prunes with). A sweep's checks prune every candidate once more before the run: they are quiet, the run says it all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

PACKAGE = "hf_weightprune"


def _package_loggers() -> list[logging.Logger]:
    """The logger of every module of the package, created here when its module is not imported yet (a filter on a
    logger applies only to the messages logged through it, and `getLogger(__name__)` later returns the same one)."""
    root = Path(__file__).resolve().parents[1]
    names = {".".join((PACKAGE, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
             for p in root.rglob("*.py")}
    return [logging.getLogger(name) for name in sorted(names)]


class _Said(logging.Filter):
    def __init__(self, rewrite: Callable[[str], str] | None, quiet: bool):
        super().__init__()
        self.rewrite, self.quiet, self.seen = rewrite, quiet, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if self.quiet:
            return False
        text = record.getMessage()
        text = self.rewrite(text) if self.rewrite is not None else text
        if record.levelno >= logging.WARNING:
            if text in self.seen:
                return False
            self.seen.add(text)
        record.msg, record.args = text, None
        return True


@contextlib.contextmanager
def warnings_once(rewrite: Callable[[str], str] | None = None, *, quiet: bool = False) -> Iterator[None]:
    """Inside the block, a warning of this package whose text was already logged in the block is not logged again.

    Args:
        rewrite (`Callable[[str], str]`, *optional*): applied to every message below error level first (a sweep
            names its sizes).
        quiet (`bool`, *optional*, defaults to `False`): log nothing below error level (what the block would warn, a
            later run warns again).
    """
    said = _Said(rewrite, quiet)
    loggers = _package_loggers()
    for logger in loggers:
        logger.addFilter(said)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(said)
