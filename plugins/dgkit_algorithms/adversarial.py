"""Adversarial training, as DomainBed runs it: DANN (Ganin et al., JMLR 2016) and its
class-conditional variant CDANN (Li et al., ECCV 2018), where a discriminator learns to tell
the source domains apart from the features and the featurizer learns to fool it, in
alternating turns; URM (Krishnamachari et al., TMLR 2024), whose discriminator tells features
from uniform noise; and Transfer (Zhang et al., NeurIPS 2021), whose adversary is a
classifier near the model's that maximizes the gap between the domains' risks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Optimization, Task, check, register
from dgkit.errors import check_choice
from dgkit.search_space import SMALL_IMAGES, Hyperparameter, hp, log_uniform
from dgkit_algorithms.erm import ERM


def discriminator(n_inputs: int, n_outputs: int, width: int, depth: int, dropout: float) -> nn.Sequential:
    """DomainBed's ``MLP``: ``depth`` linear layers of ``width`` units, dropout and ReLU between."""
    layers: list[nn.Module] = [nn.Linear(n_inputs, width), nn.Dropout(dropout), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Dropout(dropout), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_outputs))


def player_group(params, beta1: float | None, **settings) -> dict:
    """A parameter group for one player of the game, with DomainBed's Adam betas
    ``(beta1, 0.9)`` unless ``beta1`` is None (the configured optimizer's own)."""
    group = {"params": list(params), **settings}
    return group if beta1 is None else {**group, "betas": (beta1, 0.9)}


def discriminator_turn(step: int, d_steps_per_g: int) -> bool:
    """Whether step ``step`` (from 0) is the discriminator's: DomainBed counts updates from 1
    and gives the generator every ``1 + d_steps_per_g``-th."""
    return (step + 1) % (1 + d_steps_per_g) < d_steps_per_g


class DomainAdversarial(Algorithm):
    """The shared two-player game; subclasses say whether the discriminator also sees the
    class (``conditional``) and weighs samples to balance the classes."""

    manual_optimization = True
    conditional = False

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        small = dataset in SMALL_IMAGES
        lr = log_uniform(-4.5, -2.5) if small else log_uniform(-5, -3.5)
        return [hp("lam", 1.0, log_uniform(-2, 2), "lambda"),
                hp("weight_decay_d", 0.0, log_uniform(-6, -2)),
                hp("d_steps_per_g", 1, lambda r: int(2 ** r.uniform(0, 3)), "d_steps_per_g_step"),
                hp("grad_penalty", 0.0, log_uniform(-2, 1)),
                hp("beta1", 0.5, lambda r: r.choice([0.0, 0.5])),
                hp("mlp_width", 256, lambda r: int(2 ** r.uniform(6, 10))),
                hp("mlp_depth", 3, lambda r: int(r.choice([3, 4, 5]))),
                hp("mlp_dropout", 0.0, lambda r: r.choice([0.0, 0.1, 0.5])),
                hp("lr_d", 1e-3 if small else 5e-5, lr),
                # the generator's lr and weight decay replace the shared ones
                Hyperparameter("model.optimizer.lr", 1e-3 if small else 5e-5, lr, "lr_g"),
                Hyperparameter("model.optimizer.weight_decay", 0.0,
                               (lambda r: 0.0) if small else log_uniform(-6, -2), "weight_decay_g")]

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
        self.beta1 = beta1
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

    def parameter_groups(self) -> list[dict]:  # the generator: featurizer and classifier
        return [player_group([*self.featurizer.parameters(), *self.classifier.parameters()], self.beta1)]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        embeddings = list(self.class_embeddings.parameters()) if self.conditional else []
        return [*self.discriminator.parameters(), *embeddings]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        overrides = {"weight_decay": self.weight_decay_d}
        if self.lr_d is not None:
            overrides["lr"] = self.lr_d
        return [make([player_group(self.discriminator_parameters(), self.beta1, **overrides)])]

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
        if discriminator_turn(self.progress.step, self.d_steps_per_g):
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


OUTPUT_RANGES = {"tanh": (nn.Tanh, -1.0, 1.0), "relu": (nn.ReLU, 0.0, 1.0), "sigmoid": (nn.Sigmoid, 0.0, 1.0)}


