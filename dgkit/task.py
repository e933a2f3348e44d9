"""What an algorithm needs to know about the data before it builds its networks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """Shape of the problem, derived by the data module and linked into the model.

    ``source_domains`` are the training domains in the order of ``Batch.domain`` indices;
    ``target_domains`` are held out.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    source_domains: tuple[str, ...]
    target_domains: tuple[str, ...] = ()
    default_backbone: str = "resnet50"
    dataset: str = ""

    def __post_init__(self) -> None:
        # jsonargparse and checkpoints hand lists back; keep the dataclass hashable.
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "source_domains", tuple(self.source_domains))
        object.__setattr__(self, "target_domains", tuple(self.target_domains))

    @property
    def num_domains(self) -> int:
        """Number of source (training) domains."""
        return len(self.source_domains)
