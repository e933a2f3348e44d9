"""UDIM: Unknown Domain Inconsistency Minimization (Shin, Bae, Na, Kim, Moon; ICLR 2024).

SAM on the source domains, plus the inconsistency between the loss landscapes of the
source and of adversarially perturbed ("unknown") copies of it. Follows the official
code (aailabkaist/UDIM): the perturbation maximises the first-order sharpness-aware loss
``CE + rho_s ||grad_theta CE||``, and the inconsistency is a Fishr-style penalty on the
variance of per-sample classifier gradients plus their squared norm on perturbed samples.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Backbone, Batch, Optimization, Task, register
from dgkit.errors import DGKitError, check, check_choice
from dgkit.sharpness import bn_stats_frozen, perturbed, sam_perturbation
from dgkit_algorithms.sam import SAM

PerturbNorm = Literal["batch", "sample"]
BNMode = Literal["batch_stats", "running"]


def per_sample_classifier_grads(z: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of each sample's cross-entropy w.r.t. a linear head, in closed form and
    differentiable: ``dW_i = (softmax_i - onehot_i) z_i^T``, ``db_i = softmax_i - onehot_i``."""
    delta = logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return delta.unsqueeze(2) * z.unsqueeze(1), delta


def fishr_inconsistency(grads_w: Tensor, grads_b: Tensor, n_clean: int,
                        center_on_clean: bool = True) -> Tensor:
    """``P + N`` of the reference: variance mismatch of per-sample gradients between the
    clean (first ``n_clean``) and perturbed samples, plus the perturbed samples' mean
    squared gradient norm per parameter coordinate."""
    g = torch.cat([grads_w.flatten(1), grads_b], dim=1)
    clean, pert = g[:n_clean], g[n_clean:]
    mean_clean = clean.mean(0)
    v_clean = (clean - mean_clean).pow(2).mean(0)
    # The reference centres the perturbed variance on the clean mean.
    v_pert = (pert - (mean_clean if center_on_clean else pert.mean(0))).pow(2).mean(0)
    v_avg = (v_clean + v_pert) / 2
    penalty = ((v_clean - v_avg).pow(2).mean() + (v_pert - v_avg).pow(2).mean()) / 2
    gw, gb = grads_w[n_clean:], grads_b[n_clean:]
    norm = gw.pow(2).flatten(1).sum(1).mean() / gw[0].numel() + gb.pow(2).sum(1).mean() / gb.shape[1]
    return penalty + norm


