"""ITTA: Improved Test-Time Adaptation for domain generalization (Chen et al., CVPR 2023).

Training learns a consistency loss ``||f_w(z' - z)||^2`` between clean features ``z`` and
MixStyle-augmented features ``z'``, with ``w`` fitted so that the loss's gradient on the
backbone aligns with the classification gradient. At test time, per-stage elementwise
maps (the adaptive parameters) are the only thing updated, by that learned loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, register
from dgkit.adaptation import TestOptimizerState
from dgkit.errors import check
from dgkit.networks import split_stages


class ElementwiseChain(nn.Module):
    """``depth`` elementwise affine maps with ReLU between them, initialised to identity
    (weights 1, biases 0): the identity on non-negative inputs."""

    def __init__(self, shape: tuple[int, ...], depth: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(depth, *shape))
        self.bias = nn.Parameter(torch.zeros(depth, *shape))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(len(self.weight)):
            if i:
                x = F.relu(x)
            x = x * self.weight[i] + self.bias[i]
        return x


def mixstyle(z: Tensor, alpha: float = 0.1, eps: float = 1e-6) -> Tensor:
    """MixStyle (Zhou et al., 2021): mix channel statistics with a shuffled batch."""
    mu = z.mean(dim=(2, 3), keepdim=True).detach()
    sig = (z.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    normed = (z - mu) / sig
    lam = torch.distributions.Beta(alpha, alpha).sample((len(z), 1, 1, 1)).to(z)
    perm = torch.randperm(len(z), device=z.device)
    return normed * (lam * sig + (1 - lam) * sig[perm]) + (lam * mu + (1 - lam) * mu[perm])


def _zscore(v: Tensor) -> Tensor:
    # Constant statistics, as the reference computes them with .item(). The floor keeps a
    # vanished consistency gradient (all zeros) from turning the penalty into NaN.
    return (v - v.mean().item()) / max(v.std().item(), 1e-12)


@register("itta")
class ITTA(TestOptimizerState, Algorithm):
    """Learned consistency loss in training; test-time updates of per-stage maps only."""

    manual_optimization = True
    differentiates_twice = True  # no torch.compile
    adapts_at_test = True
    needs_grad_at_test = True
    test_time_hyperparameters = ("test_lr", "test_loss_scale", "test_steps")

    def __init__(self, task: Task, backbone: Backbone, consistency_depth: int = 10,
                 adaptive_depth: int = 5, w_lr_scale: float = 0.1, alignment_weight: float = 0.1,
                 test_lr: float = 1e-4, test_loss_scale: float = 1e-6, test_steps: int = 1):
        """
        Args:
            consistency_depth: elementwise affine layers of ``f_w`` (reference: 10).
            adaptive_depth: elementwise affine maps per stage in the adaptive parameters
                (reference: 5).
            w_lr_scale: lr of ``f_w`` relative to the main optimizer's (reference: 0.1).
            alignment_weight: weight of the gradient-alignment penalty (reference: 0.1).
            test_lr: Adam lr of the adaptive parameters at test time (the reference's
                0.1 x lr; 1e-4 is 0.1 x dgkit's default lr).
            test_loss_scale: multiplier of the test loss (reference ``ada_lr``: 1e-6 on
                PACS/VLCS/OfficeHome/TerraInc, 0.1 on DomainNet). Adam is nearly
                scale-invariant, so it acts through Adam's eps.
            test_steps: updates per test batch (reference: 1).
        """
        super().__init__(task, backbone)
        check(test_steps >= 1, "model.algorithm.test_steps", f"{test_steps}", ">= 1")
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)
        self._stages = split_stages(self.featurizer)  # views on the featurizer, not new modules
        stem, stages, _ = self._stages
        with torch.no_grad():
            h = stem(torch.zeros(2, *task.input_shape))
            shapes = []
            for stage in stages:
                h = stage(h)
                shapes.append(tuple(h.shape[1:]))
        self.adaptive = nn.ModuleList(ElementwiseChain(s, adaptive_depth) for s in shapes)
        self.consistency = ElementwiseChain((self.featurizer.n_outputs,), consistency_depth)
        self.w_lr_scale, self.alignment_weight = w_lr_scale, alignment_weight
        self.test_lr, self.test_loss_scale, self.test_steps = test_lr, test_loss_scale, test_steps
        self._test_optimizer = self._new_test_optimizer()

    def _new_test_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.adaptive.parameters(), lr=self.test_lr)

    # --- networks -------------------------------------------------------------------
    def two_stream(self, x: Tensor, adapted: bool = False, augment: bool = True
                   ) -> tuple[Tensor, Tensor | None]:
        """Clean features and, if ``augment``, features with MixStyle after stage 1 or 2
        (chosen at random, as in the reference); adaptive maps after every stage."""
        stem, stages, head = self._stages
        aug_at = int(torch.randint(0, 2, ())) if augment else -1
        h, h_aug = stem(x), None
        for i, stage in enumerate(stages):
            h = stage(h)
            h_aug = stage(h_aug) if h_aug is not None else None
            if adapted:
                h = self.adaptive[i](h)
                h_aug = self.adaptive[i](h_aug) if h_aug is not None else None
            if i == aug_at:
                h_aug = mixstyle(h)
        dropout = self.featurizer.dropout
        z = dropout(head(h))
        return z, dropout(head(h_aug)) if h_aug is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def consistency_loss(self, z: Tensor, z_aug: Tensor) -> Tensor:
        return self.consistency(z_aug - z).pow(2).mean()

    # --- training -------------------------------------------------------------------
    def parameter_groups(self):
        return [*self.featurizer.parameters(), *self.classifier.parameters()]

    def extra_optimizers(self, make):
        return [make(self.consistency.parameters(), lr_scale=self.w_lr_scale)]

    def _losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        z, z_aug = self.two_stream(batch.x)
        cls = F.cross_entropy(self.classifier(z), batch.y) + F.cross_entropy(self.classifier(z_aug), batch.y)
        return self.consistency_loss(z, z_aug), cls

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        main, w_opt = opt.optimizers
        reg, cls = self._losses(batch)
        opt.zero_grad(main)
        opt.backward(reg + cls, inputs=list(self.parameter_groups()))
        opt.step(main)
        # Fit w so that the consistency gradient on the backbone points where the
        # classification gradient does (second fresh forward, as in the reference).
        reg, cls = self._losses(batch)
        params = [p for p in self.featurizer.parameters() if p.requires_grad]
        g_reg = torch.autograd.grad(reg, params, create_graph=True, allow_unused=True)
        g_cls = torch.autograd.grad(cls, params, allow_unused=True)
        pairs = [(r, c) for r, c in zip(g_reg, g_cls, strict=True) if r is not None and c is not None]
        flat_reg = torch.cat([r.flatten() for r, _ in pairs])
        flat_cls = torch.cat([c.flatten() for _, c in pairs]).detach()
        penalty = self.alignment_weight * (_zscore(flat_reg) - _zscore(flat_cls)).pow(2).mean()
        opt.zero_grad(w_opt)
        opt.backward(penalty, inputs=list(self.consistency.parameters()))
        opt.step(w_opt)
        return {"loss": cls.detach(), "consistency": reg.detach(), "alignment": penalty.detach()}

    # --- test time ------------------------------------------------------------------
    def adapt(self, x: Tensor) -> Tensor:
        for _ in range(self.test_steps):
            z, z_aug = self.two_stream(x, adapted=True)
            loss = self.consistency_loss(z, z_aug) * self.test_loss_scale
            self.test_time_step(loss, list(self.adaptive.parameters()))
        with torch.no_grad():
            z, _ = self.two_stream(x, adapted=True, augment=False)
            return self.classifier(z)
