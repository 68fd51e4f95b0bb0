"""The only module that knows about multi-process training (DDP, FSDP, DeepSpeed).

Everything else sees local tensors and a partition plan. Collectives are no-ops on one process
(accelerate's habit), so single- and multi-process code share one path.

- DDP: weights and reduced gradients are identical on every rank, so each rank accumulates a disjoint,
  size-balanced subset of the tracked weights (`partition`); per-rank state is ~1/N of the total.
- Activation statistics (`wanda`) differ per rank: every rank keeps its own small `[in_features]` sums,
  which are summed across ranks when read or saved.
- FSDP2 (`fully_shard`): weights and gradients are `DTensor`s sharded on dim 0. Each rank accumulates on its
  own local rows of every tracked weight (`row_shard`), never materialising a full tensor while training; the
  files record each shard's row offset so `load_importance` reassembles exact full tensors.
- Per-weight solves (a `PruneSchedule`'s OBS sweeps and re-fit) under DDP: each weight is solved by one rank, the
  weights assigned by their estimated cost (`partition`; weights sharing one statistic, q/k/v, on one rank together),
  each statistic summed onto that rank only (`reduce_to_owners`), and the results broadcast from it, all of one owner
  in one buffer (`broadcast_owned_`); a failure on one rank is raised on every rank (`same_error_on_every_rank`).
  `COLLECTIVES` counts the calls and bytes of every collective here.
- FSDP1 (`FlatParameter`) and DeepSpeed ZeRO-3 partition flattened parameters: refused (`check_supported`).
  Under DeepSpeed ZeRO-1/2 weights are whole on every rank, but gradients are partitioned and the optimizer
  steps inside `backward`, so only weight and activation criteria are allowed.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

ALL_RANKS = -1  # owner of a weight that every rank holds a row shard of (FSDP2)


# The collectives this process ran through this module, by kind ("all_reduce", "reduce", "broadcast", "all_gather"):
# calls and payload bytes. Deterministic (no timing), what an update costs in communication; the tests read it.
COLLECTIVES: dict[str, Counter] = {"calls": Counter(), "bytes": Counter()}


def _count(kind: str, tensor: Tensor) -> None:
    COLLECTIVES["calls"][kind] += 1
    COLLECTIVES["bytes"][kind] += tensor.numel() * tensor.element_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def show_progress(progress: bool) -> bool:
    """
    Whether to draw a progress bar: asked for, on the main process only (rank 0, or `RANK=0` before the process group
    exists), and not switched off by `transformers.utils.logging.disable_progress_bar()`,
    `huggingface_hub.utils.disable_progress_bars()` / `HF_HUB_DISABLE_PROGRESS_BARS=1`, or `TQDM_DISABLE=1` (which
    tqdm itself ignores once `disable=` is passed).

    Args:
        progress (`bool`): what the caller asked for.

    Returns:
        `bool`: `True` to draw the bar.
    """
    if not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    rank = rank_and_world()[0] if is_distributed() else int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        return False
    from huggingface_hub.utils import are_progress_bars_disabled

    tf = sys.modules.get("transformers.utils.logging")  # imported by every caller's path; never imported here
    return not are_progress_bars_disabled() and (tf is None or tf.is_progress_bar_enabled())


def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_tensor(t: Tensor) -> Tensor:
    """The part of `t` this rank holds: an FSDP2 `DTensor`'s local shard, or `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def row_shard(t: Tensor) -> tuple[int, int] | None:
    """`(row_offset, rows)` of this rank's dim-0 shard of an FSDP2 `DTensor`; `None` for a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch < 2.5 has no public DTensor (and no FSDP2)
        return None
    if not isinstance(t, DTensor):
        return None
    if tuple(t.placements) != (Shard(0),) or t.device_mesh.size() != rank_and_world()[1]:
        raise ValueError(
            f"Only FSDP2 dim-0 sharding over all ranks (placements (Shard(dim=0),) on a 1-D mesh of every rank) is "
            f"supported; got placements {tuple(t.placements)} on {t.device_mesh} (HSDP and tensor parallel are not)"
        )
    # The local shard's place in the full tensor, as distributed checkpointing computes it (uneven shards too).
    (chunk,) = t.__create_chunk_list__()
    return int(chunk.offsets[0]), int(chunk.sizes[0])


def backend(model: torch.nn.Module, args=None) -> str:
    """How the model's weights are held across ranks, decided in one place (as accelerate's `get_state_dict`).

    Returns one of `"single"`, `"ddp"` (whole weights on every rank), `"fsdp2"` (`fully_shard` dim-0 `DTensor`s),
    `"fsdp1"` (flattened `FlatParameter`s), `"deepspeed"` (ZeRO-1/2: whole weights, optimizer stepped inside
    backward), `"zero3"` (partitioned placeholders), or `"fsdp"` (configured in `args` but not visible on the
    weights: the Trainer shards them later, or, on CPU, runs plain DDP).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    plugin = getattr(args, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if stage == 3 or any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    if plugin is not None or getattr(args, "deepspeed", None):
        return "deepspeed"
    if any(row_shard(p) is not None for p in model.parameters()):
        return "fsdp2"
    if getattr(args, "fsdp", None):  # FSDP configured but not visible on the weights (on CPU the Trainer runs DDP)
        return "fsdp"
    return "ddp" if is_distributed() else "single"


def check_supported(model: torch.nn.Module, args=None, *, needs_grad: bool = False, criterion: str = "") -> None:
    """Refuse wrappers whose parameters the callback cannot read, with a one-line reason."""
    kind = backend(model, args)
    if kind == "fsdp1":
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) flattens weights into FlatParameters, so per-weight importance "
            "cannot be read; use FSDP2 (`fully_shard`, accelerate `fsdp_version: 2`) or DDP"
        )
    if kind == "zero3":
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions every weight across ranks (module weights are empty placeholders), so "
            "importance cannot be accumulated; use ZeRO-1/2, FSDP2 or DDP"
        )
    if kind == "deepspeed" and needs_grad:
        raise ValueError(
            f"criterion {criterion!r} reads gradients, but under DeepSpeed they are partitioned and the optimizer steps "
            "inside backward (no callback sees them); use 'temporal_magnitude', 'magnitude', 'wanda' or 'sparsegpt'"
        )


