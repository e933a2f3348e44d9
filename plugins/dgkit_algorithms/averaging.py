"""ERM++ (Teterwak et al., WACV 2025), as DomainBed implements it: linear probing first, then
full fine-tuning, predicting with a simple moving average of the weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.search_space import Hyperparameter, hp, log_uniform
from dgkit_algorithms.erm import ERM


@register("ermpp")
class ERMPlusPlus(ERM):
    """ERM++: the classifier alone trains (at ``linear_lr``) for the first ``linear_steps``
    steps, then the whole network; from step ``sma_start`` on, a simple moving average of
    the weights is kept (before it, the average follows the weights), its BatchNorm
    statistics refreshed on every training batch, and it is the model that predicts. The
    paper's learning-rate schedule (plateau on the average's validation loss) is the
    module's: ``--model.lr_scheduler ReduceLROnPlateau``."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("linear_lr", 5e-5, log_uniform(-5, -3.5))]

    def __init__(self, task: Task, backbone: Backbone, linear_lr: float = 5e-5, linear_steps: int = 500,
                 sma_start: int = 600, refresh_bn: bool = True):
        """
        Args:
            linear_lr: the classifier's learning rate while it trains alone (``linear_lr``).
            linear_steps: steps of linear probing first (``linear_steps``).
            sma_start: the step from which the weights are averaged (DomainBed's 600).
            refresh_bn: run the average on every training batch in training mode, so its
                BatchNorm statistics follow the data (DomainBed's ``not freeze_bn``).
        """
        super().__init__(task, backbone)
        check(linear_steps >= 0, "model.algorithm.linear_steps", f"{linear_steps} is negative", ">= 0")
        self.linear_lr, self.linear_steps = linear_lr, linear_steps
        self.sma_start, self.refresh_bn = sma_start, refresh_bn
        self.average = copy.deepcopy(nn.Sequential(self.featurizer, self.classifier)).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        self.average.eval()
        return self.average(x)

    def parameter_groups(self) -> list[nn.Parameter]:
        return [*self.featurizer.parameters(), *self.classifier.parameters()]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        return [make(self.classifier.parameters(), lr=self.linear_lr)]

    @torch.no_grad()
    def update_average(self) -> None:
        current = nn.Sequential(self.featurizer, self.classifier).state_dict()
        if self.progress.step + 1 >= self.sma_start:
            n = float(self.progress.step + 2 - self.sma_start)  # weights averaged so far, this one aside
            new = {k: (v.detach().clone() * n + current[k].detach().clone()) / (1.0 + n)
                   for k, v in self.average.state_dict().items() if "num_batches_tracked" not in k}
        else:
            new = {k: v.detach().clone() for k, v in current.items() if "num_batches_tracked" not in k}
        self.average.load_state_dict(new, strict=False)

    def training_update(self, batch: Batch, opt: Optimization) -> Tensor:
        optimizer = opt.optimizer if self.progress.step > self.linear_steps else opt.optimizers[1]
        loss = F.cross_entropy(self.classifier(self.featurizer(batch.x)), batch.y)
        opt.zero_grad(optimizer)
        opt.backward(loss, inputs=[p for group in optimizer.param_groups for p in group["params"]])
        opt.step(optimizer)
        self.update_average()
        if self.refresh_bn:
            self.average.train()
            with torch.no_grad():
                self.average(batch.x)
        return loss.detach()

    def representation(self):
        return self.average[0], self.average[1]
