"""The scorer interface, the registry of criteria and the accumulation helpers every criterion shares.

A scorer is pure math: `update_` folds one sample into per-weight buffers, `score` turns a buffer into an
importance tensor (higher = more important). It knows nothing of Trainer, ranks or files. It also declares what the
pruning side needs to know about its criterion (`default_scope`, `has_hessian`, `input_norms`, `raw_label`), so no
module outside `scorers/` tests a criterion's name. The registry lives here, not in the package `__init__`, so the
criterion files import it without a cycle (peft keeps `register_peft_method` in a leaf the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

# Upper bound on the elements a batched (`_foreach_*`) op touches at once: bounds the temporaries
# (e.g. |w| for every weight) to ~256 MB in float32 however large the model is.
CHUNK_NUMEL = 1 << 26


def chunks(tensors: Sequence[Tensor], max_numel: int = CHUNK_NUMEL) -> Iterator[slice]:
    """Consecutive slices of `tensors` whose total numel stays under `max_numel` (at least one tensor each)."""
    start, total = 0, 0
    for i, t in enumerate(tensors):
        if i > start and total + t.numel() > max_numel:
            yield slice(start, i)
            start, total = i, 0
        total += t.numel()
    if start < len(tensors):
        yield slice(start, len(tensors))


def first_nonfinite_index(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding NaN/Inf, else `None`: one fused max-|x| per tensor (which, unlike a sum
    or a 2-norm, cannot overflow) and one host synchronisation per device, not one per tensor (128 per step at
    Phi-3-mini size stalled an accelerator's queue)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        peaks = torch._foreach_norm([tensors[i] for i in idx], float("inf"))
        finite = torch.isfinite(torch.stack([p.float() for p in peaks])).cpu()
        if not bool(finite.all()):
            bad.append(idx[int((~finite).nonzero()[0])])
    return min(bad) if bad else None


# Stochastic rounding adds uniform 16-bit noise to the low bits of each float32 before truncating to bfloat16.
# Drawing fresh random numbers per element cost 7 ms per 1M elements on one CPU thread (the RNG dominates, +19%
# per training step on a 134M model); a fixed pool of random values read at a fresh random offset on every call
# costs 0.7 ms. The pool holds every 16-bit value exactly 16 times in random order, so over the uniform random
# offsets each element rounds up with probability exactly residue / 2^16: unbiased, as with fresh noise.
NOISE_NUMEL = 1 << 20
_NOISE_POOLS: dict[torch.device, Tensor] = {}


def _noise_pool(device: torch.device) -> Tensor:
    pool = _NOISE_POOLS.get(device)
    if pool is None:
        # A fixed seed: the pool is part of the rounding method; a run's randomness is the caller's offsets.
        gen = torch.Generator().manual_seed(0x5EED)
        values = torch.arange(1 << 16, dtype=torch.int32).repeat(NOISE_NUMEL >> 16)
        pool = values[torch.randperm(NOISE_NUMEL, generator=gen)].to(device)
        _NOISE_POOLS[device] = pool
    return pool


def stochastic_round_to_bf16_(dst: Tensor, value: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write float32 `value` into bfloat16 `dst` with unbiased stochastic rounding; `value` is overwritten.

    Round-to-nearest would drop every increment smaller than half a bf16 ulp, so a long running sum in bf16
    would stop growing; stochastic rounding keeps its expectation exact. `generator` (a CPU generator) picks
    the noise offsets, so a run is reproducible from its seed.
    """
    if not bool(torch.isfinite(value.sum())):
        # NaN/Inf somewhere (or a sum that overflows): noise added to a NaN's bit pattern could carry into the
        # sign bit and turn it into a number, so take the exact path that keeps non-finite values as they are.
        noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, generator=generator).to(value.device)
        rounded = (value.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32)
        return dst.copy_(torch.where(torch.isfinite(value), rounded, value))
    pool = _noise_pool(value.device)
    bits = value.view(-1).view(torch.int32)
    for start in range(0, bits.numel(), NOISE_NUMEL):
        seg = bits[start : start + NOISE_NUMEL]
        off = int(torch.randint(NOISE_NUMEL, (1,), generator=generator))
        first = min(seg.numel(), NOISE_NUMEL - off)  # the pool read from `off`, wrapping around
        seg[:first].add_(pool[off : off + first])
        if first < seg.numel():
            seg[first:].add_(pool[: seg.numel() - first])
    bits.bitwise_and_(-65536)
    return dst.copy_(value)


