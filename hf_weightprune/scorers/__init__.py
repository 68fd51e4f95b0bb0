"""Registry of importance criteria: one small `Scorer` subclass per file, registered once by name."""

from __future__ import annotations

from .base import Scorer

SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator adding a criterion to `SCORERS`; a duplicate name is an error."""
    if cls.name in SCORERS:
        raise ValueError(f"A scorer named {cls.name!r} is already registered ({SCORERS[cls.name].__qualname__})")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str, *, weighting: str = "uniform", **options) -> Scorer:
    """A new scorer of criterion `name`; `options` go to its constructor, and `weighting` too unless it is the
    default `"uniform"` (so a registered scorer whose `__init__` takes no `weighting` still builds)."""
    if name not in SCORERS:
        raise ValueError(f"Unknown criterion {name!r}; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    if weighting not in cls.weightings:
        raise ValueError(f"weighting={weighting!r} is not supported by criterion {name!r}; use one of "
                         f"{list(cls.weightings)}")
    if weighting != "uniform":
        options["weighting"] = weighting
    return cls(**options)


# Importing the modules registers them.
from . import gradient, magnitude, sparsegpt, temporal, wanda  # noqa: E402,F401

__all__ = ["SCORERS", "Scorer", "get_scorer", "register_scorer"]
