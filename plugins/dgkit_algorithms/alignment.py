"""Aligning feature distributions, as DomainBed implements them: CORAL (Sun and Saenko, 2016;
Deep CORAL) and MMD (Li et al., CVPR 2018) align every pair of source domains (the penalty is
the mean over pairs, added to the mean per-domain risk); CausIRL (Chevalley et al., 2022)
aligns two random halves of the pooled batch, cut at a random point in every domain."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Task, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM

GAMMAS = (0.001, 0.01, 0.1, 1, 10, 100, 1000)  # DomainBed's bandwidths of the Gaussian kernels


def coral_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared difference of the feature means plus that of the covariances."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = cent_x.t() @ cent_x / (len(x) - 1)
    cova_y = cent_y.t() @ cent_y / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def gaussian_kernel(x: Tensor, y: Tensor, gammas: tuple[float, ...] = GAMMAS) -> Tensor:
    """Sum of ``exp(-g ||x_i - y_j||^2)`` over the bandwidths. Written op for op as DomainBed's
    (in place, clamped): the kernel is so steep at g = 1000 that another order of the same
    operations rounds differently, and Adam turns that into lr-sized parameter differences."""
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    d = torch.addmm(y_norm.transpose(-2, -1), x, y.transpose(-2, -1), alpha=-2).add_(x_norm)
    d = d.clamp_min_(1e-30)
    k = torch.zeros_like(d)
    for g in gammas:
        k.add_(torch.exp(d.mul(-g)))
    return k


def mmd_distance(x: Tensor, y: Tensor) -> Tensor:
    """The (biased) squared MMD with the multi-bandwidth Gaussian kernel."""
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()


class FeatureAlignment(ERM):
    """Per-domain risk plus ``gamma`` times a distance between every pair of domains' features."""

    #: the distance between two domains' features, ``(x, y) -> scalar``
    distance: Callable[[Tensor, Tensor], Tensor]

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("gamma", 1.0, lambda r: 10 ** r.uniform(-1, 1), "mmd_gamma")]

    def __init__(self, task: Task, backbone: Backbone, gamma: float = 1.0):
        """
        Args:
            gamma: weight of the alignment penalty (DomainBed's ``mmd_gamma``).
        """
        super().__init__(task, backbone)
        self.gamma = gamma

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        domains = batch.per_domain()
        features = [self.featurizer(x) for x, _ in domains]  # one pass per domain, as DomainBed
        risk = torch.stack([F.cross_entropy(self.classifier(f), y)
                            for f, (_, y) in zip(features, domains, strict=True)]).mean()
        pairs = [(i, j) for i in range(len(features)) for j in range(i + 1, len(features))]
        penalty = (torch.stack([self.distance(features[i], features[j]) for i, j in pairs]).mean()
                   if pairs else risk.new_zeros(()))
        return {"loss": risk + self.gamma * penalty, "nll": risk.detach(), "penalty": penalty.detach()}


@register("coral")
class CORAL(FeatureAlignment):
    """Deep CORAL: match the means and covariances of the domains' features."""

    distance = staticmethod(coral_distance)


@register("mmd")
class MMD(FeatureAlignment):
    """MMD-AAE's alignment term, as DomainBed's MMD: match the domains' feature
    distributions under a sum of Gaussian kernels."""

    distance = staticmethod(mmd_distance)


class CausalInvariance(FeatureAlignment):
    """Per-domain risk plus ``gamma`` times the distance between the features before and
    after a random cut point in each domain's minibatch, pooled over domains: invariance to
    the style that varies within a domain (the paper's causal mechanism)."""

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        domains = batch.per_domain()
        features = [self.featurizer(x) for x, _ in domains]
        risk = sum(F.cross_entropy(self.classifier(f) + 1e-16, y)
                   for f, (_, y) in zip(features, domains, strict=True)) / len(domains)
        cuts = [int(np.random.randint(0, len(f))) for f in features]  # numpy's, as DomainBed
        first = torch.cat([f[:c] for f, c in zip(features, cuts, strict=True)])
        second = torch.cat([f[c:] for f, c in zip(features, cuts, strict=True)])
        penalty = (torch.nan_to_num(self.distance(first, second)) if len(first) > 1 and len(second) > 1
                   else risk.new_zeros(()))
        return {"loss": risk + self.gamma * penalty, "nll": risk.detach(), "penalty": penalty.detach()}


@register("causirl_coral")
class CausIRL_CORAL(CausalInvariance):
    """CausIRL with CORAL's distance (means and covariances)."""

    distance = staticmethod(coral_distance)


@register("causirl_mmd")
class CausIRL_MMD(CausalInvariance):
    """CausIRL with MMD's multi-bandwidth Gaussian-kernel distance."""

    distance = staticmethod(mmd_distance)
