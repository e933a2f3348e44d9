"""Building blocks of sharpness-aware training, shared by SAM, ASAM and UDIM.

Kept apart from the algorithms (as tllib keeps its losses) so a plugin can reuse them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


@torch.no_grad()
def sam_perturbation(named_params: Iterable[tuple[str, nn.Parameter]], rho: float,
                     adaptive: bool = False, eta: float = 0.01,
                     grads: Iterable[Tensor | None] | None = None
                     ) -> list[tuple[nn.Parameter, Tensor]]:
    """The first-order worst case ``e = rho * T^2 g / ||T g||`` of SAM (``T = 1``) or ASAM.

    ASAM follows the official code: ``T = |w| + eta`` for parameters named ``*weight*``
    and ``T = 1`` for the rest (biases). One global norm over all parameters. Parameters
    without a gradient (frozen, unused) are skipped. ``grads`` defaults to ``p.grad``.
    A gradient that is not finite (fp16 overflow) gives no perturbation: the second pass
    then overflows at the same loss scale too, and the grad scaler skips the step.
    """
    named = list(named_params)
    grads = [p.grad for _, p in named] if grads is None else list(grads)
    scaled, kept = [], []
    for (name, p), g in zip(named, grads, strict=True):
        if g is None:
            continue
        t = (p.abs() + eta) if adaptive and "weight" in name else None
        scaled.append(g * t if t is not None else g)
        kept.append((p, g, t))
    if not kept:
        return []
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    if not torch.isfinite(norm):
        return []
    scale = rho / (norm + 1e-12)
    out = []
    for p, g, t in kept:
        e = g * scale if t is None else g * t * t * scale
        out.append((p, e.to(p.dtype)))
    return out


@contextlib.contextmanager
def perturbed(perturbation: list[tuple[nn.Parameter, Tensor]]) -> Iterator[None]:
    """Weights at ``w + e`` inside the block, exactly ``w`` again after it."""
    saved = [(p, p.detach().clone()) for p, _ in perturbation]
    with torch.no_grad():
        for p, e in perturbation:
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in saved:  # copy back rather than subtract: no rounding drift
                p.copy_(original)


@contextlib.contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with batch statistics but leaves running statistics alone.

    For the second (perturbed) pass of SAM: ``momentum=0`` keeps the running averages,
    and ``num_batches_tracked`` is restored so only the first pass counts.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()
                          if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def worst_case_sharpness(model: nn.Module, x: Tensor, y: Tensor, rho: float) -> float:
    """``L(w + rho g/||g||) - L(w)`` on ``(x, y)``: the loss increase at SAM's first-order
    worst point of radius ``rho`` (Foret et al.'s rho-sharpness), in eval mode."""
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = _loss(model, x, y)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    e = sam_perturbation(named, rho, grads=grads)
    with torch.no_grad(), perturbed(e or []):
        sharp = _loss(model, x, y)
    model.train(was_training)
    return (sharp - loss).item()


@torch.no_grad()
def random_sharpness(model: nn.Module, x: Tensor, y: Tensor, rho: float, samples: int = 10,
                     seed: int = 0) -> float:
    """Mean loss increase over ``samples`` random weight directions of global L2 norm
    ``rho``, in eval mode: an average-case flatness measure that needs no gradient."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    base = _loss(model, x, y)
    increases = []
    for _ in range(samples):
        noise = [torch.randn(p.shape, generator=g).to(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n) for n in noise]))
        with perturbed([(p, n * (rho / norm)) for p, n in zip(params, noise, strict=True)]):
            increases.append((_loss(model, x, y) - base).item())
    model.train(was_training)
    return sum(increases) / len(increases)
