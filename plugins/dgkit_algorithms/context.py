"""Predictions conditioned on the domain's marginal, as DomainBed implements them: MTL
(marginal transfer learning, Blanchard et al., JMLR 2021) feeds the classifier a domain
embedding beside the features; ARM-CML (adaptive risk minimization, Zhang et al., NeurIPS
2021) feeds the featurizer a context image computed from the whole batch."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


@register("mtl")
class MTL(Algorithm):
    """Marginal Transfer Learning: the classifier sees the features and the mean feature of
    the example's domain (a moving average per source domain in training, the evaluated
    batch's mean at test time, so each test batch should come from one domain)."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("ema", 0.99, lambda r: r.choice([0.5, 0.9, 0.99, 1.0]), "mtl_ema")]

    def __init__(self, task: Task, backbone: Backbone, ema: float = 0.99, noise_embedding: bool = False):
        """
        Args:
            ema: weight of the current batch in each domain's moving mean feature (``mtl_ema``).
            noise_embedding: replace the embedding with standard normal noise before the
                classifier, as DomainBed's code does (its ``.normal_()``); off, the classifier
                sees the embedding the paper describes.
        """
        super().__init__(task, backbone)
        check(0 <= ema <= 1, "model.algorithm.ema", f"{ema}", "in [0, 1]")
        self.ema, self.noise_embedding = ema, noise_embedding
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(2 * self.featurizer.n_outputs)
        self.register_buffer("embeddings", torch.zeros(task.num_domains, self.featurizer.n_outputs))

    def predict(self, x: Tensor, domain: int | None = None) -> Tensor:
        features = self.featurizer(x)
        embedding = features.mean(0)
        if domain is not None:
            embedding = self.ema * embedding + (1 - self.ema) * self.embeddings[domain]
            self.embeddings[domain] = embedding.clone().detach()
        embedding = embedding.view(1, -1).repeat(len(features), 1)
        if self.noise_embedding:
            embedding = embedding.normal_()
        return self.classifier(torch.cat((features, embedding), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)

    def training_loss(self, batch: Batch) -> Tensor:
        loss = 0
        for d, mask in batch.domain_masks().items():
            loss = loss + F.cross_entropy(self.predict(batch.x[mask], d), batch.y[mask])
        return loss

    def classifiers(self) -> dict[str, nn.Module]:
        return {}  # it takes the embedding too: no plain classifier to import or export

    def representation(self):
        return self.featurizer, None


class ContextNet(nn.Module):
    """ARM-CML's context network: three 5x5 convolutions to one channel, same size."""

    def __init__(self, channels: int):
        super().__init__()
        self.context_net = nn.Sequential(
            nn.Conv2d(channels, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 1, 5, padding=2))

    def forward(self, x: Tensor) -> Tensor:
        return self.context_net(x)


@register("arm")
class ARM(ERM):
    """Adaptive Risk Minimization (ARM-CML): a context network maps every image to one
    channel, averaged over the images of one domain (training) or of one support set
    (test), and the featurizer sees the image with that context as an extra channel."""

    def __init__(self, task: Task, backbone: Backbone, support_size: int | None = None,
                 train_context: bool = True):
        """
        Args:
            support_size: test images that share one context, in consecutive groups (when
                the evaluated batch divides into them; otherwise the whole batch, as
                DomainBed's); None: every evaluated batch is one support set. In training,
                each domain's minibatch is one.
            train_context: optimize the context network. DomainBed builds its optimizer
                before the context network, so its ARM never trains it: false reproduces that.
        """
        check(len(task.input_shape) == 3, "model.algorithm", f"ARM needs images, not inputs of "
              f"shape {task.input_shape}", "an image data set")
        check(support_size is None or support_size > 0, "model.algorithm.support_size",
              f"{support_size}", "> 0, or leave it out")
        channels = task.input_shape[0]
        super().__init__(dataclasses.replace(task, input_shape=(channels + 1, *task.input_shape[1:])),
                         backbone)
        self.task = task
        self.support_size = support_size
        self.context_net = ContextNet(channels).requires_grad_(train_context)

    def contextualize(self, x: Tensor, groups: int) -> Tensor:
        """``x`` with the mean context of each of ``groups`` consecutive equal groups."""
        context = self.context_net(x)
        context = context.reshape(groups, len(x) // groups, *context.shape[1:]).mean(dim=1)
        return torch.cat([x, torch.repeat_interleave(context, repeats=len(x) // groups, dim=0)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        size = self.support_size or len(x)
        groups = len(x) // size if len(x) % size == 0 else 1
        return self.classifier(self.featurizer(self.contextualize(x, groups)))

    def training_loss(self, batch: Batch) -> Tensor:
        sizes = torch.unique_consecutive(batch.domain, return_counts=True)[1]
        if len(set(sizes.tolist())) == 1:  # one context per domain minibatch, in one pass
            logits = self.classifier(self.featurizer(self.contextualize(batch.x, len(sizes))))
            return F.cross_entropy(logits, batch.y)
        logits = torch.cat([self.classifier(self.featurizer(self.contextualize(x, 1)))
                            for x in batch.x.split(sizes.tolist())])
        return F.cross_entropy(logits, batch.y)
