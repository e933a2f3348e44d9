"""Agreement between the source domains' gradients, as DomainBed implements each: Fish
(Shi et al., ICLR 2022) follows the direction the domains agree on through an inner loop,
AND-mask (Parascandolo et al., ICLR 2021) and SAND-mask (Shahtalebi et al., 2021) keep only
the gradient components whose signs agree, IGA (Koyama and Yamaguchi, 2020) penalizes
each domain's gradient's distance from the mean gradient, and Fishr (Rame et al., ICML 2022)
matches the domains' gradient variances."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.distributed import average_in_place
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.invariance import AnnealedPenalty


@register("fish")
class Fish(ERM):
    """Fish: a clone takes one step per source domain in turn, and the network moves
    ``meta_lr`` of the way to the clone, which approximates maximizing the inner product of
    the domains' gradients. The clone's optimizer (the configured one) keeps its state from
    step to step, as DomainBed's."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("meta_lr", 0.5, lambda r: r.choice([0.05, 0.1, 0.5]))]

    def __init__(self, task: Task, backbone: Backbone, meta_lr: float = 0.5):
        """
        Args:
            meta_lr: fraction of the way to the clone's weights the network moves (``meta_lr``).
        """
        super().__init__(task, backbone)
        check(0 < meta_lr <= 1, "model.algorithm.meta_lr", f"{meta_lr}", "in (0, 1]")
        self.meta_lr = meta_lr
        self.clone = copy.deepcopy(self.network())

    def network(self) -> nn.Sequential:
        return nn.Sequential(self.featurizer, self.classifier)

    def parameter_groups(self) -> list[nn.Parameter]:  # the optimizer steps the clone
        return list(self.clone.parameters())

    def training_update(self, batch: Batch, opt: Optimization) -> Tensor:
        network = self.network()
        self.clone.load_state_dict(network.state_dict())
        for x, y in batch.per_domain():
            loss = F.cross_entropy(self.clone(x), y)
            opt.zero_grad()
            opt.backward(loss, inputs=list(self.clone.parameters()))
            opt.step()
        with torch.no_grad():
            moved = self.clone.state_dict()
            for name, value in network.state_dict().items():
                value.copy_(value + self.meta_lr * (moved[name] - value))
        return loss.detach()  # the last domain's, as DomainBed reports


class DomainGradients(ERM):
    """Per-domain gradients of the risk w.r.t. every parameter (averaged across DDP ranks:
    each rank holds a share of every domain's minibatch)."""

    manual_optimization = True

    def domain_gradients(self, batch: Batch) -> tuple[list[list[Tensor]], Tensor]:
        params = [p for p in self.parameters() if p.requires_grad]
        grads, losses = [], []
        for x, y in batch.per_domain():
            loss = F.cross_entropy(self(x), y)
            grads.append(list(torch.autograd.grad(loss, params)))
            losses.append(loss.detach())
        average_in_place([g for domain in grads for g in domain])
        return grads, torch.stack(losses).mean()

    def mask(self, grads: Tensor) -> Tensor:
        """``[domains, *shape]`` gradients -> a mask of the parameter's shape."""
        raise NotImplementedError

    def training_update(self, batch: Batch, opt: Optimization) -> Tensor:
        grads, loss = self.domain_gradients(batch)
        opt.zero_grad()
        params = [p for p in self.parameters() if p.requires_grad]
        for i, param in enumerate(params):
            stacked = torch.stack([domain[i] for domain in grads])
            mask = self.mask(stacked)
            param.grad = mask * stacked.mean(0)
            param.grad *= 1.0 / (1e-10 + mask.sum() / mask.numel())  # keep the step's scale
        opt.step()
        return loss


