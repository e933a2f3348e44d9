"""The sharpness family on top of ERM: SAM (Foret et al., ICLR 2021), ASAM (Kwon et al.,
ICML 2021), GSAM (Zhuang et al., ICLR 2022) and SAGM (Wang et al., CVPR 2023)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from dgkit import Backbone, Batch, Optimization, Task, register
from dgkit.errors import check
from dgkit.sharpness import bn_stats_frozen, perturbed, sam_perturbation
from dgkit_algorithms.erm import ERM


@register("sam")
class SAM(ERM):
    """Sharpness-Aware Minimization: descend with the gradient taken at the worst point
    ``w + rho * g / ||g||`` of an L2 ball around the weights. Two forward/backward passes
    per step; the base optimizer (``--model.optimizer``) makes the update."""

    manual_optimization = True

    def __init__(self, task: Task, backbone: Backbone, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.01, sync_perturbation: bool = False):
        """
        Args:
            rho: radius of the neighbourhood (SAM paper and DomainBed forks: 0.05).
            adaptive: ASAM's scale-invariant ball ``T_w = |w| + eta`` (official ASAM:
                weights only, biases unscaled).
            eta: ASAM's offset.
            sync_perturbation: under DDP, all-reduce the first pass too, so every device
                perturbs with the global gradient. Default off: each device perturbs with
                its own sub-batch's gradient, as the SAM paper does (m-sharpness).
        """
        super().__init__(task, backbone)
        check(rho >= 0, "model.algorithm.rho", f"{rho} is negative", ">= 0")
        check(eta >= 0, "model.algorithm.eta", f"{eta} is negative", ">= 0")
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.sync_perturbation = sync_perturbation

    def perturbation_gradient(self, batch: Batch, opt: Optimization) -> Tensor:
        """Pass 1: the loss at ``w`` and its gradient in ``p.grad``."""
        sync = contextlib.nullcontext() if self.sync_perturbation else opt.no_sync()
        with sync:
            opt.zero_grad()
            loss = self.training_loss(batch)
            opt.backward(loss)
        return loss

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        loss = self.perturbation_gradient(batch, opt)
        e = sam_perturbation(self.named_trainable(), self.rho, self.adaptive, self.eta)
        opt.zero_grad()
        with perturbed(e), bn_stats_frozen(self):
            perturbed_loss = self.training_loss(batch)
            opt.backward(perturbed_loss)  # synced under DDP: one all-reduce of the SAM gradient
        opt.step()
        # Log the loss at w (what the reference logs), the perturbed one beside it.
        return {"loss": loss.detach(), "perturbed_loss": perturbed_loss.detach()}


@register("asam")
class ASAM(SAM):
    """Adaptive SAM with the official code's defaults (rho 0.5, eta 0.01)."""

    def __init__(self, task: Task, backbone: Backbone, rho: float = 0.5, eta: float = 0.01,
                 sync_perturbation: bool = False):
        """
        Args:
            rho: radius of the scale-invariant neighbourhood.
            eta: offset of ``T_w = |w| + eta``.
            sync_perturbation: all-reduce the first pass under DDP (see SAM).
        """
        super().__init__(task, backbone, rho=rho, adaptive=True, eta=eta,
                         sync_perturbation=sync_perturbation)


class TwoPassSharpness(ERM):
    """The update GSAM's and SAGM's official optimizers make: both passes on each device's
    own batch (DDP's all-reduce held back), their gradients combined into one direction,
    which is then averaged across devices and stepped with the base optimizer."""

    manual_optimization = True

    def __init__(self, task: Task, backbone: Backbone, rho: float, alpha: float):
        super().__init__(task, backbone)
        check(rho >= 0, "model.algorithm.rho", f"{rho} is negative", ">= 0")
        check(alpha >= 0, "model.algorithm.alpha", f"{alpha} is negative", ">= 0")
        self.rho, self.alpha = rho, alpha

    def perturbation(self, grads: list[tuple[nn.Parameter, Tensor]]) -> list[tuple[nn.Parameter, Tensor]]:
        raise NotImplementedError

    def combine(self, grads: list[tuple[nn.Parameter, Tensor]]) -> None:
        """Set ``p.grad`` (the perturbed gradient) to the update direction, given the
        gradients at ``w`` in ``grads``."""
        raise NotImplementedError

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        params = [p for _, p in self.named_trainable()]
        with opt.no_sync():
            opt.zero_grad()
            loss = self.training_loss(batch)
            opt.backward(loss)
            grads = [(p, p.grad.clone()) for p in params if p.grad is not None]
            opt.zero_grad()
            with perturbed(self.perturbation(grads)), bn_stats_frozen(self):
                perturbed_loss = self.training_loss(batch)
                opt.backward(perturbed_loss)
            self.combine(grads)
        opt.average_gradients(params)
        opt.step()
        return {"loss": loss.detach(), "perturbed_loss": perturbed_loss.detach()}


def _norm(tensors: list[Tensor]) -> Tensor:
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


@register("gsam")
class GSAM(TwoPassSharpness):
    """Surrogate Gap Guided SAM: SAM's gradient at ``w + rho g / ||g||`` minus ``alpha``
    times the part of the plain gradient ``g`` orthogonal to it, which lowers the surrogate
    gap (perturbed minus plain loss) without raising the perturbed loss."""

    def __init__(self, task: Task, backbone: Backbone, rho: float = 0.05, alpha: float = 0.01):
        """
        Args:
            rho: radius of the neighbourhood (constant; schedule it with the lr elsewhere).
            alpha: weight of the orthogonal component (the paper's ``alpha``).
        """
        super().__init__(task, backbone, rho, alpha)

    def perturbation(self, grads):
        scale = self.rho / (_norm([g for _, g in grads]) + 1e-12)
        return [(p, g * scale.to(p)) for p, g in grads]

    def combine(self, grads) -> None:
        inner = 0.0
        for p, g in grads:
            inner += torch.sum(g * p.grad)
        new_norm, old_norm = _norm([p.grad for p, _ in grads]), _norm([g for _, g in grads])
        cosine = inner / (new_norm * old_norm + 1e-12)
        for p, g in grads:
            vertical = g - cosine * old_norm * p.grad / (new_norm + 1e-12)
            p.grad.add_(vertical, alpha=-self.alpha)


@register("sagm")
class SAGM(TwoPassSharpness):
    """Sharpness-Aware Gradient Matching: perturb to ``w + rho g / ||g|| - alpha g`` and
    descend along the mean of the plain and the perturbed gradients, which minimizes the
    loss, the perturbed loss and the gap between their gradients together."""

    def __init__(self, task: Task, backbone: Backbone, rho: float = 0.05, alpha: float = 0.001):
        """
        Args:
            rho: radius of the neighbourhood (the official DG code's 0.05).
            alpha: step back along the gradient in the perturbation (``alpha``).
        """
        super().__init__(task, backbone, rho, alpha)

    def perturbation(self, grads):
        scale = self.rho / (_norm([g for _, g in grads]) + 1e-12) - self.alpha
        return [(p, g * scale.to(p)) for p, g in grads]

    def combine(self, grads) -> None:
        for p, g in grads:
            p.grad.add_(g * 0.5 - p.grad * 0.5)
