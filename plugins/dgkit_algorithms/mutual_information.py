"""MIRO (Cha et al., ECCV 2022): mutual-information regularization with the pretrained
featurizer as the oracle, as kakaobrain/miro implements it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Backbone, Batch, Task, check, register
from dgkit.networks import split_stages
from dgkit_algorithms.erm import ERM


class VarianceEncoder(nn.Module):
    """A per-channel variance, ``softplus(b) + eps``, starting at ``init``: the diagonal
    Gaussian whose mean is the feature itself (MIRO's identity mean encoder)."""

    def __init__(self, channels: int, init: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        start = (torch.as_tensor(init - eps).exp() - 1.0).log()  # softplus^-1(init - eps)
        self.b = nn.Parameter(torch.full((1, channels, 1, 1), float(start)))

    def forward(self) -> Tensor:
        return F.softplus(self.b) + self.eps


@register("miro")
class MIRO(ERM):
    """Mutual-Information Regularization with Oracle: cross-entropy plus ``ld`` times a
    variational lower bound of the mutual information between the featurizer's
    intermediate features (after the stem and every stage) and those of a frozen copy of
    the featurizer as it starts (the pretrained "oracle"), with learned per-channel
    variances: ``sum_l mean((f_l - f*_l)^2 / var_l + log var_l) / 2``."""

    def __init__(self, task: Task, backbone: Backbone, ld: float = 0.1, lr_mult: float = 10.0):
        """
        Args:
            ld: weight of the regularizer (MIRO's ``ld``, lambda).
            lr_mult: the variance encoders' learning rate, in multiples of the configured one.
        """
        super().__init__(task, backbone)
        check(ld >= 0, "model.algorithm.ld", f"{ld} is negative", ">= 0")
        self.ld, self.lr_mult = ld, lr_mult
        self.oracle = copy.deepcopy(self.featurizer).requires_grad_(False).eval()
        self._parts, self._oracle_parts = split_stages(self.featurizer), split_stages(self.oracle)
        with torch.no_grad():
            _, taps = self.intermediate(self._oracle_parts, torch.zeros(2, *task.input_shape))
        self.var_encoders = nn.ModuleList(VarianceEncoder(t.shape[1]) for t in taps)

    def train(self, mode: bool = True) -> MIRO:
        super().train(mode)
        self.oracle.eval()  # the oracle's statistics are the pretrained ones
        return self

    def intermediate(self, parts, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The features and the outputs of the stem (when it is a layer) and every stage."""
        stem, stages, head = parts
        h = stem(x)
        taps = [] if isinstance(stem, nn.Identity) else [h]
        for stage in stages:
            h = stage(h)
            taps.append(h)
        return head(h), taps

    def parameter_groups(self) -> list[dict]:
        return [{"params": [*self.featurizer.parameters(), *self.classifier.parameters()]},
                {"params": list(self.var_encoders.parameters()), "lr_scale": self.lr_mult}]

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        features, taps = self.intermediate(self._parts, batch.x)
        loss = F.cross_entropy(self.classifier(self.featurizer.dropout(features)), batch.y)
        with torch.no_grad():
            _, oracle_taps = self.intermediate(self._oracle_parts, batch.x)
        reg = 0.0
        for f, target, encoder in zip(taps, oracle_taps, self.var_encoders, strict=True):
            var = encoder()
            reg += ((f - target).pow(2).div(var) + var.log()).mean() / 2.0
        return {"loss": loss + reg * self.ld, "nll": loss.detach(), "reg_loss": reg.detach()}
