"""Disambiguation of multi-hypothesis algorithms (DivDis, D-BAT): one head is chosen
before testing, on labelled data that is never the test images."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from dgkit.errors import ConfigError, DGKitError
from dgkit.results import ResultsContributor


class HeadSelection(Callback, ResultsContributor):
    """Before testing, hands ``algorithm.choose_head`` the labelled stream it asks for
    (``algorithm.selection_stream()``: ``val``, source validation, or ``oracle``, the
    held-out domains' oracle split) and keeps its report for the results."""

    def __init__(self) -> None:
        self.selection: dict[str, Any] | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        algorithm = pl_module.algorithm
        stream = algorithm.selection_stream()
        if stream is None:
            return
        if stream not in pl_module.task.stages:
            raise ConfigError("data.oracle", f"{type(algorithm).__name__} chooses its head on the "
                              f"{stream!r} streams, which this data module does not give", "true")
        loaders = validation_loaders(trainer, stream, f"{type(algorithm).__name__} chooses a head")
        device = pl_module.device
        batches = [(x.to(device), y.to(device)) for loader in loaders for x, y, *_ in loader]
        self.selection = algorithm.choose_head(batches)

    def results_entries(self) -> dict[str, Any]:
        return {"head_selection": self.selection} if self.selection else {}


def data_module_method(trainer: Trainer, method: str, why: str) -> Any:
    """``trainer.datamodule.<method>``, refused in one line when the data module has none
    (data given as bare loaders, or a data module other than ``DomainDataModule``)."""
    found = getattr(trainer.datamodule, method, None)
    if found is None:
        raise DGKitError(f"{why}: evaluate with a DomainDataModule (datamodule=...)")
    return found


def validation_loaders(trainer: Trainer, stage: str, why: str) -> list:
    """The data module's loaders of one validation stage (``DomainDataModule``'s
    ``validation_dataloaders``)."""
    return data_module_method(trainer, "validation_dataloaders", f"{why} on labelled validation data")(stage)
