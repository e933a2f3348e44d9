"""What an algorithm needs to know about the data before it builds its networks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: what selects the checkpoint, steps a plateau scheduler and heads the reports, unless a
#: benchmark has its own protocol (WILDS: its OOD validation metric)
DEFAULT_SELECTION = "val/accuracy"


@dataclass(frozen=True)
class Task:
    """Shape of the problem, derived by the data module and linked into the model.

    ``source_domains`` are the training domains in the order of ``Batch.domain`` indices;
    ``target_domains`` are held out. ``streams`` names the evaluation streams by stage
    (``(stage, stream names)`` pairs, validation stages first, ``test`` last); empty means
    leave-domains-out: ``val`` per source domain, ``oracle`` and ``test`` per target.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    source_domains: tuple[str, ...]
    target_domains: tuple[str, ...] = ()
    default_backbone: str = "resnet50"
    #: whether the default backbone starts from ImageNet weights (natural images)
    default_pretrained: bool = False
    dataset: str = ""
    streams: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: the metrics the results table shows (all when empty); the files hold every one
    headline_metrics: tuple[str, ...] = ()
    #: whether the test streams are domains to average over (DomainBed); a benchmark's
    #: official splits (WILDS' OOD ``test`` and ``id_test``) never are
    average_test: bool = True
    #: where the training steps' unlabeled images come from (``--data.unlabeled``)
    unlabeled: str = "none"
    #: the logged key that selects the checkpoint and drives a plateau scheduler (maximised)
    selection_metric: str = DEFAULT_SELECTION
    #: a benchmark's own evaluator of a whole stream, ``(preds, target, metadata) -> {name:
    #: value}`` (WILDS); known while the data is loaded, never saved in a checkpoint
    evaluator: Callable[..., dict[str, float]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # jsonargparse and checkpoints hand lists back; keep the dataclass hashable.
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "source_domains", tuple(self.source_domains))
        object.__setattr__(self, "target_domains", tuple(self.target_domains))
        object.__setattr__(self, "headline_metrics", tuple(self.headline_metrics))
        object.__setattr__(self, "streams", tuple((str(stage), tuple(names))
                                                  for stage, names in self.streams))

    @property
    def stages(self) -> dict[str, tuple[str, ...]]:
        """Evaluation streams by stage, in data-loader order."""
        if self.streams:
            return dict(self.streams)
        return {"val": self.source_domains, "oracle": self.target_domains, "test": self.target_domains}

    @property
    def validation_streams(self) -> list[tuple[str, int]]:
        """``(stage, index)`` of every validation data loader, in order."""
        return [(stage, i) for stage, names in self.stages.items() if stage != "test"
                for i in range(len(names))]

    @property
    def transductive(self) -> bool:
        """Training sees unlabeled images of the held-out domains."""
        return self.unlabeled == "target"

    def to_dict(self) -> dict[str, Any]:
        """The task as plain data (checkpoints load with ``weights_only=True``); the
        evaluator, a live object of the loaded data, is left out."""
        data = asdict(self)
        data.pop("evaluator")
        return data

    @property
    def num_domains(self) -> int:
        """Number of source (training) domains."""
        return len(self.source_domains)
