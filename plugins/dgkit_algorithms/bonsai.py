"""Bonsai / Rich Feature Construction (Zhang, Lopez-Paz, Bottou, ICML 2022).

Discovery rounds train fresh networks, each robustly over groups defined by where the
earlier ones were right or wrong, so each must find features the earlier ones missed;
a synthesis round distils all of them into one featurizer with a task head per
discovered network. The averaged head and that featurizer are the representation other
algorithms start from (``--model.init_from``).

One fit runs every round: the round follows the step count (``stage_steps``, or the run
split evenly), so a resumed run continues in the round it stopped in, and the module
checkpoints the end of every round as ``stage-<name>.ckpt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import register
from dgkit.algorithm import Algorithm, Batch
from dgkit.errors import check, check_choice
from dgkit.networks import Backbone
from dgkit.task import Task

Robust = Literal["max", "groupdro"]


def correctness_groups(nets: list[nn.Module], x: Tensor, y: Tensor) -> Tensor:
    """``[2 * len(nets), B]`` masks: for each earlier net, the samples it gets right, then
    those it gets wrong (the reference's groups; a sample is in one group per net)."""
    with torch.no_grad():
        correct = torch.stack([net(x).argmax(1) == y for net in nets])
    return torch.cat([correct, ~correct])


def group_losses(per_sample: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss of every group and which groups are present in the batch."""
    counts = groups.sum(1)
    losses = (groups.float() * per_sample).sum(1) / counts.clamp_min(1)
    return losses, counts > 0


@register("bonsai")
class Bonsai(Algorithm):
    """Rich Feature Construction: ``rounds`` discovery networks, then their synthesis.

    Heads (``num_heads = rounds + 1``): each discovered network, then the synthesis
    network with its averaged head, which is also ``forward``.
    """

    def __init__(self, task: Task, backbone: Backbone, rounds: int = 2, robust: Robust = "max",
                 group_step: float = 0.01, balance: bool = True,
                 stage_steps: list[int] | None = None, select_rounds: int = 1):
        """
        Args:
            rounds: discovery rounds (round 0 is ERM); the paper's "2-RFC" is 2, the
                default, as more rounds did not help on Camelyon17.
            robust: how later rounds weigh the correctness groups: ``max`` (the worst
                group's loss, as in the ColoredMNIST code) or ``groupdro`` (WILDS'
                exponentiated-gradient group weights, as for Camelyon17).
            group_step: step size of the ``groupdro`` weights.
            balance: in synthesis, give the samples on which all discovered networks
                agree about correctness and the others equal weight (the reference
                samples them half and half).
            stage_steps: steps of each discovery round and of the synthesis
                (``rounds + 1`` numbers); default: the run's steps split evenly.
            select_rounds: how many leading rounds keep their weights of best source
                validation accuracy instead of their last ones. Round 0 (ERM) must be
                early-stopped, or it memorizes the training set and leaves no "wrong"
                group; a robust round selected by *average* accuracy falls back on the
                shortcut it was meant to avoid, so later rounds keep their last weights.
        """
        super().__init__(task, backbone)
        check(rounds >= 1, "model.algorithm.rounds", f"{rounds}", ">= 1")
        check_choice(robust, Robust, "model.algorithm.robust")
        check(stage_steps is None or (len(stage_steps) == rounds + 1 and min(stage_steps) >= 1),
              "model.algorithm.stage_steps", f"{stage_steps}",
              f"{rounds + 1} positive step counts (each discovery round, then synthesis)")
        self.rounds, self.robust, self.group_step, self.balance = rounds, robust, group_step, balance
        self.stage_steps, self.select_rounds = stage_steps, select_rounds
        self.num_heads = rounds + 1
        # Every network starts from its own fresh initialization (a pitfall of reusing net_0).
        self.discovered = nn.ModuleList(self._network() for _ in range(rounds))
        self.featurizer = self.build_featurizer()
        self.task_heads = nn.Linear(self.featurizer.n_outputs, rounds * task.num_classes)
        # The averaged task head, kept equal to the mean of task_heads in every saved state.
        self.classifier = self.build_classifier(self.featurizer.n_outputs).requires_grad_(False)
        # The selected (best source-validation) weights of the round being trained.
        self.snapshot = self._network().requires_grad_(False)
        self.register_buffer("snapshot_score", torch.tensor(float("-inf")))
        self.register_buffer("group_weights", torch.ones(max(2 * (rounds - 1), 1)))
        self.register_state_dict_pre_hook(lambda module, *_: module._sync_classifier())

    def _network(self) -> nn.Sequential:
        featurizer = self.build_featurizer()
        return nn.Sequential(featurizer, self.build_classifier(featurizer.n_outputs))

    # --- stages ---------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """0 .. rounds-1: discovery rounds; ``rounds``: synthesis."""
        step = self.progress.step
        if self.stage_steps is not None:
            for stage, end in enumerate(torch.tensor(self.stage_steps).cumsum(0).tolist()):
                if step < end:
                    return stage
            return self.rounds
        total = self.progress.total_steps or 1
        return min(self.rounds, step * (self.rounds + 1) // total)

    def stage_name(self) -> str:
        return "synthesis" if self.stage == self.rounds else f"discovery-{self.stage}"

    def on_validation_metrics(self, metrics: Mapping[str, float]) -> None:
        stage = self.stage
        score = metrics.get(f"val/accuracy_head{stage}")
        if stage < min(self.select_rounds, self.rounds) and score is not None and score > self.snapshot_score:
            self.snapshot.load_state_dict(self.discovered[stage].state_dict())
            self.snapshot_score.fill_(score)

    def end_stage(self, name: str) -> str | None:
        note = None
        if name.startswith("discovery-") and torch.isfinite(self.snapshot_score):
            # Later rounds group by the *selected* network's mistakes, not the last one's.
            k = int(name.split("-")[1])
            self.discovered[k].load_state_dict(self.snapshot.state_dict())
            note = (f"Bonsai: round {k} keeps its weights of best source validation "
                    f"accuracy ({self.snapshot_score.item():.4f})")
        self.snapshot_score.fill_(float("-inf"))
        self.group_weights.fill_(1.0)
        return note

    def train(self, mode: bool = True) -> Bonsai:
        super().train(mode)
        if mode:  # finished rounds are fixed functions: no dropout, no BatchNorm updates
            for net in self.discovered[: min(self.stage, self.rounds)]:
                net.eval()
        return self

    # --- training -------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        stage = self.stage
        out = {"stage": torch.tensor(float(stage))}
        if stage == self.rounds:
            return {**self._synthesis_loss(batch), **out}
        per_sample = F.cross_entropy(self.discovered[stage](batch.x), batch.y, reduction="none")
        if stage == 0:
            return {"loss": per_sample.mean(), **out}
        earlier = [net.eval() for net in self.discovered[:stage]]
        losses, present = group_losses(per_sample, correctness_groups(earlier, batch.x, batch.y))
        if self.robust == "max":
            loss = losses[present].max()
        else:
            q = self.group_weights[: len(losses)]
            q.mul_(torch.exp(self.group_step * losses.detach() * present)).div_(q.sum())
            loss = (q * losses).sum()
        return {"loss": loss, "worst_group_loss": losses[present].max().detach(), **out}

    def _synthesis_loss(self, batch: Batch) -> dict[str, Tensor]:
        nets = [net.eval() for net in self.discovered]
        with torch.no_grad():
            targets = torch.stack([net(batch.x).argmax(1) for net in nets], 1)  # [B, K]
        correct = targets == batch.y[:, None]
        agree = correct.all(1) | (~correct).all(1)
        weights = torch.full_like(batch.y, 1.0 / len(batch.y), dtype=torch.float)
        if self.balance and 0 < agree.sum() < len(agree):
            weights = torch.where(agree, 0.5 / agree.sum(), 0.5 / (~agree).sum())
        logits = self._task_logits(self.featurizer(batch.x))  # [B, K, C]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (weights * ce.view_as(targets).mean(1)).sum()
        return {"loss": loss, "agreeing_fraction": agree.float().mean()}

    # --- inference ------------------------------------------------------------------
    def _task_logits(self, z: Tensor) -> Tensor:
        return self.task_heads(z).view(len(z), self.rounds, -1)

    def forward(self, x: Tensor) -> Tensor:
        """The synthesis network with the mean of its task heads."""
        return self._task_logits(self.featurizer(x)).mean(1)

    def head_logits(self, x: Tensor) -> Tensor:
        return torch.stack([*(net(x) for net in self.discovered), self(x)], dim=1)

    @torch.no_grad()
    def _sync_classifier(self) -> None:
        c, n = self.task.num_classes, self.featurizer.n_outputs
        self.classifier.weight.copy_(self.task_heads.weight.view(self.rounds, c, n).mean(0))
        self.classifier.bias.copy_(self.task_heads.bias.view(self.rounds, c).mean(0))

    def classifiers(self) -> dict[str, nn.Module]:
        return {}  # the averaged head is derived, never loaded into
