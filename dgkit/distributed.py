"""Collective helpers for algorithm state that must agree across DDP ranks.

Every function is the identity when torch.distributed is not initialised, so algorithms
call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` (rows may differ in number per rank) from every rank, in rank order."""
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def average_gradients(params: Iterable[Tensor]) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over every rank (a copy of ``t`` on one process)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / world_size()
