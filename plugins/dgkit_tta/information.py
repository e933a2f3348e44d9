"""SHOT-IM: information maximization on the featurizer, the classifier kept as the source's."""

from __future__ import annotations

from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.plugins import register
from dgkit.tta import GradientMethod, Source, entropy, featurizer_and_classifier, predicts_with_its_classifier


@register("shot_im")
class SHOTIM(GradientMethod):
    """SHOT-IM (Liang et al., ICML 2020; the test-time form of T3A's code): every featurizer
    parameter is updated to make each prediction confident (mean entropy) and the batch's
    predictions diverse (the negative entropy of their mean), the classifier (the source
    hypothesis) fixed; BatchNorm keeps its source statistics. The prediction is the forward
    before the batch's (last) update.

    Args:
        lr: learning rate (T3A's: the training lr times 0.1, 1 or 10; Adam).
        steps: updates per test batch.
        optimizer: ``adam`` (T3A's) or ``sgd``.
        momentum: Adam's beta1 or SGD's momentum.
    """

    def __init__(self, lr: float = 1e-4, steps: int = 1, optimizer: str = "adam", momentum: float = 0.9):
        super().__init__(lr, steps, optimizer, momentum)

    def setup(self, model: Algorithm, source: Source) -> None:
        predicts_with_its_classifier(model, source, "shot_im")

    def parameters(self, model: Algorithm) -> list:
        featurizer, _ = featurizer_and_classifier(model, "shot_im")
        return [p for p in featurizer.parameters()]

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        featurizer, classifier = featurizer_and_classifier(model, "shot_im")
        for _ in range(self.steps):
            logits = classifier(featurizer(x))
            mean = logits.softmax(1).mean(0)
            self.step(entropy(logits).mean() + (mean * (mean + 1e-5).log()).sum())
        return logits.detach()
