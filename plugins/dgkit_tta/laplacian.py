"""LAME: the predictions of a batch adjusted to agree between neighbouring features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.errors import ConfigError
from dgkit.plugins import register
from dgkit.tta import Source, TestTimeMethod, featurizer_and_classifier, predicts_with_its_classifier

AFFINITIES = ("knn", "rbf", "linear")


@register("lame")
class LAME(TestTimeMethod):
    """LAME (Boudiaf et al., CVPR 2022): the output probabilities of a test batch are
    replaced by the minimizer of a Laplacian-regularized maximum-likelihood objective,
    ``sum_i KL(y_i || p_i) - sum_ij w_ij y_i . y_j``, found by the paper's bound-optimization
    fixed point ``y <- softmax(log p + W y)``; ``W`` is the affinity of the batch's
    L2-normalized features. Nothing in the model changes.

    Args:
        affinity: ``knn`` (1 for each of a sample's ``knn`` nearest neighbours), ``rbf``
            (a Gaussian kernel whose width is the mean distance to the ``knn``-th
            neighbour) or ``linear`` (dot products).
        knn: neighbours of the kNN and RBF affinities (the paper: 5).
        max_steps: bound-optimization iterations at most (it stops when the energy settles).
    """

    def __init__(self, affinity: str = "knn", knn: int = 5, max_steps: int = 100):
        if affinity not in AFFINITIES:
            raise ConfigError("model.tta.affinity", f"{affinity!r}", ", ".join(AFFINITIES))
        if knn < 1:
            raise ConfigError("model.tta.knn", f"{knn}", ">= 1")
        self.affinity, self.knn, self.max_steps = affinity, knn, max_steps

    def setup(self, model: Algorithm, source: Source) -> None:
        predicts_with_its_classifier(model, source, "lame")

    @torch.no_grad()
    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        featurizer, classifier = featurizer_and_classifier(model, "lame")
        z = featurizer(x)
        unary = -torch.log(classifier(z).softmax(1) + 1e-10)
        kernel = self.kernel(F.normalize(z.float(), dim=1))
        return laplacian_optimization(unary.float(), kernel, self.max_steps).clamp_min(1e-20).log()

    def kernel(self, z: Tensor) -> Tensor:
        if self.affinity == "linear":
            return z @ z.T
        distances = torch.cdist(z, z)
        k = min(self.knn, len(z) - 1)
        if self.affinity == "knn":
            weights = torch.zeros_like(distances)
            if k > 0:  # the nearest is the sample itself
                weights.scatter_(1, distances.topk(k + 1, largest=False).indices[:, 1:], 1.0)
            return weights
        # the k-th smallest distance counts the sample itself, as the reference does
        sigma = distances.topk(min(self.knn, len(z)), largest=False).values[:, -1].mean()
        return torch.exp(-distances ** 2 / (2 * sigma ** 2 + 1e-12))


def laplacian_optimization(unary: Tensor, kernel: Tensor, max_steps: int = 100) -> Tensor:
    """The bound-optimization iterations of LAME: ``y <- softmax(-unary + kernel @ y)`` until
    the energy changes by at most 1e-8 of itself."""
    y = (-unary).softmax(1)
    previous = float("inf")
    for step in range(max_steps):
        pairwise = kernel @ y
        y = (-unary + pairwise).softmax(1)
        energy = float((unary * y - pairwise * y + y * y.clamp_min(1e-20).log()).sum())
        if step > 1 and abs(energy - previous) <= 1e-8 * abs(previous):
            break
        previous = energy
    return y
