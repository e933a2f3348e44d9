"""Lines dependencies print on every run that carry no news for a dgkit user, silenced."""

from __future__ import annotations

import logging
import warnings

NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)`",  # torch's pytree deprecation, inside Lightning
    r"The `srun` command is available on your system but is not used",  # a login node
    r"LightningCLI's args parameter",  # main() always hands over the rewritten argv
    r"You're resuming from a checkpoint that ended before",  # samplers are positioned by dgkit
    # Evaluating from another folder: nothing is checkpointed then, nothing is lost.
    r"The dirpath has changed from",
    # The evaluation metrics are torchmetrics, reduced across ranks by their compute().
    r"It is recommended to use `self.log\(.*sync_dist=True\)` when logging on epoch level",
)
NOISE_LOGS = ("💡 Tip:",)  # Lightning's advertisement for its cloud logger


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE_LOGS)


def quiet_dependencies() -> None:
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