@register("andmask")
class ANDMask(DomainGradients):
    """AND-mask: zero every gradient component on whose sign fewer than a ``tau`` share of
    the domains agree (in mean sign), then rescale by the share kept."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("tau", 1.0, lambda r: r.uniform(0.5, 1.0))]

    def __init__(self, task: Task, backbone: Backbone, tau: float = 1.0):
        """
        Args:
            tau: agreement threshold on ``|mean(sign(g_d))|`` (``tau``).
        """
        super().__init__(task, backbone)
        self.tau = tau

    def mask(self, grads: Tensor) -> Tensor:
        return (torch.sign(grads).mean(0).abs() >= self.tau).to(torch.float32)


@register("sandmask")
class SANDMask(DomainGradients):
    """SAND-mask: a soft AND-mask, ``max(0, tanh(k (|mean sign| - tau) / var))``, so
    components the domains agree on consistently (low variance) pass most."""

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("tau", 1.0, lambda r: r.uniform(0.0, 1.0)),
                hp("k", 10.0, lambda r: 10 ** r.uniform(-3, 5))]

    def __init__(self, task: Task, backbone: Backbone, tau: float = 1.0, k: float = 10.0):
        """
        Args:
            tau: agreement threshold on ``|mean(sign(g_d))|`` (``tau``).
            k: steepness of the soft mask (``k``).
        """
        super().__init__(task, backbone)
        self.tau, self.k = tau, k

    def mask(self, grads: Tensor) -> Tensor:
        variance = grads.var(dim=0)
        variance[torch.isnan(variance)] = 1e-17
        mask = torch.tanh(self.k * variance.pow(-1) * (torch.sign(grads).mean(0).abs() - self.tau))
        mask = torch.max(mask, torch.zeros_like(mask))
        mask[torch.isnan(mask)] = 1e-17
        return mask


@register("iga")
class IGA(ERM):
    """Inter-environmental Gradient Alignment: the mean risk plus ``penalty`` times the
    squared distance of every domain's gradient from the mean gradient (a trace of the
    gradients' covariance across domains)."""

    differentiates_twice = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("penalty", 1000.0, lambda r: 10 ** r.uniform(1, 5))]

    def __init__(self, task: Task, backbone: Backbone, penalty: float = 1000.0):
        """
        Args:
            penalty: weight of the gradients' spread (``penalty``).
        """
        super().__init__(task, backbone)
        self.penalty = penalty

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        params = [p for p in self.parameters() if p.requires_grad]
        losses, grads = [], []
        for x, y in batch.per_domain():
            loss = F.cross_entropy(self(x), y)
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, params, create_graph=True))
        mean_loss = sum(losses) / len(losses)
        mean_grad = torch.autograd.grad(mean_loss, params, retain_graph=True)
        spread = sum((g - m).pow(2).sum() for grad in grads for g, m in zip(grad, mean_grad, strict=True))
        return {"loss": mean_loss + self.penalty * spread, "nll": mean_loss.detach(),
                "penalty": spread.detach()}


def per_sample_classifier_gradients(features: Tensor, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Each sample's gradient of its cross-entropy w.r.t. a linear classifier's weight and
    bias, ``[n, C * D]`` and ``[n, C]``, in closed form (``softmax - onehot``, times the
    features for the weight): what BackPACK's ``BatchGrad`` gives DomainBed's Fishr, and
    differentiable in the same way."""
    g = F.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return {"bias": g, "weight": (g.unsqueeze(2) * features.unsqueeze(1)).flatten(1)}


@register("fishr")
class Fishr(AnnealedPenalty):
    """Fishr: ERM plus the distance between each domain's variance of the per-sample
    classifier gradients and their mean over domains. The variances are moving averages
    (``ema``, corrected by ``1 / (1 - ema)``); the penalty weight switches from 0 to ``lam``
    at ``anneal_steps``, and the optimizer restarts there."""

    weight_before = 0.0

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        return [hp("lam", 1000.0, lambda r: 10 ** r.uniform(1.0, 4.0), "lambda"),
                hp("anneal_steps", 1500, lambda r: int(r.uniform(0.0, 5000.0)), "penalty_anneal_iters"),
                hp("ema", 0.95, lambda r: r.uniform(0.90, 0.99))]

    def __init__(self, task: Task, backbone: Backbone, lam: float = 1000.0, anneal_steps: int = 1500,
                 ema: float = 0.95):
        """
        Args:
            lam: penalty weight after annealing (``lambda``).
            anneal_steps: steps without the penalty first (``penalty_anneal_iters``).
            ema: weight of the past in the variances' moving averages (``ema``).
        """
        super().__init__(task, backbone, lam, anneal_steps)
        check(isinstance(self.classifier, nn.Linear), "model.algorithm", "Fishr needs a linear classifier",
              "the default classifier")
        check(0 <= ema < 1, "model.algorithm.ema", f"{ema}", "in [0, 1)")
        self.ema = ema
        n = self.featurizer.n_outputs * task.num_classes
        self.register_buffer("weight_variance", torch.zeros(task.num_domains, n))
        self.register_buffer("bias_variance", torch.zeros(task.num_domains, task.num_classes))

    def variance_penalty(self, features: Tensor, logits: Tensor, batch: Batch) -> Tensor:
        """The domains' distance from their mean variance of the per-sample gradients; updates
        the moving averages."""
        grads = per_sample_classifier_gradients(features, logits, batch.y)
        masks = batch.domain_masks()
        variances = {name: [] for name in grads}
        for name, g in grads.items():
            past = getattr(self, f"{name}_variance")
            for d, mask in masks.items():
                env = g[mask]
                variance = (env - env.mean(dim=0, keepdim=True)).pow(2).mean(dim=0)
                averaged = self.ema * past[d] + (1 - self.ema) * variance
                past[d] = averaged.detach()
                variances[name].append(averaged / (1 - self.ema))
        mean = {name: torch.stack(v).mean(dim=0) for name, v in variances.items()}
        flat = [torch.cat([variances[name][i] for name in sorted(grads)]) for i in range(len(masks))]
        mean_flat = torch.cat([mean[name] for name in sorted(grads)])
        return sum((f - mean_flat).pow(2).mean() for f in flat) / len(masks)

    def penalty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        features = self.featurizer(batch.x)
        logits = self.classifier(features)
        penalty = self.variance_penalty(features, logits, batch)
        return F.cross_entropy(logits, batch.y), penalty
