"""Domain-adversarial training: DANN (Ganin et al., JMLR 2016) and its class-conditional
variant CDANN (Li et al., ECCV 2018), as DomainBed runs them: a discriminator learns to tell
the source domains apart from the features, and the featurizer learns to fool it, in
alternating turns (``d_steps_per_g`` discriminator steps, then one generator step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, check, register


def discriminator(n_inputs: int, n_outputs: int, width: int, depth: int, dropout: float) -> nn.Sequential:
    """DomainBed's ``MLP``: ``depth`` linear layers of ``width`` units, dropout and ReLU between."""
    layers: list[nn.Module] = [nn.Linear(n_inputs, width), nn.Dropout(dropout), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Dropout(dropout), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_outputs))


class DomainAdversarial(Algorithm):
    """The shared two-player game; subclasses say whether the discriminator also sees the
    class (``conditional``) and weighs samples to balance the classes."""

    manual_optimization = True
    conditional = False

    def __init__(self, task: Task, backbone: Backbone, lam: float = 1.0, d_steps_per_g: int = 1,
                 grad_penalty: float = 0.0, beta1: float | None = 0.5, lr_d: float | None = None,
                 weight_decay_d: float = 0.0, mlp_width: int = 256, mlp_depth: int = 3,
                 mlp_dropout: float = 0.0):
        """
        Args:
            lam: weight of the domain confusion term in the generator's loss (``lambda``).
            d_steps_per_g: discriminator steps before each generator step (``d_steps_per_g_step``).
            grad_penalty: weight of the squared gradient of the discriminator's loss w.r.t.
                its input (0: not computed).
            beta1: Adam's first-moment decay for both players, as DomainBed's (0.5, 0.9)
                betas; None keeps the configured optimizer's own (optimizers without betas
                ignore it).
            lr_d: the discriminator's learning rate (None: the configured lr).
            weight_decay_d: the discriminator's weight decay.
            mlp_width: width of the discriminator's hidden layers.
            mlp_depth: number of the discriminator's linear layers (>= 2).
            mlp_dropout: dropout between the discriminator's layers.
        """
        super().__init__(task, backbone)
        check(d_steps_per_g >= 0, "model.algorithm.d_steps_per_g", f"{d_steps_per_g} is negative", ">= 0")
        check(mlp_depth >= 2, "model.algorithm.mlp_depth", f"{mlp_depth}", ">= 2")
        self.lam, self.d_steps_per_g, self.grad_penalty = lam, d_steps_per_g, grad_penalty
        self.betas = None if beta1 is None else (beta1, 0.9)
        self.lr_d, self.weight_decay_d = lr_d, weight_decay_d
        self.differentiates_twice = grad_penalty > 0
        self.featurizer = self.build_featurizer()
        self.classifier = self.build_classifier(self.featurizer.n_outputs)
        self.discriminator = discriminator(self.featurizer.n_outputs, task.num_domains,
                                           mlp_width, mlp_depth, mlp_dropout)
        if self.conditional:
            self.class_embeddings = nn.Embedding(task.num_classes, self.featurizer.n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def _with_betas(self, group: dict) -> dict:
        return group if self.betas is None else {**group, "betas": self.betas}

    def parameter_groups(self) -> list[dict]:  # the generator: featurizer and classifier
        return [self._with_betas({"params": [*self.featurizer.parameters(), *self.classifier.parameters()]})]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        embeddings = list(self.class_embeddings.parameters()) if self.conditional else []
        return [*self.discriminator.parameters(), *embeddings]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        overrides = {"weight_decay": self.weight_decay_d}
        if self.lr_d is not None:
            overrides["lr"] = self.lr_d
        return [make([self._with_betas({"params": self.discriminator_parameters(), **overrides})])]

    def discriminator_loss(self, z: Tensor, batch: Batch) -> Tensor:
        disc_input = z + self.class_embeddings(batch.y) if self.conditional else z
        disc_out = self.discriminator(disc_input)
        if self.conditional:  # class-balanced: every class weighs the same in the loss
            counts = F.one_hot(batch.y, self.task.num_classes).sum(0)
            weights = 1.0 / (counts[batch.y] * counts.shape[0]).float()
            loss = (weights * F.cross_entropy(disc_out, batch.domain, reduction="none")).sum()
        else:
            loss = F.cross_entropy(disc_out, batch.domain)
        if self.grad_penalty > 0:
            grad = torch.autograd.grad(F.cross_entropy(disc_out, batch.domain, reduction="sum"),
                                       [disc_input], create_graph=True)[0]
            loss = loss + self.grad_penalty * grad.pow(2).sum(1).mean(0)
        return loss

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        disc_opt = opt.optimizers[1]
        z = self.featurizer(batch.x)
        disc_loss = self.discriminator_loss(z, batch)
        if (self.progress.step + 1) % (1 + self.d_steps_per_g) < self.d_steps_per_g:
            opt.zero_grad(disc_opt)  # the discriminator's turn: only its parameters learn
            opt.backward(disc_loss, inputs=self.discriminator_parameters())
            opt.step(disc_opt)
            return {"loss": disc_loss.detach(), "disc_loss": disc_loss.detach()}
        classifier_loss = F.cross_entropy(self.classifier(z), batch.y)
        gen_loss = classifier_loss + self.lam * -disc_loss
        opt.zero_grad(disc_opt)
        opt.zero_grad()
        opt.backward(gen_loss)
        opt.step()
        return {"loss": gen_loss.detach(), "nll": classifier_loss.detach(), "disc_loss": disc_loss.detach()}


@register("dann")
class DANN(DomainAdversarial):
    """Domain-Adversarial Neural Networks: features from which a discriminator cannot tell
    the source domains apart."""


@register("cdann")
class CDANN(DomainAdversarial):
    """Conditional DANN: the discriminator sees the class too (features plus a learned class
    embedding), with class-balanced weights, so the features' class-conditional
    distributions are aligned across domains."""

    conditional = True
