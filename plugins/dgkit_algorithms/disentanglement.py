"""Disentangling domain features additively: ADRMX (Demirel et al., ICCV-W 2023), as
DomainBed implements it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, check, register
from dgkit.search_space import SMALL_IMAGES, Hyperparameter, hp
from dgkit_algorithms.adversarial import discriminator, discriminator_turn, player_group


def nonlinear_classifier(n_inputs: int, n_outputs: int) -> nn.Sequential:
    """DomainBed's nonlinear ``Classifier``: two hidden layers of half and a quarter width."""
    half, quarter = n_inputs // 2, n_inputs // 4
    return nn.Sequential(nn.Linear(n_inputs, half), nn.ReLU(), nn.Linear(half, quarter), nn.ReLU(),
                         nn.Linear(quarter, n_outputs))


def supcon_lambda(features: Tensor, labels: Tensor, domains: Tensor, lamda: float = 0.5,
                  temperature: float = 0.07) -> Tensor:
    """ADRMX's supervised contrastive loss: positives of the same class weigh ``lamda`` from
    the sample's own domain and ``1 - lamda`` from the others, negatives likewise."""
    normalized = F.normalize(features, p=2, dim=1)
    dots = normalized @ normalized.T / temperature
    loss, nans = 0, 0
    for i, (label, domain) in enumerate(zip(labels, domains, strict=True)):
        pos_in = torch.logical_and(labels == label, domains == domain)
        pos_in[i] = False
        pos_out = torch.logical_and(labels == label, domains != domain)
        neg_in = torch.logical_and(labels != label, domains == domain)
        neg_out = torch.logical_and(labels != label, domains != domain)
        positives = torch.cat((lamda * torch.exp(dots[pos_in][:, i]),
                               (1 - lamda) * torch.exp(dots[pos_out][:, i])))
        denominator = torch.sum(torch.cat((lamda * torch.exp(dots[neg_in][:, i]),
                                           (1 - lamda) * torch.exp(dots[neg_out][:, i]), positives))) + 1e-5
        count = int(pos_in.sum()) + int(pos_out.sum())
        loss_i = torch.sum(torch.log(positives / denominator + 1e-5)) / count
        if torch.isnan(loss_i):  # no positive for this sample
            nans += 1
            continue
        loss = loss - loss_i
    return loss / (len(features) - nans + 1)


