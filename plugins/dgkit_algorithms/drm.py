"""DRM: Domain-specific Risk Minimization (Zhang et al., KDD 2023).

One classifier head per source domain plus a shared head on one featurizer. At test time
the prediction is steered by prediction entropy: per sample (the paper) or per batch (the
reference code), hard selection (``gamma < 0``) or entropy weighting ``H^-gamma``, and
optionally online retraining of the heads on confident pseudo-labels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Task, register
from dgkit.adaptation import TestOptimizerState
from dgkit.errors import check, check_choice

Steering = Literal["sample", "batch"]
PseudoLabel = Literal["drm", "own", "last", "uniform"]
DomainSelector = Literal["entropy", "nn", "cosine"]


def entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@register("drm")
class DRM(TestOptimizerState, Algorithm):
    """Heads ``0..D-1`` for the source domains, head ``D`` shared; each training sample
    trains its own domain's head and the shared head."""

    # Steering and the heads' online retraining act only on evaluation batches.
    test_time_hyperparameters = ("selection", "gamma", "beta", "alpha", "test_lr", "steps", "label",
                                 "legacy_double_softmax")

    def __init__(self, task: Task, backbone: Backbone, selection: Steering = "sample",
                 gamma: float = -1.0, beta: float = 1.1, alpha: float = 1.0, test_lr: float = 1e-3,
                 steps: int = 1, label: PseudoLabel = "drm",
                 legacy_double_softmax: bool = False,
                 domain_selector: DomainSelector = "entropy",
                 bank_rows: int = 1600):
        """
        Args:
            selection: steer per ``sample`` (the paper) or per ``batch`` (the reference
                code: the head of lowest batch-mean entropy).
            gamma: ``< 0``: the lowest-entropy head; ``>= 0``: weight the domain heads by
                ``entropy^-gamma`` (0: uniform average), renormalised over those heads.
            beta: confidence a pseudo-label needs for online retraining of the heads;
                above 1 turns retraining off (pure selection, the default).
            alpha: retraining lr multiplier of ``test_lr`` (the reference multiplies its
                training lr).
            test_lr: Adam lr of the heads during retraining, before ``alpha``.
            steps: retraining steps per test batch.
            label: pseudo-labels for retraining: ``drm`` (the steered prediction), ``own``
                (each head its own), ``last`` (the shared head's), ``uniform`` (the heads'
                mean).
            legacy_double_softmax: threshold the reference's softmax of the steered
                probabilities (at most e/(e+C-1)) instead of the probabilities.
            domain_selector: how a sample's head is chosen under hard selection:
                ``entropy`` (the paper: lowest prediction entropy over all heads);
                ``nn``: a domain classifier on the (detached) features, trained beside the
                heads; ``cosine``: the source domain whose feature prototype (mean of a
                FIFO bank of recent training features) is most cosine-similar.
            bank_rows: features each domain's bank keeps (``cosine``); the reference keeps
                ``prototype_K`` (50) batches, 1600 rows at 32 per domain.
        """
        super().__init__(task, backbone)
        check_choice(selection, Steering, "model.algorithm.selection")
        check_choice(label, PseudoLabel, "model.algorithm.label")
        check(steps >= 1, "model.algorithm.steps", f"{steps}", ">= 1")
        check_choice(domain_selector, DomainSelector, "model.algorithm.domain_selector")
        self.featurizer = self.build_featurizer()
        self.domain_selector = domain_selector
        width, n_domains = self.featurizer.n_outputs, task.num_domains
        self.discriminator = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                           nn.Linear(width, n_domains)) if domain_selector == "nn" else None
        check(bank_rows >= 1, "model.algorithm.bank_rows", f"{bank_rows}", ">= 1")
        self.bank_size = bank_rows
        self.register_buffer("bank", torch.zeros(n_domains, bank_rows, width))
        self.register_buffer("bank_filled", torch.zeros(n_domains, dtype=torch.long))
        self.heads = nn.ModuleList(self.build_classifier(self.featurizer.n_outputs)
                                   for _ in range(task.num_domains + 1))
        self.num_heads = task.num_domains + 1
        self.selection, self.gamma, self.beta = selection, gamma, beta
        self.alpha, self.test_lr, self.steps, self.label = alpha, test_lr, steps, label
        self.legacy_double_softmax = legacy_double_softmax
        self.adapts_at_test = self.needs_grad_at_test = beta <= 1.0
        self._test_optimizer = self._new_test_optimizer()

    def _new_test_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.heads.parameters(), lr=self.test_lr * self.alpha)

    def representation(self):
        return self.featurizer, self.heads[-1]  # the shared head, trained on every domain

    def classifiers(self) -> dict[str, nn.Module]:
        return {f"heads.{i}": head for i, head in enumerate(self.heads)}

    def head_logits(self, x: Tensor) -> Tensor:
        z = self.featurizer(x)
        return torch.stack([h(z) for h in self.heads], dim=1)

    def training_loss(self, batch: Batch) -> Tensor | dict[str, Tensor]:
        z = self.featurizer(batch.x)
        logits = torch.stack([h(z) for h in self.heads], dim=1)
        own = logits[torch.arange(len(batch.y)), batch.domain]
        loss = (F.cross_entropy(own, batch.y) + F.cross_entropy(logits[:, -1], batch.y)) / 2
        if self.domain_selector == "nn":  # on detached features: it never shapes them
            domain_loss = F.cross_entropy(self.discriminator(z.detach()), batch.domain)
            return {"loss": loss + domain_loss, "domain_loss": domain_loss.detach()}
        if self.domain_selector == "cosine":
            self._enqueue(z.detach(), batch.domain)
        return loss

    @torch.no_grad()
    def _enqueue(self, z: Tensor, domain: Tensor) -> None:
        """FIFO bank of the latest ``bank_rows`` features per source domain."""
        for d in range(self.task.num_domains):
            rows = z[domain == d][: self.bank_size]
            if len(rows):
                self.bank[d] = torch.cat([self.bank[d, len(rows):], rows])
                self.bank_filled[d] = min(self.bank_size, int(self.bank_filled[d]) + len(rows))

    def selected_domain(self, z: Tensor) -> Tensor:
        """The source domain a sample is routed to by ``nn`` or ``cosine``."""
        if self.domain_selector == "nn":
            return self.discriminator(z).argmax(1)
        means = torch.stack([self.bank[d, self.bank_size - max(1, int(n)):].mean(0)
                             for d, n in enumerate(self.bank_filled)])
        return (F.normalize(z, dim=1) @ F.normalize(means, dim=1).T).argmax(1)

    def steer(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Steered class probabilities ``[B, C]`` and the head each sample used (-1 when
        heads are weighted)."""
        probs = logits.softmax(-1)
        ent = entropy(probs)  # [B, H]
        if self.selection == "batch":
            head = ent.mean(0).argmin().expand(len(probs))
        elif self.gamma < 0:
            head = ent.argmin(1)
        else:
            domain = ent[:, :-1].clamp_min(1e-12).pow(-self.gamma)
            weights = domain / domain.sum(1, keepdim=True)
            return (weights.unsqueeze(2) * probs[:, :-1]).sum(1), torch.full_like(ent[:, 0], -1).long()
        return probs[torch.arange(len(probs)), head], head

    def forward(self, x: Tensor) -> Tensor:
        if self.domain_selector != "entropy":
            z = self.featurizer(x)
            head = self.selected_domain(z)
            logits = torch.stack([h(z) for h in self.heads], dim=1)
            return logits[torch.arange(len(x)), head]
        return self.steer(self.head_logits(x))[0].clamp_min(1e-12).log()

    def adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            z = self.featurizer(x)  # the featurizer stays as trained: only heads adapt
        prediction = None
        for _ in range(self.steps):
            logits = torch.stack([h(z) for h in self.heads], dim=1)
            probs, _ = self.steer(logits)
            prediction = probs.detach() if prediction is None else prediction
            conf_source = probs.softmax(1) if self.legacy_double_softmax else probs
            conf, target = conf_source.detach().max(1)
            keep = conf >= self.beta
            if not keep.any():
                break
            per_head = logits.detach().argmax(-1)  # [B, H]
            loss = logits.new_zeros(())
            for h in range(self.num_heads):
                if self.label == "own":
                    labels = per_head[:, h]
                elif self.label == "last":
                    labels = per_head[:, -1]
                elif self.label == "uniform":
                    labels = logits.detach().softmax(-1).mean(1).argmax(1)
                else:
                    labels = target
                loss = loss + F.cross_entropy(logits[keep, h], labels[keep])
            # Each rank retrains on its own confident samples (a rank may have none).
            self.test_time_step(loss, list(self.heads.parameters()), across_ranks=False)
        return prediction.clamp_min(1e-12).log()  # predicted before this batch's update