@register("udim")
class UDIM(SAM):
    """SAM warm-up, then UDIM steps: SAM's gradient on the clean batch plus ``lam`` times
    the gradient of the source/perturbed-domain inconsistency, merged into one update."""

    differentiates_twice = True  # the input perturbation needs a gradient of a gradient

    def __init__(self, task: Task, backbone: Backbone, rho: float = 0.05, rho_s: float | None = None,
                 rho_x: float = 10.0, lam: float = 1.0, warmup_fraction: float = 0.2,
                 warmup_steps: int | None = None, perturb_norm: PerturbNorm = "batch",
                 domain_wise: bool = True, center_on_clean: bool = True, adaptive: bool = False,
                 eta: float = 0.01, sync_perturbation: bool = False, reload_warmup_best: bool = True,
                 bn_mode: BNMode = "batch_stats"):
        """
        Args:
            rho: radius of the weight perturbation (SAM's rho), in warm-up and UDIM steps.
            rho_s: weight of ``||grad_theta CE||`` in the objective the input perturbation
                ascends; ``None`` ties it to ``rho`` as the reference does.
            rho_x: size of the input perturbation (the reference's ``syn_lr``; its scripts
                use 10). Its meaning depends on ``perturb_norm``.
            lam: weight of the inconsistency gradient (the reference's ``worst_weight``).
            warmup_fraction: share of the run spent on plain SAM first (the scripts'
                ``sam_warm_up_ratio`` 5 is 0.2).
            warmup_steps: explicit warm-up length in steps; overrides the fraction.
            perturb_norm: ``batch`` (reference): the input gradient is L2-normalised
                across the batch at every pixel (``F.normalize(dim=0)``), so the average
                per-pixel shift is about ``rho_x / sqrt(B)``; ``sample``: each sample's
                shift has L2 norm ``rho_x`` (a far smaller perturbation at the same value).
            domain_wise: sum the inconsistency over source domains (reference, multi-source)
                instead of one term over the whole batch.
            center_on_clean: centre the perturbed samples' gradient variance on the clean
                mean, as the reference does; off centres it on their own mean (Fishr).
            adaptive: ASAM-style weight perturbation.
            eta: ASAM's offset.
            sync_perturbation: all-reduce the perturbation passes under DDP (see SAM).
            reload_warmup_best: when UDIM steps start, reload the weights and optimizer state
                of the warm-up's best validation (the task's selection metric, source
                domains), as the reference reloads its ``eval_best.pt``; off continues from
                the last warm-up step. Warm-up and UDIM steps are then two stages
                (``stage-warmup.ckpt``).
            bn_mode: ``batch_stats`` (reference, its ``replace_all_batch_norm_modules_``):
                from the first UDIM step on, every BatchNorm layer normalises with the
                current batch's statistics, in training and at evaluation (predictions then
                depend on the evaluation batch); ``running``: BatchNorm as configured
                (``--model.freeze_bn``). No effect on networks without BatchNorm.
        """
        super().__init__(task, backbone, rho=rho, adaptive=adaptive, eta=eta,
                         sync_perturbation=sync_perturbation)
        check(rho_x >= 0, "model.algorithm.rho_x", f"{rho_x} is negative", ">= 0")
        check(lam >= 0, "model.algorithm.lam", f"{lam} is negative", ">= 0")
        check(0 <= warmup_fraction < 1, "model.algorithm.warmup_fraction",
              f"{warmup_fraction} is not a fraction", "0 <= f < 1")
        check(warmup_steps is None or warmup_steps >= 0, "model.algorithm.warmup_steps",
              f"{warmup_steps} is negative", ">= 0 or null")
        check_choice(perturb_norm, PerturbNorm, "model.algorithm.perturb_norm")
        check_choice(bn_mode, BNMode, "model.algorithm.bn_mode")
        if not isinstance(self.classifier, torch.nn.Linear):
            raise DGKitError("UDIM's per-sample gradients need a linear classifier head")
        self.rho_s = rho if rho_s is None else rho_s
        self.rho_x, self.lam = rho_x, lam
        self.warmup_fraction, self.warmup_steps = warmup_fraction, warmup_steps
        self.perturb_norm, self.domain_wise = perturb_norm, domain_wise
        self.center_on_clean = center_on_clean
        self.reload_warmup_best, self.bn_mode = reload_warmup_best, bn_mode
        # Persistent, so a checkpoint of the UDIM phase evaluates (and resumes) with batch
        # statistics whatever step the loading module thinks it is at.
        self.register_buffer("batch_stats_phase", torch.zeros((), dtype=torch.bool))
        self._norms = [m for m in self.featurizer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._norms_switched = False  # this process has put them in batch-statistics mode
        self._best: dict[str, Any] | None = None  # the warm-up's best validation: score, step, state
        self._optimizer: weakref.ref | None = None  # the main optimizer, for its state; a weak
        # reference, so that copies of the model (averages, test-time references) leave it

    @property
    def in_warmup(self) -> bool:
        steps = self.warmup_steps
        if steps is None:
            total = self.progress.total_steps or 0
            steps = int(total * self.warmup_fraction)
        return self.progress.step < steps

    # --- the warm-up's best state, reloaded when UDIM steps start ------------------------
    def stage_name(self) -> str | None:
        if not self.reload_warmup_best:
            return None
        return "warmup" if self.in_warmup else "udim"

    def on_validation_metrics(self, metrics: Mapping[str, float]) -> None:
        score = metrics.get(self.task.selection_metric)
        if not (self.reload_warmup_best and self.in_warmup) or score is None:
            return
        if self._best is None or score > self._best["score"]:
            optimizer = self._optimizer() if self._optimizer is not None else None
            self._best = {
                "score": score, "step": self.progress.step + 1,
                "weights": {k: v.detach().clone() for k, v in self._tensors().items()},
                "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            }

    def end_stage(self, name: str) -> str | None:
        if name != "warmup":
            return None
        best, self._best = self._best, None
        if best is None:
            return "UDIM: no validation during the warm-up; UDIM steps start from its last weights"
        with torch.no_grad():
            for k, v in self._tensors().items():
                v.copy_(best["weights"][k])
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is not None and best["optimizer"] is not None:
            optimizer.load_state_dict(best["optimizer"])
        return (f"UDIM: UDIM steps start from the warm-up's best validation "
                f"({self.task.selection_metric} {best['score']:.4f} after step {best['step']}): "
                "weights and optimizer state reloaded")

    def _tensors(self) -> dict[str, Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def get_extra_state(self) -> dict[str, Any]:
        return {"warmup_best": self._best}  # a run killed in its warm-up resumes with it

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._best = (state or {}).get("warmup_best")

    # --- BatchNorm with batch statistics after the warm-up --------------------------------
    def train(self, mode: bool = True) -> UDIM:
        super().train(mode)
        if self._norms and bool(self.batch_stats_phase):
            for m in self._norms:  # normalise with the batch's statistics, keep the running ones
                m.train(True)
                m.momentum = 0.0
        return self

    def perturb_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """The unknown-domain inputs ``x + rho_x * normalize(grad_x J)`` with
        ``J = CE + rho_s ||grad_theta CE||``; also the clean loss and its weight gradient
        (reused for SAM's perturbation, as in the reference: one double-backward pass)."""
        params = [p for _, p in self.named_trainable()]
        x_adv = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(self(x_adv), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        gnorm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads if g is not None]))
        (grad_x,) = torch.autograd.grad(loss + self.rho_s * gnorm, x_adv)
        if self.perturb_norm == "batch":  # unit norm across the batch at every input coordinate
            direction = F.normalize(grad_x, p=2, dim=0)
        else:
            direction = F.normalize(grad_x.flatten(1), p=2, dim=1).view_as(grad_x)
        x_tilde = (x + self.rho_x * direction).detach()  # not clamped, like the reference
        return x_tilde, loss.detach(), [None if g is None else g.detach() for g in grads]

    def inconsistency(self, x: Tensor, x_tilde: Tensor, y: Tensor, domain: Tensor) -> Tensor:
        z = self.featurizer(torch.cat([x, x_tilde]))
        logits = self.classifier(z)
        grads_w, grads_b = per_sample_classifier_grads(z, logits, torch.cat([y, y]))
        n = len(x)
        if not self.domain_wise:
            return fishr_inconsistency(grads_w, grads_b, n, self.center_on_clean)
        total = logits.new_zeros(())
        for d in torch.unique(domain).tolist():
            idx = (domain == d).nonzero().squeeze(1)
            both = torch.cat([idx, idx + n])
            total = total + fishr_inconsistency(grads_w[both], grads_b[both], len(idx),
                                                self.center_on_clean)
        return total

    def training_update(self, batch: Batch, opt: Optimization) -> dict[str, Tensor]:
        self._optimizer = weakref.ref(opt.optimizer)
        if self.in_warmup:
            return {**super().training_update(batch, opt), "warmup": torch.ones(())}
        if self.bn_mode == "batch_stats" and self._norms and not self._norms_switched:
            self.batch_stats_phase.fill_(True)
            self.train(self.training)
            self._norms_switched = True
        x, y = batch.x, batch.y
        named = list(self.named_trainable())
        sync = contextlib.nullcontext() if self.sync_perturbation else opt.no_sync()
        with sync:
            # 1. Unknown-domain inputs and SAM's perturbation from one double-backward pass.
            x_tilde, loss, grads = self.perturb_inputs(x, y)
            e = sam_perturbation(named, self.rho, self.adaptive, self.eta, grads=grads)
            # 2. SAM's gradient on the clean batch at w + e (kept local under DDP).
            opt.zero_grad()
            with perturbed(e), bn_stats_frozen(self):
                perturbed_loss = F.cross_entropy(self(x), y)
                opt.backward(perturbed_loss)
        # 3. The inconsistency at w. This backward adds lam * grad(I) to SAM's gradient
        #    and, under DDP, all-reduces the merged gradient once.
        with bn_stats_frozen(self):
            inconsistency = self.inconsistency(x, x_tilde, y, batch.domain)
            opt.backward(self.lam * inconsistency)
        opt.step()
        shift = (x_tilde - x).flatten(1).norm(dim=1).mean()
        return {"loss": loss, "perturbed_loss": perturbed_loss.detach(),
                "inconsistency": inconsistency.detach(), "input_shift": shift,
                "warmup": torch.zeros(())}