@register("urm")
class URM(ERM):
    """Uniform Risk Minimization: the features (squashed by ``generator_output``) are
    trained to look uniformly distributed on its range to a discriminator that learns,
    after every step, to tell them from uniform noise."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        lr = log_uniform(-5.5, -3.5) if dataset in SMALL_IMAGES else log_uniform(-6, -4.5)
        return [hp("adv_lambda", 0.1, lambda r: float(r.uniform(0, 0.2)), "urm_adv_lambda"),
                hp("label_smoothing", 0.0, lambda r: float(r.uniform(0, 0)),
                   "urm_discriminator_label_smoothing"),
                hp("hidden_layers", 1, lambda r: int(r.choice([1, 2, 3])), "urm_discriminator_hidden_layers"),
                hp("generator_output", "tanh", lambda r: str(r.choice(["tanh", "relu"])),
                   "urm_generator_output"),
                hp("discriminator_lr", 1e-3 if dataset in SMALL_IMAGES else 5e-5, lr, "urm_discriminator_lr")]

    def __init__(self, task: Task, backbone: Backbone, adv_lambda: float = 0.1,
                 discriminator_lr: float | None = None, label_smoothing: float = 0.0, hidden_layers: int = 1,
                 generator_output: Literal["tanh", "relu", "sigmoid"] = "tanh"):
        """
        Args:
            adv_lambda: weight of the adversarial terms (``urm_adv_lambda``).
            discriminator_lr: the discriminator's learning rate (``urm_discriminator_lr``;
                None: the configured lr).
            label_smoothing: width of the random soft labels of the discriminator
                (``urm_discriminator_label_smoothing``; 0: hard labels).
            hidden_layers: the discriminator's hidden layers of 100 units
                (``urm_discriminator_hidden_layers``).
            generator_output: the activation on the features, whose range the noise fills
                (``urm_generator_output``).
        """
        super().__init__(task, backbone)
        check_choice(generator_output, Literal["tanh", "relu", "sigmoid"], "model.algorithm.generator_output")
        check(0 <= label_smoothing < 1, "model.algorithm.label_smoothing", f"{label_smoothing}", "in [0, 1)")
        self.adv_lambda, self.discriminator_lr = adv_lambda, discriminator_lr
        self.label_smoothing = label_smoothing
        activation, self.low, self.high = OUTPUT_RANGES[generator_output]
        self.activation = activation()
        layers: list[nn.Module] = [nn.Linear(self.featurizer.n_outputs, 100), nn.LeakyReLU()]
        for _ in range(hidden_layers):
            layers += [nn.Linear(100, 100), nn.LeakyReLU()]
        self.discriminator = nn.Sequential(*layers, nn.Linear(100, 1))

    def features(self, x: Tensor) -> Tensor:
        return self.activation(self.featurizer(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def parameter_groups(self) -> list[nn.Parameter]:
        return [*self.featurizer.parameters(), *self.classifier.parameters()]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        overrides = {} if self.discriminator_lr is None else {"lr": self.discriminator_lr}
        return [make(self.discriminator.parameters(), **overrides)]

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        feats = self.features(batch.x)
        ce = F.cross_entropy(self.classifier(feats), batch.y, reduction="none").mean()
        ones = torch.ones(len(feats), dtype=feats.dtype, device=feats.device)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(feats).squeeze(1), ones)
        loss = ce + self.adv_lambda * g_loss
        opt.zero_grad()
        opt.backward(loss, inputs=self.parameter_groups())
        opt.step()
        disc_opt, feats = opt.optimizers[1], feats.detach()  # the encoder sits out this step
        uniform = torch.rand(feats.size(), dtype=feats.dtype, device=feats.device)
        noise = (self.high - self.low) * uniform + self.low
        noise_logits, feats_logits = self.discriminator(noise), self.discriminator(feats)
        true_y, fake_y = ones, torch.zeros_like(ones)  # noise is "true", features "fake"
        if self.label_smoothing:  # random soft labels within the smoothing width
            s = self.label_smoothing
            true_y = (1.0 - (1 - s)) * torch.rand(len(noise), device=noise.device) + (1 - s)
            fake_y = (s - 0) * torch.rand(len(feats), device=feats.device) + 0
        d_loss = (1 * F.binary_cross_entropy_with_logits(noise_logits.squeeze(1), true_y)
                  + self.adv_lambda * F.binary_cross_entropy_with_logits(feats_logits.squeeze(1), fake_y))
        opt.zero_grad(disc_opt)
        opt.backward(d_loss, inputs=list(self.discriminator.parameters()))
        opt.step(disc_opt)
        return {"loss": loss.detach(), "nll": ce.detach(), "disc_loss": d_loss.detach()}

    def representation(self):
        return self.featurizer, None  # the classifier reads the squashed features


@register("transfer")
class Transfer(ERM):
    """Transfer (Algorithm 1 of "Quantifying and improving transferability in domain
    generalization"): after each ERM step, the featurizer also minimizes the gap between the
    worst and best domain's risk under an adversarial classifier, which starts from the
    model's classifier and ascends that gap for ``d_steps_per_g`` SGD steps inside a ball of
    radius ``delta`` around it."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("t_lambda", 1.0, lambda r: 10 ** r.uniform(-2, 1)),
                hp("delta", 2.0, lambda r: r.uniform(0.1, 3.0)),
                hp("d_steps_per_g", 10, lambda r: int(r.choice([1, 2, 5]))),
                hp("lr_d", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))]

    def __init__(self, task: Task, backbone: Backbone, t_lambda: float = 1.0, delta: float = 2.0,
                 d_steps_per_g: int = 10, lr_d: float = 1e-3):
        """
        Args:
            t_lambda: weight of the risk gap (``t_lambda``).
            delta: radius of the adversarial classifier's ball, in parameter norm (``delta``).
            d_steps_per_g: the adversary's SGD steps per step (``d_steps_per_g``).
            lr_d: the adversary's SGD learning rate (``lr_d``).
        """
        super().__init__(task, backbone)
        check(delta >= 0, "model.algorithm.delta", f"{delta} is negative", ">= 0")
        self.t_lambda, self.delta, self.d_steps_per_g, self.lr_d = t_lambda, delta, d_steps_per_g, lr_d
        self.adv_classifier = self.build_classifier(self.featurizer.n_outputs)
        self.adv_classifier.load_state_dict(self.classifier.state_dict())

    def parameter_groups(self) -> list[nn.Parameter]:
        return [*self.featurizer.parameters(), *self.classifier.parameters()]

    def extra_optimizers(self, make) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.adv_classifier.parameters(), lr=self.lr_d)]  # plain SGD, as the paper

    def loss_gap(self, batch: Batch) -> Tensor:
        """The largest minus the smallest domain risk under the adversarial classifier."""
        worst = torch.tensor([-float("inf")], device=batch.x.device)
        best = torch.tensor([float("inf")], device=batch.x.device)
        for x, y in batch.per_domain():
            loss = F.cross_entropy(self.adv_classifier(self.featurizer(x)), y)
            worst, best = (loss if loss > worst else worst), (loss if loss < best else best)
        return worst - best

    def project(self) -> None:
        """Pull the adversarial classifier back onto the ball around the classifier."""
        with torch.no_grad():
            pairs = list(zip(self.classifier.state_dict().values(),
                             self.adv_classifier.state_dict().values(), strict=True))
            distance = torch.sqrt(sum(torch.norm(adv - h) ** 2 for h, adv in pairs))
            if distance > self.delta:
                for h, adv in zip(self.classifier.parameters(), self.adv_classifier.parameters(),
                                  strict=True):
                    adv.copy_(h + self.delta / distance * (adv - h))

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        adv_opt, featurizer = opt.optimizers[1], list(self.featurizer.parameters())
        loss = F.cross_entropy(self(batch.x), batch.y)
        opt.zero_grad()
        opt.backward(loss, inputs=self.parameter_groups())
        opt.step()
        gap = self.t_lambda * self.loss_gap(batch)
        opt.zero_grad()
        opt.backward(gap, inputs=featurizer)
        opt.step()
        self.adv_classifier.load_state_dict(self.classifier.state_dict())
        for _ in range(self.d_steps_per_g):
            opt.zero_grad(adv_opt)
            gap = -self.t_lambda * self.loss_gap(batch)
            opt.backward(gap, inputs=list(self.adv_classifier.parameters()))
            opt.step(adv_opt)
            self.project()
        return {"loss": loss.detach(), "gap": -gap.detach()}

