"""Methods that adapt a model's normalization layers: BatchNorm statistics of the test
batch, and entropy minimization of the layers' affine parameters (TENT, SAR, EATA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.distributed import average_gradients, world_size
from dgkit.errors import ConfigError
from dgkit.plugins import register
from dgkit.tta import (
    GradientMethod,
    Source,
    TestTimeMethod,
    affine_parameters,
    batch_norms,
    batch_statistics,
    entropy,
)


@register("bn")
class BatchNormAdaptation(TestTimeMethod):
    """BN adaptation (Schneider et al., NeurIPS 2020; Nado et al., 2020): BatchNorm layers
    normalize with the test batch's statistics instead of the source's running ones.

    Args:
        prior: N, the weight of the source statistics as a number of samples: a batch of
            n is normalized with N/(N+n) source + n/(N+n) batch statistics (0: the batch's
            alone, as TENT's and TTAB's ``bn_adapt``).
    """

    def __init__(self, prior: float = 0.0):
        if prior < 0:
            raise ConfigError("model.tta.prior", f"{prior}", ">= 0")
        self.prior = prior

    def setup(self, model: Algorithm, source: Source) -> None:
        if not batch_norms(model):
            raise ConfigError("model.tta", f"bn adapts BatchNorm statistics, and {type(model).__name__}'s "
                              "networks have no BatchNorm layer", "a backbone with BatchNorm: "
                              "--model.backbone mnist_cnn_bn, resnet18, ...; or --tta tent for GroupNorm")

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        with batch_statistics(model, self.prior):
            return model(x)


@register("tent")
class TENT(GradientMethod):
    """TENT (Wang et al., ICLR 2021): minimize the entropy of the predictions on each test
    batch by updating only the scales and shifts of the normalization layers, BatchNorm
    normalizing with the batch's statistics; the prediction is the forward before the
    batch's (last) update, as the reference does. GroupNorm and LayerNorm affine
    parameters are adapted too (TTAB's choice), so networks without BatchNorm adapt.

    Args:
        lr: learning rate (the paper: 0.00025 with SGD for ImageNet at batch 64, 0.001 with
            Adam for CIFAR at batch 200).
        steps: updates per test batch.
        optimizer: ``sgd`` (with momentum) or ``adam`` (momentum as beta1).
        momentum: SGD's momentum or Adam's beta1.
    """

    def __init__(self, lr: float = 1e-3, steps: int = 1, optimizer: str = "adam", momentum: float = 0.9):
        super().__init__(lr, steps, optimizer, momentum)

    def parameters(self, model: Algorithm) -> list:
        return affine_parameters(model, "tent")

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        with batch_statistics(model):
            for _ in range(self.steps):
                logits = model(x)
                self.step(entropy(logits).mean())
        return logits.detach()


def entropy_margin(model: Algorithm, scale: float) -> float:
    """The entropy threshold ``scale * ln(C)`` (EATA and SAR: 0.4 ln 1000 on ImageNet)."""
    return scale * math.log(model.task.num_classes)


@register("sar")
class SAR(GradientMethod):
    """SAR (Niu et al., ICLR 2023): entropy minimization on the reliable samples only (entropy
    below ``margin * ln C``), with a sharpness-aware update (SAM's two passes, radius
    ``rho``) of the normalization layers' affine parameters, except those of the last stage
    (names containing ``exclude``: a ResNet's ``layer4``); when the moving average (0.9) of
    the second pass's loss falls below ``reset_below`` the model has collapsed and goes
    back to its trained state.

    Args:
        lr: SGD learning rate (the paper: 0.00025 at batch 64).
        steps: updates per test batch.
        rho: the SAM radius.
        margin: the reliability threshold as a fraction of ln C (the paper: 0.4).
        reset_below: the model-recovery threshold of the loss's moving average.
        exclude: normalization layers whose name contains it stay fixed ("" for none).
        optimizer: ``sgd`` (the paper's) or ``adam``.
        momentum: SGD's momentum or Adam's beta1.
    """

    def __init__(self, lr: float = 2.5e-4, steps: int = 1, rho: float = 0.05, margin: float = 0.4,
                 reset_below: float = 0.2, exclude: str = "layer4", optimizer: str = "sgd",
                 momentum: float = 0.9):
        super().__init__(lr, steps, optimizer, momentum)
        self.rho, self.margin, self.reset_below, self.exclude = rho, margin, reset_below, exclude
        self._ema: float | None = None

    def parameters(self, model: Algorithm) -> list:
        return affine_parameters(model, "sar", self.exclude or None)

    def reset(self, model: Algorithm) -> None:
        super().reset(model)
        self._ema = None

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        e0 = entropy_margin(model, self.margin)
        with batch_statistics(model):
            for _ in range(self.steps):
                logits = model(x)
                first = entropy(logits)
                reliable = first < e0
                if not reliable.any() and world_size() == 1:
                    continue  # nothing reliable to learn from (under DDP: a zero update with the others)
                self._opt.zero_grad(set_to_none=True)
                (first[reliable].sum() / reliable.sum().clamp(min=1)).backward(inputs=self._params)
                perturbation = self._ascend()
                second = entropy(model(x))[reliable]
                second = second[second < e0]
                self._opt.zero_grad(set_to_none=True)
                if len(second):  # the gradient at the perturbed point, applied at the original
                    second.mean().backward(inputs=self._params)
                    value = float(second.detach().mean())
                    self._ema = value if self._ema is None else 0.9 * self._ema + 0.1 * value
                self._descend(perturbation)
                self.update(bool(len(second)))
                if self._ema is not None and self._ema < self.reset_below:
                    self.reset_requested = True  # collapsed: the stage restores the model
                    break
        return logits.detach()

    @torch.no_grad()
    def _ascend(self) -> list[Tensor]:
        """Move to the worst point of radius ``rho`` along the first pass's gradient."""
        average_gradients(self._params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = self.rho / (norm + 1e-12)
        steps = [g * scale for g in grads]
        torch._foreach_add_(self._params, steps)
        return steps

    @torch.no_grad()
    def _descend(self, perturbation: list[Tensor]) -> None:
        torch._foreach_sub_(self._params, perturbation)


@register("eata")
class EATA(GradientMethod):
    """EATA (Niu et al., ICML 2022): entropy minimization of the normalization layers'
    affine parameters on the samples that are reliable (entropy below ``margin * ln C``)
    and not redundant (cosine similarity of their prediction to the moving average of
    earlier predictions below ``redundancy``), each weighted by exp(e0 - entropy), plus the
    anti-forgetting penalty ``fisher_alpha * sum F (theta - theta_0)^2`` with the Fisher
    information F of the trained parameters on ``fisher_samples`` source images (the
    paper's in-distribution samples; their pseudo-labels are the model's predictions).

    Args:
        lr: SGD learning rate (the paper: 0.00025 at batch 64).
        steps: updates per test batch.
        margin: the reliability threshold as a fraction of ln C (the paper: 0.4).
        redundancy: the redundancy threshold d0 (the paper: 0.05; TTAB: 0.4).
        fisher_alpha: weight of the anti-forgetting penalty (the paper: 2000; 0: EATA
            without it, "ETA").
        fisher_samples: source images the Fisher information is estimated on.
        optimizer: ``sgd`` (the paper's) or ``adam``.
        momentum: SGD's momentum or Adam's beta1.
    """

    def __init__(self, lr: float = 2.5e-4, steps: int = 1, margin: float = 0.4, redundancy: float = 0.05,
                 fisher_alpha: float = 2000.0, fisher_samples: int = 2000, optimizer: str = "sgd",
                 momentum: float = 0.9):
        super().__init__(lr, steps, optimizer, momentum)
        self.margin, self.redundancy = margin, redundancy
        self.fisher_alpha, self.fisher_samples = fisher_alpha, fisher_samples
        self._fisher: list[Tensor] = []
        self._anchor: list[Tensor] = []
        self._probs: Tensor | None = None

    def parameters(self, model: Algorithm) -> list:
        return affine_parameters(model, "eata")

    def setup(self, model: Algorithm, source: Source) -> None:
        params = self.parameters(model)
        self._anchor = [p.detach().clone() for p in params]
        self._fisher = [torch.zeros_like(p) for p in params]
        if self.fisher_alpha == 0:
            return
        seen = batches = 0
        with batch_statistics(model):
            for x, _ in source():
                x = x[: self.fisher_samples - seen]
                logits = model(x)
                grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params,
                                            allow_unused=True)
                for f, g in zip(self._fisher, grads, strict=True):
                    if g is not None:
                        f += g.detach() ** 2
                seen, batches = seen + len(x), batches + 1
                if seen >= self.fisher_samples:
                    break
        for f in self._fisher:
            f /= max(batches, 1)

    def reset(self, model: Algorithm) -> None:
        super().reset(model)
        self._probs = None

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        e0 = entropy_margin(model, self.margin)
        with batch_statistics(model):
            for _ in range(self.steps):
                logits = model(x)
                ent = entropy(logits)
                keep = ent < e0
                probs = logits.softmax(1).detach()
                if self._probs is not None:
                    similar = F.cosine_similarity(self._probs.unsqueeze(0), probs, dim=1).abs()
                    keep &= similar < self.redundancy
                if keep.any():
                    mean = probs[keep].mean(0)
                    self._probs = mean if self._probs is None else 0.9 * self._probs + 0.1 * mean
                weights = torch.exp(e0 - ent[keep].detach())
                loss = (ent[keep] * weights).mean() if keep.any() else None
                if loss is not None and self.fisher_alpha:
                    loss = loss + self.fisher_alpha * sum(
                        (f * (p - a) ** 2).sum() for f, p, a in zip(self._fisher, self._params, self._anchor,
                                                                   strict=True))
                self.step(loss)
        return logits.detach()
