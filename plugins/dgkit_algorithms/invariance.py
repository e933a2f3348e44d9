"""Invariance penalties across the source domains: IRM (Arjovsky et al., 2019), V-REx
(Krueger et al., ICML 2021), IB-ERM and IB-IRM (Ahuja et al., NeurIPS 2021), as DomainBed
implements them: each penalty's weight switches at its annealing step, and the optimizer's
state is reset there (Adam "doesn't like the sharp jump in gradient magnitudes", DomainBed's
note). :class:`AnnealedPenalties` is the mechanism; Fishr and RDM use it too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1's squared gradient of the risk w.r.t. a dummy classifier scale at 1, estimated
    without bias as the product of the gradients on two halves (even and odd samples)."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    g1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), scale, create_graph=True)[0]
    g2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), scale, create_graph=True)[0]
    return g1 * g2


class AnnealedPenalties(ERM):
    """The risk plus penalties whose weights switch at their own annealing steps; at every
    switch the optimizer restarts (at ``restart_lr``, if set), as DomainBed's penalty methods
    do. Subclasses give the risk and the penalties."""

    manual_optimization = True  # to reset the optimizer's state where a weight jumps
    #: the learning rate from a restart on (None: unchanged)
    restart_lr: float | None = None

    def annealed_terms(self, batch: Batch) -> tuple[Tensor, dict[str, tuple[Tensor, float, float, int]]]:
        """The risk, and ``name -> (penalty, weight before, weight after, annealing step)``
        in the loss's order."""
        raise NotImplementedError

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        step = self.progress.step
        risk, terms = self.annealed_terms(batch)
        loss = risk
        for penalty, before, after, anneal in terms.values():
            loss = loss + (after if step >= anneal else before) * penalty
        if any(step == anneal for *_, anneal in terms.values()):
            opt.reset_state(lr=self.restart_lr)
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
        return {"loss": loss.detach(), "nll": risk.detach(), **{k: v[0].detach() for k, v in terms.items()}}


class AnnealedPenalty(AnnealedPenalties):
    """The risk plus ``weight * penalty``; the weight jumps from ``weight_before`` to ``lam``
    at ``anneal_steps``."""

    #: the penalty's weight before annealing (IRM, V-REx: 1; Fishr: 0)
    weight_before = 1.0

    def __init__(self, task: Task, backbone: Backbone, lam: float, anneal_steps: int):
        super().__init__(task, backbone)
        check(lam >= 0, "model.algorithm.lam", f"{lam} is negative", ">= 0")
        check(anneal_steps >= 0, "model.algorithm.anneal_steps", f"{anneal_steps} is negative", ">= 0")
        self.lam, self.anneal_steps = lam, anneal_steps

    def domain_risks(self, batch: Batch) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Logits, labels and cross-entropy of every source domain (one forward pass)."""
        logits = self(batch.x)
        parts = [(logits[m], batch.y[m]) for m in batch.domain_masks().values()]
        return [p[0] for p in parts], [p[1] for p in parts], [F.cross_entropy(lg, y) for lg, y in parts]

    def penalty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The risk and the penalty."""
        raise NotImplementedError

    def annealed_terms(self, batch: Batch) -> tuple[Tensor, dict[str, tuple[Tensor, float, float, int]]]:
        risk, penalty = self.penalty(batch)
        return risk, {"penalty": (penalty, self.weight_before, self.lam, self.anneal_steps)}


@register("irm")
class IRM(AnnealedPenalty):
    """Invariant Risk Minimization (IRMv1): per-domain risk plus the squared gradient of
    each domain's risk w.r.t. a dummy scale of the classifier, averaged over domains."""

    differentiates_twice = True  # the penalty's gradient is a second derivative

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("lam", 100.0, lambda r: 10 ** r.uniform(-1, 5), "irm_lambda"),
                hp("anneal_steps", 500, lambda r: int(10 ** r.uniform(0, 4)), "irm_penalty_anneal_iters")]

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

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("lam", 10.0, lambda r: 10 ** r.uniform(-1, 5), "vrex_lambda"),
                hp("anneal_steps", 500, lambda r: int(10 ** r.uniform(0, 4)), "vrex_penalty_anneal_iters")]

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


