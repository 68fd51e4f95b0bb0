"""The only module that knows about multi-process training (DDP, FSDP, DeepSpeed).

Everything else sees local tensors and a partition plan. Collectives are no-ops on one process
(accelerate's habit), so single- and multi-process code share one path.

- DDP: weights and reduced gradients are identical on every rank, so each rank accumulates a disjoint,
  size-balanced subset of the tracked weights (`partition`); per-rank state is ~1/N of the total.
- Activation statistics (`wanda`) differ per rank: every rank keeps its own small `[in_features]` sums,
  which are summed across ranks when read or saved.
"""

from __future__ import annotations

import heapq

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_tensor(t: Tensor) -> Tensor:
    """The part of `t` this rank holds: an FSDP2 `DTensor`'s local shard, or `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def partition(numels: dict[str, int], world_size: int) -> dict[str, int]:
    """Assign each tensor to a rank so that per-rank element counts are balanced (greedy, largest first).

    Deterministic: every rank computes the same plan from the same names and sizes.
    """
    if world_size == 1:
        return dict.fromkeys(numels, 0)
    heap = [(0, r) for r in range(world_size)]
    owners: dict[str, int] = {}
    for name in sorted(numels, key=lambda n: (-numels[n], n)):
        load, r = heapq.heappop(heap)
        owners[name] = r
        heapq.heappush(heap, (load + numels[name], r))
    return owners


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum tensors across ranks in place (no-op on one process)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float().to(comm_device()) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_int(values: list[int]) -> list[int]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_(tensor: Tensor, src: int) -> Tensor:
    if is_distributed():
        buf = tensor.to(comm_device())
        dist.broadcast(buf, src)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return bool(t.item())
