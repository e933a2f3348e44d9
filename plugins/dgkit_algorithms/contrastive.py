"""Contrastive objectives across the source domains, as DomainBed implements them: SelfReg
(Kim et al., ICCV 2021) pulls together same-class samples' logits and projected features;
CAD and CondCAD (Ruan et al., ICLR 2022) are contrastive bottlenecks that remove the domain
(given the class, for CondCAD) from the representation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


@register("selfreg")
class SelfReg(ERM):
    """Self-supervised contrastive regularization: every sample's logits and projected
    features are pulled towards those of a random same-class sample (individualized) and of
    a Mixup of two (heterogeneous), scaled by the classification loss (at most 1)."""

    def __init__(self, task: Task, backbone: Backbone, train_projection: bool = True):
        """
        Args:
            train_projection: optimize the projection layers (``cdpl``). DomainBed builds its
                optimizer before them, so its SelfReg never trains them: false reproduces that.
        """
        super().__init__(task, backbone)
        n = self.featurizer.n_outputs
        hidden = n if n == 2048 else 2 * n
        self.cdpl = nn.Sequential(  # the class-specific domain perturbation layer
            nn.Linear(n, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, n), nn.BatchNorm1d(n)).requires_grad_(train_projection)

    def training_loss(self, batch: Batch) -> Tensor:
        lam = float(np.random.beta(0.5, 0.5))  # numpy's, as DomainBed
        y, order = torch.sort(batch.y)
        x = batch.x[order]
        starts = [i for i in range(1, len(y)) if y[i] != y[i - 1]]
        if len(y) and y[0] != 0:  # DomainBed's class boundaries count from class 0
            starts = [0, *starts]
        bounds = [*starts, len(y)]
        feat = self.featurizer(x)
        proj = self.cdpl(feat)
        output = self.classifier(feat)
        first, second, begin = [], [], 0
        for end in bounds:  # two random orders within every class
            first.append(torch.randperm(end - begin) + begin)
            second.append(torch.randperm(end - begin) + begin)
            begin = end
        first, second = torch.cat(first), torch.cat(second)
        output_2, feat_2 = output[first], proj[first]
        output_3 = lam * output_2 + (1 - lam) * output[second]
        feat_3 = lam * feat_2 + (1 - lam) * proj[second]
        ind_logit, hdl_logit = F.mse_loss(output, output_2), F.mse_loss(output, output_3)
        ind_feat, hdl_feat = 0.3 * F.mse_loss(feat, feat_2), 0.3 * F.mse_loss(feat, feat_3)
        cl_loss = F.cross_entropy(output, y)
        scale = min(cl_loss.item(), 1.0)
        return cl_loss + scale * (lam * (ind_logit + ind_feat) + (1 - lam) * (hdl_logit + hdl_feat))


def finite_mean(x: Tensor) -> Tensor:
    finite = torch.isfinite(x)
    count = finite.float().sum()
    if count == 0:
        return torch.tensor(0.0).to(x)
    return torch.where(finite, x, torch.tensor(0.0).to(x)).sum() / count


class ContrastiveBottleneck(Algorithm):
    """Cross-entropy plus ``lmbda`` times a SupCon-style bottleneck loss on the features."""

    conditional = False
    base_temperature = 0.07

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("lmbda", 0.1, lambda r: r.choice([1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2])),
                hp("temperature", 0.1, lambda r: r.choice([0.05, 0.1])),
                hp("normalized", False, lambda r: False, "is_normalized"),
                hp("project", False, lambda r: False, "is_project"),
                hp("flipped", True, lambda r: True, "is_flipped")]

    def __init__(self, task: Task, backbone: Backbone, lmbda: float = 0.1, temperature: float = 0.1,
                 normalized: bool = False, project: bool = False, flipped: bool = True):
        """
        Args:
            lmbda: weight of the bottleneck loss (``lmbda``).
            temperature: the contrastive logits' temperature (``temperature``).
            normalized: L2-normalize the features in the loss (``is_normalized``).
            project: compute the loss on a projection head's output (``is_project``;
                DomainBed's code for it does not run).
            flipped: minimize ``-log(1 - p)`` of same-domain pairs instead of maximizing
                ``log p``: the same optimum, more stable (``is_flipped``).
        """
        super().__init__(task, backbone)
        check(temperature > 0, "model.algorithm.temperature", f"{temperature}", "> 0")
        self.lmbda, self.temperature = lmbda, temperature
        self.normalized, self.flipped = normalized, flipped
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)
        n = self.featurizer.n_outputs
        self.project = (nn.Sequential(nn.Linear(n, n), nn.ReLU(inplace=True), nn.Linear(n, 128))
                        if project else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def bottleneck_loss(self, z: Tensor, y: Tensor, domain: Tensor) -> Tensor:
        n = len(z)
        y, domain = y.view(-1, 1), domain.view(-1, 1)
        mask_y = torch.eq(y, y.T)
        mask_d = torch.eq(domain, domain.T)
        mask_drop = ~torch.eye(n, dtype=torch.bool, device=z.device)  # not the sample itself
        mask_y &= mask_drop
        mask_y_n_d, mask_y_d = mask_y & ~mask_d, mask_y & mask_d
        mask_y, mask_drop = mask_y.float(), mask_drop.float()
        mask_y_n_d, mask_y_d = mask_y_n_d.float(), mask_y_d.float()
        if self.project is not None:
            z = self.project(z)
        if self.normalized:
            z = F.normalize(z, dim=1)
        logits = (z @ z.T) / self.temperature * mask_drop
        logits = logits - torch.max(logits, dim=1, keepdim=True)[0].detach()  # for stability
        ratio = self.temperature / self.base_temperature
        if not self.conditional:
            log_prob = logits - torch.logsumexp(logits + mask_drop.log(), dim=1, keepdim=True)
            valid = mask_y.sum(1) > 0
            log_prob, mask_d = log_prob[valid], mask_d[valid]
            if self.flipped:  # maximize the log probability of samples from other domains
                loss = -ratio * torch.logsumexp(log_prob + (~mask_d).float().log(), dim=1)
            else:
                loss = ratio * torch.logsumexp(log_prob + mask_d.float().log(), dim=1)
        else:
            valid = (mask_y_n_d if self.flipped else mask_y_d).sum(1) > 0
            mask_y, mask_y_d, mask_y_n_d = mask_y[valid], mask_y_d[valid], mask_y_n_d[valid]
            logits = logits[valid]
            log_prob_y = logits - torch.logsumexp(logits + mask_y.log(), dim=1, keepdim=True)
            if self.flipped:  # same class: maximize the log probability of other domains
                loss = -ratio * torch.logsumexp(log_prob_y + mask_y_n_d.log(), dim=1)
            else:
                loss = ratio * torch.logsumexp(log_prob_y + mask_y_d.log(), dim=1)
        return finite_mean(loss)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        z = self.featurizer(batch.x)
        bottleneck = self.bottleneck_loss(z, batch.y, batch.domain)
        classification = F.cross_entropy(self.classifier(z), batch.y)
        return {"loss": classification + self.lmbda * bottleneck, "nll": classification.detach(),
                "bottleneck": bottleneck.detach()}


@register("cad")
class CAD(ContrastiveBottleneck):
    """Contrastive Adversarial Domain bottleneck: minimize I(D; Z) (domain labels only)."""


@register("condcad")
class CondCAD(ContrastiveBottleneck):
    """Conditional CAD: minimize I(D; Z | Y), contrasting only samples of the same class."""

    conditional = True
