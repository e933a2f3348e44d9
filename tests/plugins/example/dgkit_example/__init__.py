"""A third-party dgkit plugin: two algorithms, registered through the ``dgkit`` entry point."""

import torch.nn.functional as F
from torch import Tensor

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, hookimpl, register
from dgkit.plugins import registered_in


@register("smooth_erm")
class SmoothERM(Algorithm):
    """ERM with label smoothing: the automatic-optimization path of the contract."""

    def __init__(self, task: Task, backbone: Backbone, smoothing: float = 0.1):
        super().__init__(task, backbone)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def training_loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self(batch.x), batch.y, label_smoothing=self.smoothing)


@register("manual_erm")
class ManualERM(SmoothERM):
    """The same loss driven by hand: the manual-optimization path of the contract."""

    manual_optimization = True

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        loss = self.training_loss(batch)
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
        return {"loss": loss, "domains_seen": batch.domain.unique().numel() * loss.new_ones(())}


@hookimpl
def dgkit_algorithms():
    return registered_in(__name__)  # the aliases given by @register above
