"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) on top of ERM."""

from __future__ import annotations

import contextlib

from torch import Tensor

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
