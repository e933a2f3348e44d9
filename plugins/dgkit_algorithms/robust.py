"""Robustness over the source domains' risks, as DomainBed runs it: Group DRO (Sagawa et al.,
ICLR 2020) weighs the worst domains most; EQRM (Eastwood et al., NeurIPS 2022) minimizes a
quantile of the risks' distribution across domains; RDM (Nguyen et al., WACV 2024) matches
the worst domain's distribution of per-sample risks to all domains'."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.distributed import mean_over_ranks
from dgkit.search_space import SMALL_IMAGES, Hyperparameter, hp
from dgkit_algorithms.alignment import gaussian_kernel
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.invariance import AnnealedPenalties


@register("groupdro")
class GroupDRO(ERM):
    """Minimize the ``q``-weighted sum of the per-domain risks, where ``q`` follows the
    domains' losses by exponentiated gradient ascent (Algorithm 1 of the paper): the worst
    domain gets the most weight."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("eta", 0.01, lambda r: 10 ** r.uniform(-3, -1), "groupdro_eta")]

    def __init__(self, task: Task, backbone: Backbone, eta: float = 0.01):
        """
        Args:
            eta: step size of the domain weights' update (DomainBed's ``groupdro_eta``).
        """
        super().__init__(task, backbone)
        check(eta >= 0, "model.algorithm.eta", f"{eta} is negative", ">= 0")
        self.eta = eta
        self.register_buffer("q", torch.ones(task.num_domains))

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        # One forward per domain, as DomainBed (BatchNorm sees each domain on its own).
        losses = torch.stack([F.cross_entropy(self(x), y) for x, y in batch.per_domain()])
        with torch.no_grad():  # under DDP every rank weighs by the global batch's losses
            self.q.mul_(torch.exp(self.eta * mean_over_ranks(losses.detach())))
            self.q.div_(self.q.sum())
        return {"loss": losses @ self.q, "worst_domain_loss": losses.detach().max()}


def kde_quantile(risks: Tensor, q: Tensor, steps: int = 32) -> Tensor:
    """The ``q``-quantile of a Gaussian kernel density estimate of ``risks`` (bandwidth by
    the Gauss-optimal rule), by bisection on its CDF, as DomainBed's ``Nonparametric``: a
    differentiable function of the risks."""
    data, _ = torch.sort(risks)
    bandwidth = 1.06 * torch.std(data, unbiased=True) * len(data) ** -0.2
    bw = torch.ones(1, device=data.device) * bandwidth

    def cdf(x: Tensor) -> Tensor:
        kernels = Normal(data, torch.ones(len(data), device=x.device) * bw)
        return torch.mean(kernels.cdf(x.repeat(len(data), 1).T))

    bounds = [Normal(data[0], bw[0]).icdf(q), Normal(data[-1], bw[-1]).icdf(q)]
    k = 0.5 * sum(bounds)
    for _ in range(steps):
        bounds[int(cdf(k) > q)] = k
        next_k = 0.5 * sum(bounds)
        if next_k == k:
            break
        k = next_k
    return k