def partition(numels: Mapping[str, float], world_size: int, *,
              together: Mapping[str, str] | None = None) -> dict[str, int]:
    """Assign each tensor to a rank so that per-rank loads are balanced (greedy, largest first): element counts for
    buffers, estimated floating-point operations for solves.

    Deterministic: every rank computes the same plan from the same names and sizes (ties go to the lower rank).
    `together` (name -> a representative): the names of one representative go to one rank, as one item of their summed
    load (weights that share one statistic, summed onto that rank once, [`reduce_to_owners`]).
    """
    if world_size == 1:
        return dict.fromkeys(numels, 0)
    groups: dict[str, list[str]] = {}
    for name in numels:
        groups.setdefault((together or {}).get(name, name), []).append(name)
    loads = {g: sum(numels[n] for n in names) for g, names in groups.items()}
    heap = [(0, r) for r in range(world_size)]
    owners: dict[str, int] = {}
    for g in sorted(loads, key=lambda n: (-loads[n], n)):
        load, r = heapq.heappop(heap)
        owners.update(dict.fromkeys(groups[g], r))
        heapq.heappush(heap, (load + loads[g], r))
    return {n: owners[n] for n in numels}


@contextlib.contextmanager
def same_error_on_every_rank() -> Iterator[None]:
    """Run a block that may fail on some ranks only (each rank solving its own weights), and raise its error on every
    rank: the ranks that did not fail would otherwise wait forever in the next collective. A collective at the end of
    the block (one integer all-reduce; the messages are gathered only after a failure). No-op on one process.

    Raises:
        Exception: this rank's own error, as raised; on the other ranks, the lowest failing rank's: `ValueError` with
            its message for a `ValueError`, else `RuntimeError` naming the rank and the error.
    """
    if not is_distributed():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # every kind must reach the collective below, or the other ranks hang
        error = e
    if not any_rank(error is not None):
        return
    messages: list = [None] * dist.get_world_size()
    COLLECTIVES["calls"]["all_gather"] += 1
    dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    rank, (kind, message) = next((r, m) for r, m in enumerate(messages) if m is not None)
    if kind == "ValueError":  # the one-line refusals: the same words on every rank
        raise ValueError(message)
    raise RuntimeError(f"rank {rank} failed: {kind}: {message}")


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum tensors across ranks in place (no-op on one process)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float().to(comm_device()) for t in tensors])
    _count("all_reduce", flat)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_exact_(tensors: Iterable[Tensor]) -> None:
    """Sum small statistics across ranks in place without rounding: floating tensors through float64, integer ones
    through int64, one collective for each kind ([`all_reduce_sum_`] goes through float32, exact for counts only up
    to 2**24). No-op on one process.

    Args:
        tensors (`Iterable[Tensor]`): any shapes and dtypes (router counts and masses, unit sums and token counts).
    """
    if not is_distributed():
        return
    tensors = list(tensors)
    for floating, dtype in ((True, torch.float64), (False, torch.int64)):
        group = [t for t in tensors if t.is_floating_point() == floating]
        if not group:
            continue
        flat = torch.cat([t.reshape(-1).to(comm_device(), dtype) for t in group])
        _count("all_reduce", flat)
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


