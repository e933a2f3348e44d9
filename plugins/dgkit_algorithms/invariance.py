"""Invariance penalties across the source domains: IRM (Arjovsky et al., 2019) and V-REx
(Krueger et al., ICML 2021), as DomainBed implements them: the penalty weight is 1 for the
first ``anneal_steps`` steps, then ``lam``, and the optimizer's state is reset at that step
(Adam "doesn't like the sharp jump in gradient magnitudes", DomainBed's note)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit_algorithms.erm import ERM


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1's squared gradient of the risk w.r.t. a dummy classifier scale at 1, estimated
    without bias as the product of the gradients on two halves (even and odd samples)."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    g1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), scale, create_graph=True)[0]
    g2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), scale, create_graph=True)[0]
    return g1 * g2


class AnnealedPenalty(ERM):
    """ERM plus ``weight * penalty``; the weight jumps from 1 to ``lam`` at ``anneal_steps``."""

    manual_optimization = True  # to reset the optimizer's state where the weight jumps

    def __init__(self, task: Task, backbone: Backbone, lam: float, anneal_steps: int):
        super().__init__(task, backbone)
        check(lam >= 0, "model.algorithm.lam", f"{lam} is negative", ">= 0")
        check(anneal_steps >= 0, "model.algorithm.anneal_steps", f"{anneal_steps} is negative", ">= 0")
        self.lam, self.anneal_steps = lam, anneal_steps

    def domain_risks(self, batch: Batch) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Logits, labels and cross-entropy of every source domain (one forward pass)."""
        logits = self(batch.x)
        parts = [(logits[batch.domain == d], batch.y[batch.domain == d])
                 for d in torch.unique(batch.domain, sorted=True).tolist()]
        return [p[0] for p in parts], [p[1] for p in parts], [F.cross_entropy(lg, y) for lg, y in parts]

    def penalty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        step = self.progress.step
        weight = self.lam if step >= self.anneal_steps else 1.0
        risk, penalty = self.penalty(batch)
        if step == self.anneal_steps:
            opt.reset_state()
        loss = risk + weight * penalty
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
        return {"loss": loss.detach(), "nll": risk.detach(), "penalty": penalty.detach()}


@register("irm")
class IRM(AnnealedPenalty):
    """Invariant Risk Minimization (IRMv1): per-domain risk plus the squared gradient of
    each domain's risk w.r.t. a dummy scale of the classifier, averaged over domains."""

    def __init__(self, task: Task, backbone: Backbone, lam: float = 100.0, anneal_steps: int = 500):
        """
        Args:
            lam: penalty weight after the annealing steps (DomainBed's ``irm_lambda``).
            anneal_steps: steps with penalty weight 1 first (``irm_penalty_anneal_iters``).
        """
        super().__init__(task, backbone, lam, anneal_steps)

    def penalty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        logits, labels, risks = self.domain_risks(batch)
        penalties = [irm_penalty(lg, y) for lg, y in zip(logits, labels, strict=True)]
        return torch.stack(risks).mean(), torch.stack(penalties).mean()


@register("vrex")
class VREx(AnnealedPenalty):
    """Risk Extrapolation (V-REx): the mean of the per-domain risks plus their variance."""

    def __init__(self, task: Task, backbone: Backbone, lam: float = 10.0, anneal_steps: int = 500):
        """
        Args:
            lam: weight of the risks' variance after the annealing steps (``vrex_lambda``).
            anneal_steps: steps with weight 1 first (``vrex_penalty_anneal_iters``).
        """
        super().__init__(task, backbone, lam, anneal_steps)

    def penalty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        _, _, risks = self.domain_risks(batch)
        risks = torch.stack(risks)
        mean = risks.mean()  # one node for both terms, as DomainBed: the same rounding
        return mean, (risks - mean).pow(2).mean()