# Elements per block for the per-step update on CPU: the temporaries (|w|, w*g) of a 1M-element block stay in cache
# instead of making a round trip through memory. Measured on a 85M-weight Llama: 48 ms per update vs 75-96 ms
# with whole-tensor batched ops. An accelerator wants the opposite, few large kernels: 1M-element blocks cost ~7,000
# launches per step at Phi-3-mini size (+105 ms on an H200, benchmarks/README.md section 12), so there a block is
# a whole tensor up to `CHUNK_NUMEL`.
BLOCK_NUMEL = 1 << 20


def blocks(*tensor_lists: Sequence[Tensor], size: int | None = None) -> Iterator[tuple[Tensor, ...]]:
    """Aligned flat views of at most `size` elements over parallel lists of same-shaped tensors.

    The first list holds the (contiguous) state buffers, so in-place ops on its views update the buffers. `size`
    defaults to `BLOCK_NUMEL` for CPU tensors and `CHUNK_NUMEL` elsewhere.
    """
    for tensors in zip(*tensor_lists):
        flat = [t.view(-1) if i == 0 else t.reshape(-1) for i, t in enumerate(tensors)]
        step = size or (BLOCK_NUMEL if flat[0].device.type == "cpu" else CHUNK_NUMEL)
        for start in range(0, flat[0].numel(), step):
            yield tuple(f[start : start + step] for f in flat)


def accumulate_(state: Tensor, update: Tensor, alpha: float = 1.0, generator: torch.Generator | None = None) -> None:
    """`state += alpha * update`: float32 states exactly, bfloat16 states with stochastic rounding."""
    if state.dtype == torch.float32:
        state.add_(update, alpha=alpha)
    else:
        stochastic_round_to_bf16_(state, state.float().add_(update, alpha=alpha), generator)


