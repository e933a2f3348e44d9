"""Diversification: DivDis (Lee, Yao, Finn; ICLR 2023) and D-BAT (Pagliardini et al.;
ICLR 2023). Several hypotheses fit the labelled source data but are pushed to disagree
on unlabelled data; one is then picked (disambiguation) with labelled data.

Both need ``--data.unlabeled``. With ``target`` the run is transductive (marked so in
its results); the papers' own protocols draw the unlabelled images from the target
distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Algorithm, Backbone, Batch, Task, register
from dgkit.errors import ConfigError, DGKitError, check, check_choice

Selection = Literal["source_val", "target_queries"]
RegMode = Literal["kl_backward", "kl_forward", "none"]
Variant = Literal["v1", "v2"]


class SelectsHead(Algorithm):
    """Shared disambiguation: predict with ``selected_head``, chosen by accuracy on
    labelled data -- source validation, or ``num_queries`` target samples queried where
    the heads disagree most (the DivDis paper's active querying; uses target labels)."""

    @staticmethod
    def require_unlabeled_source(task: Task, name: str) -> None:
        """Refused before any network is built: without unlabeled images there is nothing to
        diversify on."""
        if task.unlabeled == "none":
            raise ConfigError("data.unlabeled", f"{name} learns from unlabeled images, and none "
                              "are given", "target (transductive), source_holdout, crafted, domains")

    def _init_selection(self, num_heads: int, selection: Selection, num_queries: int) -> None:
        check(num_heads >= 2, "model.algorithm.heads", f"{num_heads}", ">= 2")
        check_choice(selection, Selection, "model.algorithm.selection")
        self.num_heads, self.selection, self.num_queries = num_heads, selection, num_queries
        self.register_buffer("selected_head", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.head_logits(x)[:, int(self.selected_head)]

    def selection_stream(self) -> str:
        # target_queries' labels come from the held-out domains' oracle split, never the test images
        return "oracle" if self.selection == "target_queries" else "val"

    def require_unlabeled(self, batch: Batch) -> Tensor:
        if batch.unlabeled is None:
            raise DGKitError(f"{type(self).__name__} learns from unlabeled images: set "
                             "--data.unlabeled target (transductive) or source_holdout")
        return batch.unlabeled

    @torch.no_grad()
    def choose_head(self, batches: Iterable[tuple[Tensor, Tensor]]) -> dict:
        xs, ys = zip(*batches, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        probs = self.head_logits(x).softmax(-1)  # [N, H, C]
        if self.selection == "target_queries":
            # Query where the heads disagree most: total pairwise L1 distance.
            disagreement = (probs.unsqueeze(1) - probs.unsqueeze(2)).abs().sum((1, 2, 3))
            queried = disagreement.argsort(descending=True)[: self.num_queries]
            probs, y = probs[queried], y[queried]
        accuracy = (probs.argmax(-1) == y.unsqueeze(1)).float().mean(0)
        self.selected_head.fill_(int(accuracy.argmax()))
        return {"selected_head": int(self.selected_head), "by": self.selection,
                "labels_used": len(y), "head_accuracy": accuracy.tolist()}


def pairwise_mutual_information(probs: Tensor) -> Tensor:
    """Mean mutual information between the predictions of every pair of heads,
    ``probs``: ``[B, H, C]`` (DivDis's diversity loss)."""
    b, h, _ = probs.shape
    probs = probs.clamp_min(1e-8)
    joint = torch.einsum("bhc,bgd->hgcd", probs, probs) / b
    marginal = probs.mean(0)
    independent = torch.einsum("hc,gd->hgcd", marginal, marginal)
    mi = (joint * (joint.log() - independent.log())).sum((2, 3))
    pairs = torch.triu_indices(h, h, offset=1)
    return mi[pairs[0], pairs[1]].mean()


@register("divdis")
class DivDis(SelectsHead):
    """Several heads on one featurizer, trained jointly to fit the labels and to make
    their predictions on unlabelled data mutually independent."""

    def __init__(self, task: Task, backbone: Backbone, heads: int = 2,
                 diversity_weight: float = 10.0, reg_weight: float = 10.0,
                 reg_mode: RegMode = "kl_backward",
                 selection: Selection = "target_queries", num_queries: int = 16):
        """
        Args:
            heads: number of hypotheses (the study's advice: 2).
            diversity_weight: weight of the pairwise mutual information on unlabelled data.
            reg_weight: weight of the regulariser keeping each head's label marginal on
                unlabelled data near the source one.
            reg_mode: ``kl_backward`` (reference default): KL(target marginal || source
                marginal); ``kl_forward`` the reverse; ``none``.
            selection: how a head is picked before testing: ``target_queries`` (the paper:
                ``num_queries`` labels of held-out-domain samples where the heads disagree
                most, from the oracle split, never the test images) or ``source_val``.
            num_queries: labels used by ``target_queries``.
        """
        self.require_unlabeled_source(task, type(self).__name__)
        super().__init__(task, backbone)
        self._init_selection(heads, selection, num_queries)
        check_choice(reg_mode, RegMode, "model.algorithm.reg_mode")
        self.diversity_weight, self.reg_weight, self.reg_mode = diversity_weight, reg_weight, reg_mode
        self.featurizer = self.build_featurizer()
        self.classifier = nn.Linear(self.featurizer.n_outputs, heads * task.num_classes)

    def head_logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x)).view(len(x), self.num_heads, -1)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        unlabeled = self.require_unlabeled(batch)
        logits = self.head_logits(batch.x)
        xent = torch.stack([F.cross_entropy(logits[:, h], batch.y) for h in range(self.num_heads)]).mean()
        probs_u = self.head_logits(unlabeled).softmax(-1)
        diversity = pairwise_mutual_information(probs_u)
        reg = torch.zeros((), device=logits.device)
        if self.reg_mode != "none":
            source = logits.softmax(-1).mean((0, 1)).detach().clamp_min(1e-8)
            target = probs_u.mean(0).clamp_min(1e-8)  # [H, C]
            if self.reg_mode == "kl_backward":
                reg = (target * (target.log() - source.log())).sum(1).mean()
            else:
                reg = (source * (source.log() - target.log())).sum(1).mean()
        agreement = (probs_u.argmax(-1) == probs_u[:, :1].argmax(-1)).all(1).float().mean()
        loss = xent + self.diversity_weight * diversity + self.reg_weight * reg
        return {"loss": loss, "xent": xent.detach(), "diversity": diversity.detach(),
                "unlabeled_agreement": agreement}


@register("dbat")
class DBAT(SelectsHead):
    """D-BAT: ``models`` networks trained one after another; each fits the labels and
    disagrees with the earlier ones on unlabelled data. The run's steps are split evenly
    between the models (the stage follows the step count, so it survives a resume)."""

    def __init__(self, task: Task, backbone: Backbone, models: int = 2, alpha: float = 1.0,
                 variant: Variant = "v1", selection: Selection = "target_queries",
                 num_queries: int = 16):
        """
        Args:
            models: number of models trained in sequence.
            alpha: weight of the disagreement loss.
            variant: ``v1`` (reference default): the earlier model's predicted class;
                ``v2``: the current model's.
            selection: how a model is picked before testing (see DivDis).
            num_queries: labels used by ``target_queries``.
        """
        self.require_unlabeled_source(task, type(self).__name__)
        super().__init__(task, backbone)
        self._init_selection(models, selection, num_queries)
        check_choice(variant, Variant, "model.algorithm.variant")
        self.alpha, self.variant = alpha, variant
        self.members = nn.ModuleList(
            nn.Sequential(f := self.build_featurizer(), self.build_classifier(f.n_outputs))
            for _ in range(models))

    @property
    def stage(self) -> int:
        total = self.progress.total_steps or 1
        return min(self.num_heads - 1, self.progress.step * self.num_heads // total)

    def stage_name(self) -> str:
        return f"member-{self.stage}"

    def head_logits(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members], dim=1)

    def representation(self):
        member = self.members[int(self.selected_head)]
        return member[0], member[1]

    def classifiers(self) -> dict[str, nn.Module]:
        return {f"members.{i}.1": m[1] for i, m in enumerate(self.members)}

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        unlabeled = self.require_unlabeled(batch)
        current = self.members[self.stage]
        loss = F.cross_entropy(current(batch.x), batch.y)
        out = {"stage": torch.tensor(float(self.stage))}
        if self.stage > 0:
            p_cur = current(unlabeled).softmax(1)
            terms = []
            for previous in self.members[: self.stage]:
                with torch.no_grad():
                    p_prev = previous.eval()(unlabeled).softmax(1)
                if self.variant == "v1":
                    p1, c = p_prev.max(1)
                    p2 = p_cur.gather(1, c[:, None]).squeeze(1)
                else:
                    p2, c = p_cur.max(1)
                    p1 = p_prev.gather(1, c[:, None]).squeeze(1)
                terms.append(-(p1 * (1 - p2) + p2 * (1 - p1) + 1e-7).log().mean())
            disagreement = torch.stack(terms).mean()
            loss = loss + self.alpha * disagreement
            out["disagreement"] = disagreement.detach()
        return {"loss": loss, **out}

    def train(self, mode: bool = True) -> DBAT:
        super().train(mode)
        if mode:  # earlier models are frozen: eval mode (BatchNorm, dropout)
            for m in self.members[: self.stage]:
                m.eval()
        return self