class InformationBottleneck(AnnealedPenalties):
    """Per-domain risk plus the features' variance in each domain, averaged (the information
    bottleneck of Ahuja et al., NeurIPS 2021), weighed 0 until its annealing step."""

    def __init__(self, task: Task, backbone: Backbone, ib_lambda: float, ib_anneal_steps: int):
        super().__init__(task, backbone)
        check(ib_lambda >= 0, "model.algorithm.ib_lambda", f"{ib_lambda} is negative", ">= 0")
        self.ib_lambda, self.ib_anneal_steps = ib_lambda, ib_anneal_steps

    def penalties(self, features: Tensor, logits: Tensor, y: Tensor, masks: list[Tensor]
                  ) -> dict[str, tuple[Tensor, float, float, int]]:
        """The penalties, as :meth:`AnnealedPenalties.annealed_terms` gives them."""
        ib = sum(features[m].var(dim=0).mean() for m in masks) / len(masks)
        return {"ib_penalty": (ib, 0.0, self.ib_lambda, self.ib_anneal_steps)}

    def annealed_terms(self, batch: Batch) -> tuple[Tensor, dict[str, tuple[Tensor, float, float, int]]]:
        features = self.featurizer(batch.x)
        logits = self.classifier(features)
        masks = list(batch.domain_masks().values())
        nll = sum(F.cross_entropy(logits[m], batch.y[m]) for m in masks) / len(masks)
        return nll, self.penalties(features, logits, batch.y, masks)


@register("ib_erm")
class IB_ERM(InformationBottleneck):
    """IB-ERM: ERM plus the information bottleneck on the features."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("ib_lambda", 100.0, lambda r: 10 ** r.uniform(-1, 5)),
                hp("ib_anneal_steps", 500, lambda r: int(10 ** r.uniform(0, 4)), "ib_penalty_anneal_iters")]

    def __init__(self, task: Task, backbone: Backbone, ib_lambda: float = 100.0, ib_anneal_steps: int = 500):
        """
        Args:
            ib_lambda: weight of the features' variance after annealing (``ib_lambda``).
            ib_anneal_steps: steps without it first (``ib_penalty_anneal_iters``).
        """
        super().__init__(task, backbone, ib_lambda, ib_anneal_steps)


@register("ib_irm")
class IB_IRM(InformationBottleneck):
    """IB-IRM: IRMv1 plus the information bottleneck, each with its own annealing."""

    differentiates_twice = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("irm_lambda", 100.0, lambda r: 10 ** r.uniform(-1, 5)),
                hp("irm_anneal_steps", 500, lambda r: int(10 ** r.uniform(0, 4)), "irm_penalty_anneal_iters"),
                hp("ib_lambda", 100.0, lambda r: 10 ** r.uniform(-1, 5)),
                hp("ib_anneal_steps", 500, lambda r: int(10 ** r.uniform(0, 4)), "ib_penalty_anneal_iters")]

    def __init__(self, task: Task, backbone: Backbone, irm_lambda: float = 100.0, irm_anneal_steps: int = 500,
                 ib_lambda: float = 100.0, ib_anneal_steps: int = 500):
        """
        Args:
            irm_lambda: IRM penalty weight after its annealing (1 before; ``irm_lambda``).
            irm_anneal_steps: steps with IRM weight 1 (``irm_penalty_anneal_iters``).
            ib_lambda: weight of the features' variance after annealing (``ib_lambda``).
            ib_anneal_steps: steps without it first (``ib_penalty_anneal_iters``).
        """
        super().__init__(task, backbone, ib_lambda, ib_anneal_steps)
        self.irm_lambda, self.irm_anneal_steps = irm_lambda, irm_anneal_steps

    def penalties(self, features: Tensor, logits: Tensor, y: Tensor, masks: list[Tensor]
                  ) -> dict[str, tuple[Tensor, float, float, int]]:
        irm = sum(irm_penalty(logits[m], y[m]) for m in masks) / len(masks)
        return {"irm_penalty": (irm, 1.0, self.irm_lambda, self.irm_anneal_steps),
                **super().penalties(features, logits, y, masks)}