def gather_rows(local: Tensor, offset: int, shape: list[int]) -> Tensor:
    """The full tensor of `shape` from every rank's dim-0 shard (`local` holds rows `offset:offset+len`)."""
    full = torch.zeros(shape, dtype=local.dtype, device=local.device)
    full[offset : offset + local.shape[0]] = local
    # Each row has exactly one owner and zeros elsewhere, so the sum is exact (in float32, also for bfloat16).
    all_reduce_sum_([full])
    return full


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (all of the same length), indexed by rank."""
    rank, world = rank_and_world()
    table = torch.zeros(world, len(values), dtype=torch.int64, device=comm_device())
    table[rank] = torch.tensor(values, dtype=torch.int64)
    if is_distributed():
        _count("all_reduce", table)
        dist.all_reduce(table)
    return table.tolist()


def all_reduce_int(values: list[int]) -> list[int]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device())
    _count("all_reduce", t)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_(tensor: Tensor, src: int) -> Tensor:
    """`src`'s `tensor` into `tensor` on every rank, in place; a strided view (an expert slice of an interleaved or
    transposed fused parameter) goes through a contiguous buffer, which NCCL requires. No-op on one process."""
    if is_distributed():
        buf = tensor.to(comm_device()).contiguous()
        _count("broadcast", buf)
        dist.broadcast(buf, src)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor


def _bytes(t: Tensor) -> Tensor:
    """`t`'s bytes, flat, padded to a multiple of 8 (so every tensor of a packed buffer starts aligned for its dtype)."""
    raw = t.detach().to(comm_device()).contiguous().reshape(-1).view(torch.uint8)
    pad = -raw.numel() % 8
    return torch.cat([raw, raw.new_zeros(pad)]) if pad else raw


def broadcast_owned_(items: Sequence[tuple[Tensor, int]]) -> None:
    """Fill every tensor in place with its owner's (`(tensor, owner rank)` pairs, the same on every rank), with one
    `broadcast` per owning rank, not one per tensor: an owner's tensors travel as the bytes of one buffer, so a weight
    and its bool mask go together bit for bit, and a strided view (an expert slice of a fused parameter) is copied out
    and back (NCCL refuses non-contiguous tensors). The owner's own tensors are left as they are. No-op on one process.
    """
    if not is_distributed():
        return
    rank, world = rank_and_world()
    for src in range(world):
        group = [t for t, owner in items if owner == src]
        if not group:
            continue
        sizes = [t.numel() * t.element_size() for t in group]
        flat = torch.cat([_bytes(t) for t in group]) if src == rank else \
            torch.empty(sum(n + (-n % 8) for n in sizes), dtype=torch.uint8, device=comm_device())
        _count("broadcast", flat)
        dist.broadcast(flat, src)
        if src == rank:
            continue
        offset = 0
        for t, n in zip(group, sizes):
            t.copy_(flat[offset : offset + n].view(t.dtype).view(t.shape))
            offset += n + (-n % 8)


def reduce_to_owners(tensors: Mapping[str, Tensor], owners: Mapping[str, int]) -> dict[str, Tensor]:
    """Sum each tensor across ranks onto its owner only, with one `reduce` per owning rank (one flat buffer of its
    tensors), not an all-reduce of every tensor to every rank: each rank receives its owners' share of the bytes.

    Every rank passes the same names, shapes and `owners` (name -> rank); its tensors are its local parts and stay as
    they are (the buffer is a copy), so a statistic that keeps accumulating after the reduction is still this rank's
    own part. Returns the sums this rank owns (new tensors, on each tensor's device; one process: copies of all).
    """
    rank, world = rank_and_world()
    if world == 1:  # also a group of one (`torchrun --nproc_per_node 1`): no views of one flat buffer escape
        return {n: t.clone() for n, t in tensors.items()}
    out: dict[str, Tensor] = {}
    for dst in range(world):
        names = [n for n in tensors if owners[n] == dst]
        if not names:
            continue
        dtype = functools.reduce(torch.promote_types, (tensors[n].dtype for n in names))
        flat = torch.cat([tensors[n].reshape(-1).to(comm_device(), dtype) for n in names])
        _count("reduce", flat)
        dist.reduce(flat, dst)
        if dst != rank:
            continue
        offset = 0
        for n in names:
            t = tensors[n]
            out[n] = flat[offset : offset + t.numel()].view(t.shape).to(t.device, t.dtype)
            offset += t.numel()
    return out


