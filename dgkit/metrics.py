"""Built-in per-domain metrics (a plugin like any other: more come through ``dgkit_metrics``)."""

from __future__ import annotations

from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from dgkit.hookspecs import hookimpl
from dgkit.task import Task


def accuracy(task: Task) -> Metric:
    return MulticlassAccuracy(num_classes=task.num_classes, average="micro")


def macro_f1(task: Task) -> Metric:
    return MulticlassF1Score(num_classes=task.num_classes, average="macro")


@hookimpl
def dgkit_metrics():
    return {"accuracy": accuracy, "macro_f1": macro_f1}
