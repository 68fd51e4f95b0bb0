"""The one rule for a perplexity, `exp(loss)`, wherever one is computed, written or shown.

`exp` overflows a float64 past a loss of `MAX_LOSS` (~709.78 nats): `math.exp` raises `OverflowError` there and
torch / numpy give `inf`, which JSON has no value for and which YAML (the Hub's model-index) writes as `.inf`. A
diverged prune reaches such a loss. So a perplexity that overflows (or of a loss that is not a number) is:

- `None` as a number ([`perplexity`]): `null` in `sweep.json` and `sparsity.json`, an empty cell in `sweep.csv`, no
  perplexity metric in the model-index, no point on the sweep's chart; the loss is kept everywhere;
- `"overflow (> 1e308)"` in text ([`perplexity_text`]): the card's tables, the CLI's tables and log lines.

A leaf: the evaluation (`tools/data.py`), the sweep, the search and the card all state perplexities by it.
"""

from __future__ import annotations

import math
import sys

__all__ = ["MAX_LOSS", "OVERFLOW_TEXT", "perplexity", "perplexity_text"]

MAX_LOSS = math.log(sys.float_info.max)  # 709.78...: the largest loss whose exp is a finite float64
OVERFLOW_TEXT = "overflow (> 1e308)"


def perplexity(loss: float | None) -> float | None:
    """
    `exp(loss)` as a finite float, or `None` where there is none to state.

    Args:
        loss (`float`, *optional*): a mean cross-entropy in nats per token.

    Returns:
        `float` or `None`: `None` for no loss, a loss that is not a number, or one above [`MAX_LOSS`] (the
        perplexity would overflow a float64: it is more than 1e308).
    """
    if loss is None:
        return None
    loss = float(loss)
    if math.isnan(loss) or loss > MAX_LOSS:
        return None
    return math.exp(loss)


def perplexity_text(loss: float | None, spec: str = ".2f") -> str:
    """
    The perplexity of `loss` as text: formatted with `spec`, `"overflow (> 1e308)"` past [`MAX_LOSS`], `"n/a"`
    without a loss or for a loss that is not a number.

    Args:
        loss (`float`, *optional*): a mean cross-entropy in nats per token.
        spec (`str`, *optional*, defaults to `".2f"`): the format spec of a finite perplexity.

    Returns:
        `str`
    """
    value = perplexity(loss)
    if value is not None:
        return format(value, spec)
    return OVERFLOW_TEXT if loss is not None and float(loss) > MAX_LOSS else "n/a"