@register("eqrm")
class EQRM(ERM):
    """Empirical Quantile Risk Minimization (Algorithm 1): after an ERM burn-in, minimize the
    ``quantile`` of the per-domain risks' distribution (a kernel density estimate), which
    interpolates between the mean risk and the worst domain's as the quantile grows. The
    optimizer restarts at the switch, with its own learning rate."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("quantile", 0.75, lambda r: r.uniform(0.5, 0.99), "eqrm_quantile"),
                # DomainBed draws a fractional step, which its step count never equals (so
                # it never restarts Adam in random runs); here it is rounded up.
                hp("burnin_steps", 2500, lambda r: math.ceil(10 ** r.uniform(2.5, 3.5)), "eqrm_burnin_iters",
                   from_domainbed=math.ceil),
                hp("lr_after_burnin", 1e-6, lambda r: 10 ** r.uniform(-7, -5), "eqrm_lr")]

    def __init__(self, task: Task, backbone: Backbone, quantile: float = 0.75, burnin_steps: int = 2500,
                 lr_after_burnin: float | None = 1e-6):
        """
        Args:
            quantile: the risks' quantile minimized after burn-in (``eqrm_quantile``).
            burnin_steps: steps of ERM first (``eqrm_burnin_iters``).
            lr_after_burnin: the learning rate from then on (``eqrm_lr``; None: unchanged).
        """
        super().__init__(task, backbone)
        check(0 < quantile < 1, "model.algorithm.quantile", f"{quantile}", "in (0, 1)")
        self.burnin_steps, self.lr_after_burnin = burnin_steps, lr_after_burnin
        self.register_buffer("quantile", torch.tensor(quantile, dtype=torch.float64))

    def training_update(self, batch: Batch, opt: Optimization) -> Tensor:
        risks = torch.stack([F.cross_entropy(self(x), y) for x, y in batch.per_domain()])
        step = self.progress.step
        loss = risks.mean() if step < self.burnin_steps else kde_quantile(risks, self.quantile)
        if step == self.burnin_steps:
            opt.reset_state(lr=self.lr_after_burnin)
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
        return loss.detach()


RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000)  # DomainBed's RDM kernel bandwidths


@register("rdm")
class RDM(AnnealedPenalties):
    """Risk Distribution Matching (Nguyen et al., WACV 2024): after ``anneal_steps`` of ERM,
    also match the distribution of per-sample losses of the worst domain to that of all
    domains (MMD over the losses, ``lam``), and penalize both distributions' variances
    (``variance_weight``). The optimizer restarts at the switch with ``lr_after_anneal``.
    Every domain's minibatch must have the same size (DomainBed stacks them)."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        if dataset == "domainnet":
            lam, anneal = (0.5, lambda r: r.uniform(0.1, 1.0)), (2400, lambda r: int(r.uniform(1500, 3000)))
        else:
            lam = (5.0, (lambda r: r.uniform(1.0, 10.0)) if dataset in ("pacs", "terraincognita")
                   else (lambda r: r.uniform(0.1, 10.0)))
            anneal = (1500, lambda r: int(r.uniform(800, 2700)))
        no_variance = dataset in ("terraincognita", "officehome", "domainnet")
        variance = ((0.0, lambda r: r.choice([0.0])) if no_variance
                    else (0.004, lambda r: r.uniform(0.001, 0.007)))
        out = [hp("lam", *lam, "rdm_lambda"), hp("anneal_steps", *anneal, "rdm_penalty_anneal_iters"),
               hp("variance_weight", *variance),
               hp("lr_after_anneal", 1.5e-5, lambda r: r.uniform(8e-6, 2e-5), "rdm_lr")]
        if dataset in ("domainnet", "terraincognita"):  # DomainBed's RDM batch sizes on big images
            out.append(Hyperparameter("data.batch_size", 40, lambda r: int(r.uniform(30, 60)), "batch_size"))
        elif dataset not in SMALL_IMAGES:
            out.append(Hyperparameter("data.batch_size", 88, lambda r: int(r.uniform(70, 100)), "batch_size"))
        return out

    def __init__(self, task: Task, backbone: Backbone, lam: float = 5.0, anneal_steps: int = 1500,
                 variance_weight: float = 0.004, lr_after_anneal: float | None = 1.5e-5):
        """
        Args:
            lam: weight of the loss distributions' MMD after annealing (``rdm_lambda``).
            anneal_steps: steps of ERM first (``rdm_penalty_anneal_iters``).
            variance_weight: weight of the loss distributions' variances (``variance_weight``).
            lr_after_anneal: the learning rate from the switch on (``rdm_lr``; None: unchanged).
        """
        super().__init__(task, backbone)
        self.lam, self.anneal_steps = lam, anneal_steps
        self.variance_weight, self.restart_lr = variance_weight, lr_after_anneal

    def annealed_terms(self, batch: Batch) -> tuple[Tensor, dict[str, tuple[Tensor, float, float, int]]]:
        logits = self(batch.x)
        masks = list(batch.domain_masks().values())
        losses = torch.stack([F.cross_entropy(logits[m], batch.y[m]) for m in masks])
        per_sample = torch.squeeze(torch.cat(
            [F.cross_entropy(logits[m], batch.y[m], reduction="none").unsqueeze(0) for m in masks], dim=0))
        erm_loss = losses.mean()
        worst = torch.flatten(per_sample[torch.argmax(torch.clone(losses))])
        everyone = torch.flatten(per_sample)
        x, y = worst.unsqueeze(1), everyone.unsqueeze(1)
        matching = (gaussian_kernel(x, x, RDM_GAMMAS).mean() + gaussian_kernel(y, y, RDM_GAMMAS).mean()
                    - 2 * gaussian_kernel(x, y, RDM_GAMMAS).mean())
        variance = torch.var(everyone)
        variance += torch.var(worst)
        return erm_loss, {"matching": (matching, 0.0, self.lam, self.anneal_steps),
                          "variance": (variance, 0.0, self.variance_weight, self.anneal_steps)}
