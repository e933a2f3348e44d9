"""The default progress bar: Lightning's Rich bar, its training metrics read at most twice a
second.

Lightning's bar reads the logged metrics after every training batch, and reading them turns
each tensor into a Python number: on an accelerator the host then waits for the step to
finish before it can queue the next. On the CPU, where nothing waits, the bar still cost 0.6
of the loop's 2.2 ms of fixed cost at a 4 ms step (docs/benchmarks.md). Between reads the
bar shows the last values read; outside training batches (epoch ends, validation) every
read is fresh. The training loss it shows is the module's host copy of the latest step's
(``DGModule.last_loss``), since the module logs it only on the batches the loggers write.
"""

from __future__ import annotations

import time
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from dgkit.divergence import LOSS_KEY


class ThrottledProgressBar(RichProgressBar):
    def __init__(self, *args: Any, metrics_interval: float = 0.5, **kwargs: Any):
        """
        Args:
            metrics_interval: seconds between two reads of the metrics during training
                batches (0: every batch, as Lightning's bar); other arguments are
                ``RichProgressBar``'s.
        """
        super().__init__(*args, **kwargs)
        self.metrics_interval = metrics_interval
        self._in_batch = False
        self._read: tuple[float, dict[str, Any]] | None = None  # (when, metrics)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._in_batch = True
        try:
            super().on_train_batch_end(*args, **kwargs)
        finally:
            self._in_batch = False

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        now = time.monotonic()
        if not self._in_batch or self._read is None or now - self._read[0] >= self.metrics_interval:
            self._read = (now, super().get_metrics(trainer, pl_module))
        reading = getattr(pl_module, "last_loss", None)  # a host float: reading it waits for nothing
        if reading is None:
            return self._read[1]
        return {**self._read[1], LOSS_KEY: reading[0]}
