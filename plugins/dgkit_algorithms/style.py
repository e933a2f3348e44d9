"""Style-agnostic networks: SagNet (Nam et al., CVPR 2021), as DomainBed implements it on
the featurizer's output (its ResNet-specific split is left commented out there too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, register
from dgkit.search_space import Hyperparameter, hp


def randomize(x: Tensor, what: str = "style", eps: float = 1e-5) -> Tensor:
    """Mix every sample's style (mean and variance over its last dimension, or over the
    spatial positions of a feature map) with another's, or keep the style and take another
    sample's normalized content."""
    sizes = x.size()
    alpha = torch.rand(sizes[0], 1, device=x.device)
    if len(sizes) == 4:
        x = x.view(sizes[0], sizes[1], -1)
        alpha = alpha.unsqueeze(-1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    x = (x - mean) / (var + eps).sqrt()
    swap = torch.randperm(sizes[0])
    if what == "style":
        mean = alpha * mean + (1 - alpha) * mean[swap]
        var = alpha * var + (1 - alpha) * var[swap]
    else:
        x = x[swap].detach()
    return (x * (var + eps).sqrt() + mean).view(*sizes)


@register("sagnet")
class SagNet(Algorithm):
    """Style-Agnostic Network (Algorithm 1): a content classifier learns on features with
    randomized style, a style classifier on features with randomized content, and the
    featurizer learns to make the style classifier uncertain (weight ``w_adv``)."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("w_adv", 0.1, lambda r: 10 ** r.uniform(-2, 1), "sag_w_adv")]

    def __init__(self, task: Task, backbone: Backbone, w_adv: float = 0.1):
        """
        Args:
            w_adv: weight of the adversarial (style-confusion) loss (``sag_w_adv``).
        """
        super().__init__(task, backbone)
        self.w_adv = w_adv
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)  # content
        self.style_classifier = self.build_classifier(self.featurizer.n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def parameter_groups(self) -> list:  # the featurizer; each classifier has its own optimizer
        return list(self.featurizer.parameters())

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        return [make(self.classifier.parameters()), make(self.style_classifier.parameters())]

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        opt_f, opt_c, opt_s = opt.optimizers
        featurizer, content = list(self.featurizer.parameters()), list(self.classifier.parameters())
        style = list(self.style_classifier.parameters())
        opt.zero_grad(opt_f)
        opt.zero_grad(opt_c)
        loss_c = F.cross_entropy(self.classifier(randomize(self.featurizer(batch.x), "style")), batch.y)
        opt.backward(loss_c, inputs=featurizer + content)
        opt.step(opt_f)
        opt.step(opt_c)

        opt.zero_grad(opt_s)
        logits = self.style_classifier(randomize(self.featurizer(batch.x), "content"))
        loss_s = F.cross_entropy(logits, batch.y)
        opt.backward(loss_s, inputs=style)
        opt.step(opt_s)

        opt.zero_grad(opt_f)
        logits = self.style_classifier(randomize(self.featurizer(batch.x), "content"))
        loss_adv = self.w_adv * -F.log_softmax(logits, dim=1).mean(1).mean()
        opt.backward(loss_adv, inputs=featurizer)
        opt.step(opt_f)
        return {"loss": loss_c.detach(), "style_loss": loss_s.detach(), "adv_loss": loss_adv.detach()}
