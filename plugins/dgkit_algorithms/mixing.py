"""Inter-domain Mixup (Xu et al., AAAI 2020; Yan et al., 2020), as DomainBed's ``Mixup``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


def random_pairs(domains: list[tuple[Tensor, Tensor]]) -> list[tuple[tuple[Tensor, Tensor], ...]]:
    """Each domain's minibatch with the next one in a random cyclic order (trimmed to the
    shorter), as DomainBed pairs them."""
    perm = torch.randperm(len(domains)).tolist()
    pairs = []
    for i in range(len(domains)):
        (xi, yi), (xj, yj) = domains[perm[i]], domains[perm[(i + 1) % len(domains)]]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


@register("mixup")
class Mixup(ERM):
    """Train on convex combinations of two domains' images, with the loss mixed the same
    way: ``lam * CE(f(x), y_i) + (1 - lam) * CE(f(x), y_j)``, ``lam ~ Beta(alpha, alpha)``."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("alpha", 0.2, lambda r: 10 ** r.uniform(-1, 1), "mixup_alpha")]

    def __init__(self, task: Task, backbone: Backbone, alpha: float = 0.2):
        """
        Args:
            alpha: both parameters of the Beta distribution of the mixing weight
                (DomainBed's ``mixup_alpha``).
        """
        super().__init__(task, backbone)
        check(alpha > 0, "model.algorithm.alpha", f"{alpha}", "> 0")
        self.alpha = alpha

    def training_loss(self, batch: Batch) -> Tensor:
        domains = batch.per_domain()
        objective = batch.x.new_zeros(())
        for (xi, yi), (xj, yj) in random_pairs(domains):
            # numpy's generator, as DomainBed draws it (its state is in every checkpoint)
            lam = float(np.random.beta(self.alpha, self.alpha))
            logits = self(lam * xi + (1 - lam) * xj)
            objective = objective + lam * F.cross_entropy(logits, yi)
            objective = objective + (1 - lam) * F.cross_entropy(logits, yj)
        return objective / len(domains)
