"""An algorithm with a synchronization bug on purpose: it sets its gradients by hand from
``torch.autograd.grad`` and steps without averaging them across DDP ranks, so every rank
trains its own model (what ``RankAgreement`` must catch)."""

import torch
import torch.nn.functional as F

from dgkit import Batch, Optimization
from dgkit_algorithms.erm import ERM


class Unsynced(ERM):
    manual_optimization = True

    def training_update(self, batch: Batch, opt: Optimization) -> torch.Tensor:
        loss = F.cross_entropy(self(batch.x), batch.y)
        params = [p for p in self.parameters() if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g  # no opt.average_gradients(params): the bug
        opt.step()
        return loss.detach()
