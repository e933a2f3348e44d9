"""What an algorithm needs to know about the data before it builds its networks."""

from __future__ import annotations

from dataclasses import dataclass


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
    def num_domains(self) -> int:
        """Number of source (training) domains."""
        return len(self.source_domains)
