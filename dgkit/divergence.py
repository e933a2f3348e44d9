"""Stop a run whose training loss explodes while staying finite.

A too-large learning rate rarely gives NaN at once: Adam at lr 1e6 trains for an hour at
losses around 1e14 and ends at chance. The module stops on a non-finite loss; this
callback stops on a loss that stays far above where it started. It reads the module's host
copy of each step's loss (``DGModule.last_loss``, one step late on CUDA), so that it never
makes the host wait for the device.
"""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer

from dgkit.errors import ConfigError, DGKitError

LOSS_KEY = "train/loss"


class DivergenceCheck(Callback):
    def __init__(self, factor: float = 1000.0, patience: int = 20):
        """
        Args:
            factor: stop when the training loss stays above this many times its starting
                value (the loss of the first step, before any update; at least 1); 0
                turns the check off.
            patience: consecutive steps the loss must stay above before the run stops.
        """
        if factor < 0 or (0 < factor <= 1):
            raise ConfigError("divergence.factor", f"{factor}", "0 (off) or > 1")
        if patience < 1:
            raise ConfigError("divergence.patience", f"{patience}", ">= 1")
        self.factor, self.patience = factor, patience
        self._start: float | None = None
        self._above = 0
        self._seen: tuple[float, int] | None = None  # the last reading counted

    def state_dict(self) -> dict[str, Any]:  # a resumed run keeps its starting value
        return {"start": self._start, "above": self._above}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start, self._above = state_dict["start"], int(state_dict["above"])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.factor:
            return
        reading = getattr(pl_module, "last_loss", None)
        if reading is None or reading is self._seen:  # none yet, or counted at the last batch
            return
        self._seen = reading
        loss, step = reading
        if self._start is None:
            self._start = loss
            return
        start = self._start
        limit = self.factor * max(abs(start), 1.0)
        self._above = self._above + 1 if loss > limit or not math.isfinite(loss) else 0
        if self._above >= self.patience:
            raise DGKitError(
                f"training diverged: {LOSS_KEY} has stayed above {self.factor:g}x its starting value "
                f"({start:.3g}) for {self.patience} steps (now {loss:.3g} at step {step}, "
                f"lr {_learning_rates(trainer)}). Lower the learning rate "
                "(--model.optimizer.init_args.lr), clip gradients (--model.clip_grad_norm 1.0), or "
                "turn this check off with --divergence.factor 0.")


def _learning_rates(trainer: Trainer) -> str:
    rates = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
    return ", ".join(f"{lr:g}" for lr in rates) or "?"
