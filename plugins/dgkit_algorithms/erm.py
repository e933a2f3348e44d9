"""Empirical risk minimization: pool the source domains and minimize cross-entropy."""

import torch.nn.functional as F
from torch import Tensor

from dgkit import Algorithm, Backbone, Batch, Task, register


@register("erm")
class ERM(Algorithm):
    """Empirical Risk Minimization (Vapnik, 1998), the baseline every DG paper reports."""

    def __init__(self, task: Task, backbone: Backbone):
        super().__init__(task, backbone)
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def training_loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self(batch.x), batch.y)
