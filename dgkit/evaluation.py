"""Per-stream metrics of every evaluation stage: what ``val/accuracy/<domain>``,
``test/accuracy`` and each head's ``accuracy_head<h>`` are computed from."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dgkit.metrics import OfficialEvaluation
from dgkit.metrics import accuracy as accuracy_metric
from dgkit.plugins import registry
from dgkit.task import Task

UNADAPTED = "test_unadapted"  # the same model without its test-time stage
LAST = "test_last"  # the last iterate of a run whose tested model is an average
COMPANIONS = (UNADAPTED, LAST)  # streams that test another model on the test images

class StreamMetrics(nn.Module):
    """One ``MetricCollection`` per evaluation stream, by stage, as the task names them:
    by default ``val`` (source out-splits: training-domain validation), ``oracle`` (target
    out-splits: test-domain oracle), ``test`` (target in-splits); ``crafted``/``heldout`` or a
    benchmark's official splits when the data adds them; ``test_unadapted`` for models with
    a test-time stage; ``test_last`` for runs that average weights. A benchmark's own
    evaluator (``task.evaluator``) runs beside them; an algorithm with several heads gets
    each head's accuracy too."""

    def __init__(self, task: Task, names: Iterable[str] = ("accuracy",), num_heads: int = 1,
                 unadapted: bool = False, last: bool = False):
        super().__init__()
        factories = {name: registry("metric").get(name).obj for name in names}
        self.streams = dict(task.stages)
        if unadapted:
            self.streams[UNADAPTED] = self.streams["test"]
        if last:
            self.streams[LAST] = self.streams["test"]

        def collection() -> MetricCollection:
            metrics = {n: f(task) for n, f in factories.items()}
            if task.evaluator is not None:
                metrics["official"] = OfficialEvaluation(task.evaluator)
            return MetricCollection(metrics)

        self.domains = nn.ModuleDict({stage: nn.ModuleList(collection() for _ in names_)
                                      for stage, names_ in self.streams.items()})
        self.heads = nn.ModuleDict({
            stage: nn.ModuleList(MetricCollection({f"accuracy_head{h}": accuracy_metric(task)
                                                   for h in range(num_heads)}) for _ in names_)
            for stage, names_ in self.streams.items() if stage not in COMPANIONS
        }) if num_heads > 1 else None
        self._updated: set[tuple[str, int]] = set()

    def __contains__(self, stage: str) -> bool:
        return stage in self.streams

    @property
    def tracks_heads(self) -> bool:
        return self.heads is not None

    def update(self, stage: str, index: int, logits: Tensor, y: Tensor,
               heads: Tensor | None = None, **extra: Tensor) -> None:
        """One batch of stream ``index`` of ``stage``; ``heads``: ``[B, H, C]`` logits of
        every head; ``extra``: what the official evaluator takes (WILDS' metadata)."""
        self.domains[stage][index].update(logits, y, **extra)
        if heads is not None and self.heads is not None and stage in self.heads:
            for h, metric in enumerate(self.heads[stage][index].values()):
                metric.update(heads[:, h], y)
        self._updated.add((stage, index))

    def compute(self, stages: Iterable[str]) -> dict[str, Tensor]:
        """``<stage>/<metric>/<domain>`` of every updated stream (reduced across ranks by
        torchmetrics) and ``<stage>/<metric>``, the mean over domains (as DomainBed: not
        over pooled samples); resets what it computed."""
        out: dict[str, Tensor] = {}
        for stage in (s for s in stages if s in self.streams):
            per_metric: dict[str, list[Tensor]] = {}
            for i, domain in enumerate(self.streams[stage]):
                if (stage, i) not in self._updated:
                    continue
                collections = [self.domains[stage][i]]
                if self.heads is not None and stage in self.heads:
                    collections.append(self.heads[stage][i])
                for collection in collections:
                    for name, value in collection.compute().items():
                        out[f"{stage}/{name}/{domain}"] = value
                        per_metric.setdefault(name, []).append(value)
                    collection.reset()
                self._updated.discard((stage, i))
            for name, values in per_metric.items():
                out[f"{stage}/{name}"] = torch.stack(values).mean()
        return out
