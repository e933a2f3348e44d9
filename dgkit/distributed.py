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
    average_in_place([p.grad for p in params if p.grad is not None])


def average_in_place(tensors: Iterable[Tensor]) -> None:
    """All-reduce (mean) ``tensors`` in place, in one flat buffer: e.g. per-domain gradients
    taken with ``torch.autograd.grad``, before an algorithm combines them."""
    tensors = list(tensors)
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over every rank (a copy of ``t`` on one process)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / world_size()


def rank_disagreement(module: torch.nn.Module) -> tuple[float, str] | None:
    """The largest relative difference of any parameter tensor across DDP ranks, and its
    name, or None when they agree (or on one process). Every rank takes the same averaged
    step, so trained parameters agree bit for bit; a difference means an update the
    all-reduce never saw (gradients set by hand without ``average_gradients``)."""
    if world_size() == 1:
        return None
    named = [(n, p) for n, p in module.named_parameters()]
    if not named:
        return None
    local = torch.stack([p.detach().double().sum() for _, p in named])
    scale = torch.stack([p.detach().double().abs().sum() for _, p in named]) + 1e-12
    gathered = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    spread = (torch.stack(gathered).amax(0) - torch.stack(gathered).amin(0)) / scale
    worst = int(spread.argmax())
    return None if spread[worst] == 0 else (float(spread[worst]), named[worst][0])
