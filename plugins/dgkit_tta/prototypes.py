"""T3A: the classifier's weights replaced by prototypes of confident test features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.errors import ConfigError
from dgkit.plugins import register
from dgkit.tta import Source, TestTimeMethod, entropy, featurizer_and_classifier, predicts_with_its_classifier


@register("t3a")
class T3A(TestTimeMethod):
    """T3A (Iwasawa and Matsuo, NeurIPS 2021): every class keeps a support set of features,
    starting with its row of the linear classifier; each test feature joins the set of the
    class it is predicted as, and the prediction is the feature's dot product with the
    normalized mean of each class's normalized supports, over the ``filter_k`` supports of
    lowest entropy per class. Back-propagation free; the featurizer is unchanged.

    Args:
        filter_k: supports kept per class, lowest entropy first (-1: all). The reference
            drops the last support of every class for -1 (``[:-1]``); here -1 keeps all.
    """

    def __init__(self, filter_k: int = 100):
        if filter_k == 0 or filter_k < -1:
            raise ConfigError("model.tta.filter_k", f"{filter_k}", "a positive number, or -1 for all")
        self.filter_k = filter_k
        self._supports = self._labels = self._entropy = None

    def setup(self, model: Algorithm, source: Source) -> None:
        predicts_with_its_classifier(model, source, "t3a")

    def reset(self, model: Algorithm) -> None:
        _, classifier = featurizer_and_classifier(model, "t3a")
        with torch.no_grad():
            warmup = classifier.weight.detach().clone()
            logits = classifier(warmup)
        self._supports = warmup
        self._labels = logits.argmax(1)
        self._entropy = entropy(logits)

    @torch.no_grad()
    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        featurizer, classifier = featurizer_and_classifier(model, "t3a")
        z = featurizer(x)
        logits = classifier(z)
        self._supports = torch.cat([self._supports, z])
        self._labels = torch.cat([self._labels, logits.argmax(1)])
        self._entropy = torch.cat([self._entropy, entropy(logits)])
        self._filter(classifier.out_features)
        onehot = F.one_hot(self._labels, classifier.out_features).to(z.dtype)
        weights = F.normalize(self._supports, dim=1).T @ onehot
        return z @ F.normalize(weights, dim=0)

    def _filter(self, num_classes: int) -> None:
        if self.filter_k == -1:
            return
        kept = []
        for c in range(num_classes):
            members = (self._labels == c).nonzero().squeeze(1)
            order = self._entropy[members].argsort(stable=True)
            kept.append(members[order[: self.filter_k]])
        kept = torch.cat(kept)
        self._supports, self._labels = self._supports[kept], self._labels[kept]
        self._entropy = self._entropy[kept]