class Scorer:
    """Base class: one small subclass per criterion, registered with `@register_scorer`.

    Class attributes:
        name: registry key.
        source: when the callback samples: `"weights"` after the optimizer step, `"grads"` right before it
            (gradients complete: accumulated, unscaled, clipped, all-reduced), `"activations"` in forward hooks,
            `"final"` only when importance is read (no per-step cost).
        needs_grad: the tracked weights must receive gradients (refused on frozen LoRA base weights).
        weightings: the values of `ImportanceConfig.weighting` the criterion supports (`"uniform"` always).
        default_scope: the unstructured pruning scope when `PruneConfig.scope` is `None`: `"row"` or `"layer"`
            (the default, which can never prune a tensor to 100%); never `"global"`, which must be asked for.
        has_hessian: the state is each Linear input's Hessian `X^T X`, so pruning can run the OBS sweep
            (SparseGPT), which also updates the kept weights.
        raw_label: for criteria whose scores need the weights, what the state alone holds (shown by `inspect`
            when no model is given); `None` when the state is already the score's input.

    Args:
        weighting (`str`, *optional*, defaults to `"uniform"`):
            How `update_` weighs the sample of step `t`: `"uniform"` (every sample alike) or `"step"` (by `t`,
            as arXiv 2502.17071 weighs magnitudes); only values in `weightings`.

    Raises:
        `ValueError`: `weighting` is not one of the criterion's `weightings`.
    """

    name: ClassVar[str]
    source: ClassVar[str] = "weights"
    needs_grad: ClassVar[bool] = False
    formula: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    weightings: ClassVar[tuple[str, ...]] = ("uniform",)
    default_scope: ClassVar[str] = "layer"
    has_hessian: ClassVar[bool] = False
    raw_label: ClassVar[str | None] = None

    def __init__(self, *, weighting: str = "uniform"):
        if weighting not in self.weightings:
            raise ValueError(f"weighting={weighting!r} is not supported by criterion {self.name!r}; use one of "
                             f"{list(self.weightings)}")
        self.weighting = weighting

    def state_shape(self, weight: Tensor) -> torch.Size:
        return weight.shape

    def token_scale(self, *, tokens: int, num_samples: int = 0, weight_sum: float = 0.0) -> float:
        """
        What an activation state is divided by for a per-token mean: `tokens`, or with `weighting="step"` `tokens`
        times the mean step `weight_sum / num_samples` (the sample of step `t` was added `t` times).

        Args:
            tokens (`int`): real tokens seen (`meta["tokens"][name]`).
            num_samples (`int`, *optional*, defaults to 0): samples taken (`meta["num_samples"]`).
            weight_sum (`float`, *optional*, defaults to 0.0): `sum_t t` over them (`meta["weight_sum"]`).

        Returns:
            `float`: > 0 when `tokens > 0`.
        """
        if self.weighting == "step" and num_samples > 0 and weight_sum > 0:
            return tokens * (float(weight_sum) / num_samples)
        return float(tokens)

    def input_norms(self, state: Tensor, *, tokens: int, num_samples: int = 0, weight_sum: float = 0.0) -> Tensor:
        """
        Activation criteria: `||x_j||_2`, the root-mean square of each input channel over the tokens seen,
        `sqrt(sum_tokens x_j^2 / token_scale)` (wanda's factor; what OWL and the logged summary weigh `|W|` by).

        Args:
            state (`torch.Tensor`): this criterion's state of one weight.
            tokens, num_samples, weight_sum: the weight's scalars, as for [`score`].

        Returns:
            `torch.Tensor`: `[in_features]` float32 on `state`'s device.

        Raises:
            `ValueError`: the criterion keeps no activation statistics, or no tokens were seen.
        """
        raise ValueError(f"criterion {self.name!r} keeps no activation statistics; use one of "
                         f"{criteria_where(lambda cls: cls.source == 'activations')}")

    def _root_mean(self, sq_sums: Tensor, **scalars) -> Tensor:
        """`sqrt(sq_sums / token_scale)` in float32: the one rule behind `input_norms`."""
        if scalars.get("tokens", 0) <= 0:
            raise ValueError(f"{self.name} importance has seen no training tokens yet")
        return (sq_sums.float() / self.token_scale(**scalars)).sqrt()

    def statistic(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        """Activation criteria: the per-forward sum over the real tokens of a Linear input `x` `[..., in]`
        (`token_mask` `[...]` bool, or `None` when every token is real) that `update_` folds in per step."""
        raise NotImplementedError(f"criterion {self.name!r} reads no activations")

    def update_(
        self,
        states: Sequence[Tensor],
        weights: Sequence[Tensor],
        grads: Sequence[Tensor] | None,
        t: int,
        generator: torch.Generator | None = None,
    ) -> None:
        """Fold one sample taken at step (or epoch) `t` into `states`, in place."""
        raise NotImplementedError

    def score(self, state: Tensor, *, weight: Tensor | None, num_samples: int, weight_sum: float, tokens: int) -> Tensor:
        """Importance of each element of the weight, as float32."""
        raise NotImplementedError

    def ranking(self, state: Tensor, **kwargs) -> Tensor:
        """Any tensor that orders the weights exactly as `score` does (same ties), as cheaply as possible.

        Criteria whose score is the state over one positive scalar shared by all tensors return the raw state:
        no float32 copy, no division, and global thresholds across tensors stay exact.
        """
        return self.score(state, **kwargs)


# ------------------------------------------------------------------------------------------------------ registry
SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """
    Class decorator adding a criterion to `SCORERS`: a new criterion is one file in `scorers/` (imported by
    `scorers/__init__.py`), or a class registered by the user before the config that names it is built.

    Raises:
        `ValueError`: a criterion of that name is already registered, or `default_scope` is not `"row"`/`"layer"`.
    """
    if cls.name in SCORERS:
        raise ValueError(f"A scorer named {cls.name!r} is already registered ({SCORERS[cls.name].__qualname__})")
    if cls.default_scope not in ("row", "layer"):
        raise ValueError(f"{cls.__qualname__}.default_scope must be 'row' or 'layer' (a global threshold has to be "
                         f"asked for); got {cls.default_scope!r}")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str, *, weighting: str = "uniform", **options) -> Scorer:
    """A new scorer of criterion `name`; `options` go to its constructor, and `weighting` too unless it is the
    default `"uniform"` (so a registered scorer whose `__init__` takes no `weighting` still builds).

    Raises:
        `ValueError`: `name` is not registered, or it does not support `weighting`.
    """
    if name not in SCORERS:
        raise ValueError(f"Unknown criterion {name!r}; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    if weighting not in cls.weightings:
        raise ValueError(f"weighting={weighting!r} is not supported by criterion {name!r}; use one of "
                         f"{list(cls.weightings)}")
    if weighting != "uniform":
        options["weighting"] = weighting
    return cls(**options)


def default_scope(criterion: str | None) -> str:
    """
    The unstructured pruning scope used for `criterion` when `PruneConfig.scope` is `None`: its scorer's
    `default_scope`.

    Args:
        criterion (`str`, *optional*):
            A registered criterion; an unknown one (or `None`) gets `"layer"`, which can never prune a tensor to 100%.

    Returns:
        `str`: `"row"` or `"layer"`; never `"global"`, which must be asked for.
    """
    cls = SCORERS.get(criterion) if criterion is not None else None
    return cls.default_scope if cls is not None else Scorer.default_scope


def criteria_where(predicate: Callable[[type[Scorer]], bool]) -> str:
    """The registered criteria a predicate holds for, quoted and joined for a message: `'wanda' or 'sparsegpt'`."""
    return " or ".join(repr(name) for name, cls in SCORERS.items() if predicate(cls)) or "none registered"
