"""TRM (Xu and Jaakkola, ICLR 2022, "Learning representations that support robust transfer of
predictors"), as DomainBed implements it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.distributed import mean_over_ranks
from dgkit.search_space import Hyperparameter, hp, log_uniform
from dgkit_algorithms.erm import ERM


def hessian_inverse_product(v: Tensor, classifier: nn.Linear, x: Tensor, y: Tensor, iterations: int = 10,
                            first_term_twice: bool = False) -> Tensor:
    """``H^-1 v`` of the classifier's loss w.r.t. its weight by a Neumann series,
    ``sum_k (I - H)^k v``, stopped early when it stops converging (DomainBed's ``neum``).
    ``first_term_twice``: DomainBed's, which updates ``v`` in place while also holding it as
    the estimate, so its first iteration gives ``2 (I - H) v`` instead of ``v + (I - H) v``."""
    v = v.detach().clone()
    estimate = v if first_term_twice else v.clone()
    for _ in range(iterations):
        loss = F.cross_entropy(classifier(x.detach()), y.detach())
        first = parameters_to_vector(torch.autograd.grad(loss, classifier.weight, retain_graph=True,
                                                         create_graph=True))
        hv = parameters_to_vector(torch.autograd.grad(first @ v, classifier.weight, create_graph=True))
        v = v.sub_(hv.detach()) if first_term_twice else (v - hv).detach()
        v = v.detach()
        estimate = (v + estimate).detach()
        if torch.max(abs(estimate)) > 10:
            break
    return estimate.detach()


@register("trm")
class TRM(ERM):
    """Transfer Risk Minimization: after ``iters`` steps of ERM, a classifier per source
    domain is fit on the (frozen) features by 30 SGD steps each step; the featurizer then
    also minimizes every domain's classifier's risk on the other domains, weighed by
    ``alpha`` (exponentiated gradient ascent, as Group DRO), minus ``cos_lambda`` times the
    alignment of that transfer gradient (through the inverse Hessian) with the classifier's
    own-domain gradient."""

    manual_optimization = True
    differentiates_twice = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("cos_lambda", 1e-4, log_uniform(-5, 0)),
                hp("iters", 200, lambda r: int(10 ** r.uniform(0, 4))),
                hp("groupdro_eta", 1e-2, log_uniform(-3, -1))]

    def __init__(self, task: Task, backbone: Backbone, cos_lambda: float = 1e-4, iters: int = 200,
                 groupdro_eta: float = 1e-2, inner_steps: int = 30, inner_lr: float = 0.1,
                 domainbed_quirks: bool = False):
        """
        Args:
            cos_lambda: weight of the gradient alignment term (``cos_lambda``).
            iters: steps of ERM first (``iters``).
            groupdro_eta: step size of the transfer weights ``alpha`` (``groupdro_eta``).
            inner_steps: SGD steps of the per-domain classifiers per step (DomainBed's 30).
            inner_lr: their learning rate (DomainBed's 0.1).
            domainbed_quirks: reproduce DomainBed's code where it departs from the paper
                through in-place updates: its inverse-Hessian series counts its first term
                twice, and the transfer losses' gradient uses the weights ``alpha`` after
                that step's update (it multiplies by an untracked view of them).
        """
        super().__init__(task, backbone)
        check(iters >= 0, "model.algorithm.iters", f"{iters} is negative", ">= 0")
        self.cos_lambda, self.iters, self.groupdro_eta = cos_lambda, iters, groupdro_eta
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.domainbed_quirks = domainbed_quirks
        n, d = self.featurizer.n_outputs, task.num_domains
        self.domain_classifiers = nn.ModuleList(nn.Linear(n, task.num_classes) for _ in range(d))
        self.register_buffer("alpha", torch.ones(d, d) - torch.eye(d))

    def parameter_groups(self) -> list[nn.Parameter]:
        return [*self.featurizer.parameters(), *self.classifier.parameters()]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        # plain SGD whatever the configured optimizer, as DomainBed's
        return [torch.optim.SGD(self.domain_classifiers.parameters(), lr=self.inner_lr)]

    def transfer_loss(self, features: list[Tensor], labels: list[Tensor], opt: Optimization) -> Tensor:
        inner = opt.optimizers[1]
        for _ in range(self.inner_steps):  # fit each domain's classifier on its frozen features
            loss_erm = sum(F.cross_entropy(c(f.detach()), y)
                           for c, f, y in zip(self.domain_classifiers, features, labels, strict=True))
            opt.zero_grad(inner)
            opt.backward(loss_erm, inputs=list(self.domain_classifiers.parameters()))
            opt.step(inner)
        swap = 0.0
        for q, classifier in enumerate(self.domain_classifiers):
            others = [i for i in range(len(features)) if i != q]
            grad_q = parameters_to_vector(torch.autograd.grad(
                F.cross_entropy(classifier(features[q]), labels[q]), classifier.weight, create_graph=True))
            weight = self.alpha.data if self.domainbed_quirks else self.alpha.clone()
            loss_p = [F.cross_entropy(classifier(features[i]), labels[i]) * weight[q, i]
                      if i in others else 0.0 for i in range(len(features))]
            loss_p_sum = sum(loss_p)
            grad_p = parameters_to_vector(torch.autograd.grad(loss_p_sum, classifier.weight,
                                                              create_graph=True)).detach()
            grad_p = hessian_inverse_product(grad_p, classifier, features[q], labels[q],
                                             first_term_twice=self.domainbed_quirks)
            swap += loss_p_sum - self.cos_lambda * (grad_p.detach() @ grad_q)
            with torch.no_grad():  # the worst transfers weigh more; all ranks alike
                for i in others:
                    self.alpha[q, i] *= (self.groupdro_eta * mean_over_ranks(loss_p[i].detach())).exp()
        return swap / len(features)

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        transfer = self.progress.step >= self.iters
        if transfer:
            self.alpha /= self.alpha.sum(1, keepdim=True)
        features = self.featurizer(batch.x)
        loss = F.cross_entropy(self.classifier(features), batch.y)
        total = loss
        if transfer:
            masks = list(batch.domain_masks().values())
            total = loss + self.transfer_loss([features[m] for m in masks], [batch.y[m] for m in masks], opt)
        opt.zero_grad()
        opt.backward(total, inputs=self.parameter_groups())
        opt.step()
        return {"loss": total.detach(), "nll": loss.detach()}
