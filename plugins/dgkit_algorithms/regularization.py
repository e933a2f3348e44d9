"""Regularizers of what the network relies on, as DomainBed implements them: RSC
(representation self-challenging, Huang et al., ECCV 2020) mutes the features the gradient
leans on most; SD (spectral decoupling, Pezeshki et al., NeurIPS 2021) penalizes the logits'
magnitude against gradient starvation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


@register("rsc")
class RSC(ERM):
    """Representation Self-Challenging: mute the top ``f_drop_factor`` of every sample's
    features by gradient of its true-class score (Eq. 1-4), but only for the samples whose
    confidence drops least under that muting (the batch percentage, Sec. 3.3), and train on
    what is left (Eq. 5)."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("f_drop_factor", 1 / 3, lambda r: r.uniform(0, 0.5), "rsc_f_drop_factor"),
                hp("b_drop_factor", 1 / 3, lambda r: r.uniform(0, 0.5), "rsc_b_drop_factor")]

    def __init__(self, task: Task, backbone: Backbone, f_drop_factor: float = 1 / 3,
                 b_drop_factor: float = 1 / 3):
        """
        Args:
            f_drop_factor: share of features muted per sample (``rsc_f_drop_factor``).
            b_drop_factor: share of samples muted (``rsc_b_drop_factor``).
        """
        super().__init__(task, backbone)
        for name, value in (("f_drop_factor", f_drop_factor), ("b_drop_factor", b_drop_factor)):
            check(0 <= value <= 1, f"model.algorithm.{name}", f"{value}", "in [0, 1]")
        self.drop_f, self.drop_b = (1 - f_drop_factor) * 100, (1 - b_drop_factor) * 100

    def training_loss(self, batch: Batch) -> Tensor:
        one_hot = F.one_hot(batch.y, self.task.num_classes)
        features = self.featurizer(batch.x)
        logits = self.classifier(features)
        grads = torch.autograd.grad((logits * one_hot).sum(), features)[0]
        # numpy's percentiles, as DomainBed computes them (float64 interpolation)
        percentiles = torch.Tensor(np.percentile(grads.cpu(), self.drop_f, axis=1))
        mask_f = grads.lt(percentiles.unsqueeze(1).to(grads.device)).float()
        muted = self.classifier(features * mask_f)
        changes = ((F.softmax(logits, dim=1) * one_hot).sum(1)
                   - (F.softmax(muted, dim=1) * one_hot).sum(1))
        mask_b = changes.lt(float(np.percentile(changes.detach().cpu(), self.drop_b))).float().view(-1, 1)
        mask = torch.logical_or(mask_f, mask_b).float()
        return F.cross_entropy(self.classifier(features * mask), batch.y)


@register("sd")
class SD(ERM):
    """Spectral Decoupling (Eq. 25 of the paper): cross-entropy plus ``reg`` times the mean
    squared logit."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("reg", 0.1, lambda r: 10 ** r.uniform(-5, -1), "sd_reg")]

    def __init__(self, task: Task, backbone: Backbone, reg: float = 0.1):
        """
        Args:
            reg: weight of the squared logits (``sd_reg``).
        """
        super().__init__(task, backbone)
        check(reg >= 0, "model.algorithm.reg", f"{reg} is negative", ">= 0")
        self.reg = reg

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        logits = self(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        penalty = (logits ** 2).mean()
        return {"loss": loss + self.reg * penalty, "nll": loss.detach(), "penalty": penalty.detach()}
