"""Registry of importance criteria: one small `Scorer` subclass per file, registered once by name.

The registry itself lives in `base.py`; importing this package imports every criterion file, which registers it.
"""

from __future__ import annotations

from . import gradient, magnitude, sparsegpt, temporal, wanda  # noqa: F401  (importing registers them)
from .base import SCORERS, Scorer, criteria_where, default_scope, get_scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "criteria_where", "default_scope", "get_scorer", "register_scorer"]
