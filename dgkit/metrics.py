"""Built-in per-domain metrics (a plugin like any other: more come through ``dgkit_metrics``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.utilities import dim_zero_cat

from dgkit.hookspecs import hookimpl
from dgkit.plugins import register, registered_in
from dgkit.task import Task


@register("accuracy")
def accuracy(task: Task) -> Metric:
    return MulticlassAccuracy(num_classes=task.num_classes, average="micro")


@register("macro_f1")
def macro_f1(task: Task) -> Metric:
    return MulticlassF1Score(num_classes=task.num_classes, average="macro")


class CrossEntropy(Metric):
    """The mean cross-entropy of the logits over a stream (SWAD's validation loss)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(preds.float(), target, reduction="sum")
        self.total += loss.double()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


@register("cross_entropy")
def cross_entropy(task: Task) -> Metric:
    return CrossEntropy()


@hookimpl
def dgkit_metrics():
    return registered_in(__name__)


class OfficialEvaluation(Metric):
    """A benchmark's own evaluator over a whole stream (WILDS' ``dataset.eval``), which
    needs every prediction with its metadata: worst-group and macro metrics do not
    average over batches. Predictions are gathered across ranks before it runs."""

    full_state_update = False

    def __init__(self, evaluate: Callable[[Tensor, Tensor, Tensor], dict[str, float]]):
        super().__init__()
        self.evaluate = evaluate
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("metadata", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, metadata: Tensor) -> None:
        self.preds.append(preds.argmax(-1) if preds.ndim > 1 else preds)
        self.target.append(target)
        self.metadata.append(metadata)

    def compute(self) -> dict[str, Tensor]:
        cat = [dim_zero_cat(s).cpu() for s in (self.preds, self.target, self.metadata)]
        results = self.evaluate(*cat)
        return {k: torch.tensor(float(v)) for k, v in results.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
