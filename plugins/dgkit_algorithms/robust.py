"""Group DRO (Sagawa et al., ICLR 2020), over the source domains as DomainBed runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Backbone, Batch, Task, check, register
from dgkit.distributed import mean_over_ranks
from dgkit_algorithms.erm import ERM


@register("groupdro")
class GroupDRO(ERM):
    """Minimize the ``q``-weighted sum of the per-domain risks, where ``q`` follows the
    domains' losses by exponentiated gradient ascent (Algorithm 1 of the paper): the worst
    domain gets the most weight."""

    def __init__(self, task: Task, backbone: Backbone, eta: float = 0.01):
        """
        Args:
            eta: step size of the domain weights' update (DomainBed's ``groupdro_eta``).
        """
        super().__init__(task, backbone)
        check(eta >= 0, "model.algorithm.eta", f"{eta} is negative", ">= 0")
        self.eta = eta
        self.register_buffer("q", torch.ones(task.num_domains))

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        # One forward per domain, as DomainBed (BatchNorm sees each domain on its own).
        losses = torch.stack([F.cross_entropy(self(x), y) for x, y in batch.per_domain()])
        with torch.no_grad():  # under DDP every rank weighs by the global batch's losses
            self.q.mul_(torch.exp(self.eta * mean_over_ranks(losses.detach())))
            self.q.div_(self.q.sum())
        return {"loss": losses @ self.q, "worst_domain_loss": losses.detach().max()}