def shared_tensors(tensors: Mapping[str, Tensor], candidates: Mapping[str, str]) -> dict[str, str]:
    """`name -> rep` for the `candidates` (name -> an earlier name, e.g. q/k/v's) whose tensor equals its rep's bit for
    bit on every rank: one sum across ranks, reduced once. Collective (one small all-reduce); the same on every rank."""
    names = [n for n, rep in candidates.items() if rep in tensors and n in tensors]
    local = [int(torch.equal(tensors[n], tensors[candidates[n]])) for n in names]
    agreed = all_reduce_int(local) if is_distributed() else local
    world = rank_and_world()[1]
    shared = {n: candidates[n] for n, count in zip(names, agreed) if count == world}
    return {n: rep for n, rep in shared.items() if rep not in shared}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=comm_device())
    _count("all_reduce", t)
    dist.all_reduce(t)
    return bool(t.item())


@dataclass
class OwnershipPlan:
    """Which rank accumulates, and which rank writes, each tracked buffer. Every rank builds the same plan.

    - `per_rank=True` (weight and gradient criteria): whole weights are identical on every rank (DDP, ZeRO-1/2), so
      each buffer is owned by one rank (`partition`, size-balanced); FSDP2 row-sharded weights are owned by every rank
      (`ALL_RANKS`), each keeping its own rows (`rows`).
    - `per_rank=False` (activation criteria): every rank sums its own tokens into every buffer; the sums are added
      across ranks when read, and writing is spread over the ranks by the same partition.
    """

    rank: int = 0
    world: int = 1
    per_rank: bool = True
    owners: dict[str, int] = field(default_factory=dict)
    writers: dict[str, int] = field(default_factory=dict)
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # FSDP2: this rank's (row_offset, rows)

    @classmethod
    def build(cls, params: Mapping[str, Tensor], *, per_rank: bool) -> OwnershipPlan:
        """The plan for tracked `params` (name -> parameter, possibly an FSDP2 `DTensor`)."""
        rank, world = rank_and_world()
        rows = {n: r for n, p in params.items() if (r := row_shard(p)) is not None} if per_rank else {}
        replicated = {n: p.numel() for n, p in params.items() if n not in rows}
        owners = partition(replicated, world if per_rank else 1) | dict.fromkeys(rows, ALL_RANKS)
        writers = owners if per_rank else partition(replicated, world)
        return cls(rank, world, per_rank, owners, writers, rows)

    def holds(self, name: str) -> bool:
        """Whether this rank keeps a buffer for `name`."""
        return not self.per_rank or self.owners[name] in (self.rank, ALL_RANKS)

    def writes(self, name: str) -> bool:
        return self.writers[name] in (self.rank, ALL_RANKS)

    def file_owners(self) -> dict[str, int]:
        """Rank whose shard file holds each buffer (row-sharded buffers: listed under rank 0, see `row_table`)."""
        return {n: max(w, 0) for n, w in self.writers.items()}

    def row_table(self) -> dict[str, list[int]]:
        """FSDP2 (collective): the first row each rank's shard holds, per row-sharded weight, indexed by rank."""
        names = list(self.rows)
        table = all_gather_ints([self.rows[n][0] for n in names])
        return {n: [offsets[i] for offsets in table] for i, n in enumerate(names)}

    def summed(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Activation sums added across ranks (collective; copies, the inputs are untouched)."""
        names = list(tensors)
        out = [tensors[n].clone() for n in names]
        all_reduce_sum_(out)
        return dict(zip(names, out))

    def assemble(self, tensors: Mapping[str, Tensor], shapes: Mapping[str, list[int]],
                 empty: Callable[[str], Tensor]) -> dict[str, Tensor]:
        """Full buffers on every rank (collective): owners broadcast theirs, FSDP2 row shards are gathered.

        `tensors` holds this rank's buffers, `shapes` the full weight shapes (for row-sharded buffers), and
        `empty(name)` allocates a receive buffer of the right shape and dtype.
        """
        if self.world == 1 or not self.per_rank:
            return dict(tensors)
        full = {}
        for name, owner in self.owners.items():
            if owner == ALL_RANKS:
                full[name] = gather_rows(tensors[name], self.rows[name][0], list(shapes[name]))
            else:
                full[name] = broadcast_(tensors[name] if owner == self.rank else empty(name), owner)
        return full