@register("adrmx")
class ADRMX(Algorithm):
    """ADRMX (Demirel et al., ICCV-W 2023): a label featurizer minus a domain featurizer gives
    domain-invariant features; a discriminator tries to tell their domain (alternating turns,
    as DANN), classifiers on both and on the domain features, contrastive losses on the label
    and invariant features, and a remix loss: one sample's invariant features plus another
    same-class sample's domain features must still predict its class."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        small = dataset in SMALL_IMAGES
        lr = ((3e-3, lambda r: r.choice([5e-4, 1e-3, 2e-3, 3e-3])) if small
              else (3e-5, lambda r: r.choice([2e-5, 3e-5, 4e-5, 5e-5])))
        # DomainBed's ADRMX builds its optimizers without weight decay, whatever it draws
        return [Hyperparameter("model.optimizer.lr", *lr, "lr"),
                Hyperparameter("model.optimizer.weight_decay", 0.0, lambda r: 0.0, "weight_decay",
                               from_domainbed=lambda v: 0.0),
                hp("cnt_lambda", 1.0, lambda r: r.choice([1.0])),
                hp("dclf_lambda", 1.0, lambda r: r.choice([1.0])),
                hp("disc_lambda", 0.75, lambda r: r.choice([0.75])),
                hp("rmxd_lambda", 1.0, lambda r: r.choice([1.0])),
                hp("d_steps_per_g", 2, lambda r: r.choice([2]), "d_steps_per_g_step"),
                hp("beta1", 0.5, lambda r: r.choice([0.5])),
                hp("mlp_width", 256, lambda r: r.choice([256])),
                hp("mlp_depth", 9, lambda r: int(r.choice([8, 9, 10]))),
                hp("mlp_dropout", 0.0, lambda r: r.choice([0]))]

    def __init__(self, task: Task, backbone: Backbone, cnt_lambda: float = 1.0, dclf_lambda: float = 1.0,
                 disc_lambda: float = 0.75, rmxd_lambda: float = 1.0, d_steps_per_g: int = 2,
                 beta1: float | None = 0.5, mlp_width: int = 256, mlp_depth: int = 9,
                 mlp_dropout: float = 0.0, remix_within_class: bool = True):
        """
        Args:
            cnt_lambda: weight of the two contrastive losses.
            dclf_lambda: weight of the domain classifier's loss.
            disc_lambda: weight of the domain confusion term.
            rmxd_lambda: weight of the remix loss.
            d_steps_per_g: discriminator steps before each generator step (``d_steps_per_g_step``).
            beta1: Adam's first-moment decay, betas ``(beta1, 0.9)`` (None: the optimizer's own).
            mlp_width: width of the discriminator's hidden layers.
            mlp_depth: number of the discriminator's linear layers.
            mlp_dropout: dropout in the discriminator.
            remix_within_class: remix two samples of the same class, as the paper says.
                DomainBed's code indexes the whole batch with positions drawn within the
                class (so the pair is of any class): false reproduces that.
        """
        super().__init__(task, backbone)
        check(mlp_depth >= 2, "model.algorithm.mlp_depth", f"{mlp_depth}", ">= 2")
        self.cnt_lambda, self.dclf_lambda, self.disc_lambda = cnt_lambda, dclf_lambda, disc_lambda
        self.rmxd_lambda, self.d_steps_per_g = rmxd_lambda, d_steps_per_g
        self.remix_within_class = remix_within_class
        self.beta1 = beta1
        self.featurizer = self.build_featurizer()  # the label featurizer: what predicts
        self.featurizer_domain = self.build_featurizer()
        n = self.featurizer.n_outputs
        self.discriminator = discriminator(n, task.num_domains, mlp_width, mlp_depth, mlp_dropout)
        self.classifier = nonlinear_classifier(n, task.num_classes)
        self.classifier_final = nonlinear_classifier(n, task.num_classes)
        self.classifier_domain = nonlinear_classifier(n, task.num_domains)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))

    def parameter_groups(self) -> list[dict]:
        parts = (self.featurizer, self.featurizer_domain, self.classifier, self.classifier_final,
                 self.classifier_domain)
        return [player_group([p for m in parts for p in m.parameters()], self.beta1)]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        return [make([player_group(self.discriminator.parameters(), self.beta1)])]

    def remix_loss(self, combined: Tensor, domain: Tensor, y: Tensor) -> Tensor:
        loss = 0
        for c in range(self.task.num_classes):
            indices = torch.where(y == c)[0]
            perm = torch.randperm(indices.numel())
            if len(perm) < 2:
                continue
            first, second = (indices[perm[:2]] if self.remix_within_class else perm[:2])
            pred = self.classifier((combined[first] + domain[second]).view(1, -1))
            loss = loss + F.cross_entropy(pred.view(1, -1), y[first].view(-1))
        return loss / self.task.num_classes

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        feat_label, feat_domain = self.featurizer(batch.x), self.featurizer_domain(batch.x)
        combined = feat_label - feat_domain
        disc_loss = F.cross_entropy(self.discriminator(combined), batch.domain)
        disc_opt = opt.optimizers[1]
        if discriminator_turn(self.progress.step, self.d_steps_per_g):
            opt.zero_grad(disc_opt)
            opt.backward(disc_loss, inputs=list(self.discriminator.parameters()))
            opt.step(disc_opt)
            return {"loss": disc_loss.detach(), "disc_loss": disc_loss.detach()}
        domain_loss = F.cross_entropy(self.classifier_domain(feat_domain), batch.domain)
        int_loss = F.cross_entropy(self.classifier(feat_label), batch.y)
        cnt_int = supcon_lambda(feat_label, batch.y, batch.domain)
        final_loss = F.cross_entropy(self.classifier_final(combined), batch.y)
        cnt_final = supcon_lambda(combined, batch.y, batch.domain)
        remixed = self.remix_loss(combined, feat_domain, batch.y)
        gen_loss = (int_loss + final_loss + self.dclf_lambda * domain_loss + self.rmxd_lambda * remixed
                    + self.cnt_lambda * (cnt_int + cnt_final) + (self.disc_lambda * -disc_loss))
        opt.zero_grad(disc_opt)
        opt.zero_grad()
        opt.backward(gen_loss)
        opt.step()
        return {"loss": gen_loss.detach(), "nll": final_loss.detach(), "disc_loss": disc_loss.detach()}
