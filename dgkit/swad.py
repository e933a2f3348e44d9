"""SWAD (Cha et al., NeurIPS 2021): dense averaging of the weights over the loss valley that
the trained model's validation loss traces, as khanrc/swad's ``LossValley`` finds it.

Between two validations the weights of every step are averaged into a segment; each segment
is judged by the validation loss of the trained model at its end. The valley opens at the
first window of ``n_converge`` segments whose first has the lowest loss, its threshold the
window's mean loss times ``1 + tolerance_ratio``; segments join the average while the lowest
loss of the next ``n_tolerance`` stays under the threshold, and the valley dies (training
stops) when it does not. The averaged model is the one tested."""

from __future__ import annotations

from collections import deque
from typing import Any

from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dgkit.averaging import Averaging, checkpoint_beside, norm_buffers, parameters_of
from dgkit.errors import ConfigError
from dgkit.plugins import register

LOSS = "val/cross_entropy"
FINAL_CHECKPOINT = "swad.ckpt"


class RunningMean:
    """An average of parameter dicts with the steps it spans (khanrc/swad's AveragedModel:
    the first update replaces what it was built from)."""

    def __init__(self, params: dict[str, Tensor], start: int = -1, end: int = -1, n: int = 0):
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.start, self.end, self.n = start, end, n

    def update(self, params: dict[str, Tensor], start: int, end: int) -> None:
        for k, v in params.items():
            if self.n == 0:
                self.params[k].copy_(v)
            else:
                self.params[k] += (v.to(self.params[k].dtype) - self.params[k]) / (self.n + 1)
        self.n += 1
        if self.n == 1:
            self.start = start
        self.end = end

    def state(self) -> dict[str, Any]:
        return {"params": self.params, "start": self.start, "end": self.end, "n": self.n}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningMean:
        return cls(state["params"], state["start"], state["end"], state["n"])


class LossValley:
    """The valley rule on segments ``{"params", "loss", "start", "end"}``, step for step as
    khanrc/swad's ``LossValley.update_and_evaluate`` and ``get_final_model``."""

    def __init__(self, n_converge: int, n_tolerance: int, tolerance_ratio: float):
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.recent: deque[dict[str, Any]] = deque(maxlen=max(n_converge, n_tolerance))
        self.final: RunningMean | None = None
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead = False

    def _converge_window(self) -> list[dict[str, Any]]:
        return list(self.recent)[-self.n_converge:]

    def _smooth_window(self) -> list[dict[str, Any]]:
        return list(self.recent)[-self.n_tolerance:]

    def _add(self, segment: dict[str, Any]) -> None:
        self.final.update(segment["params"], segment["start"], segment["end"])

    def push(self, segment: dict[str, Any]) -> None:
        if self.dead:
            return
        self.recent.append(segment)
        converge, smooth = self._converge_window(), self._smooth_window()
        if self.converge_step is None:
            if len(converge) < self.n_converge:
                return
            losses = [s["loss"] for s in converge]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                return
            self.converge_step = converge[0]["end"]
            self.final = RunningMean(converge[0]["params"])
            self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
            if self.n_tolerance < self.n_converge:
                for s in converge[1:1 + self.n_converge - self.n_tolerance]:
                    self._add(s)
            elif self.n_tolerance > self.n_converge:
                window = smooth[:self.n_tolerance - self.n_converge + 1]
                start = 0
                for i in reversed(range(len(window))):
                    if window[i]["loss"] > self.threshold:
                        start = i + 1
                        break
                for s in window[start + 1:]:
                    self._add(s)
            return
        if smooth[0]["end"] < self.converge_step:
            return
        if min(s["loss"] for s in smooth) > self.threshold:
            self.dead = True
            return
        self._add(smooth[0])

    def result(self) -> tuple[dict[str, Tensor], str]:
        """The averaged parameters and what they are (before the valley opens: the last segment)."""
        if self.converge_step is None:
            last = self.recent[-1]
            return last["params"], (f"not converged: the last segment (steps {last['start']}-{last['end']}) "
                                    "instead of a valley")
        if not self.dead:
            rest = self._smooth_window()[1:]
            while rest:
                if min(s["loss"] for s in rest) > self.threshold:
                    break
                self._add(rest.pop(0))
        final = self.final
        # N counts segment averages as khanrc/swad does (the first window's may count twice).
        return final.params, f"steps {final.start}-{final.end} (N={final.n})"

    def state(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "final": self.final.state() if self.final else None,
                "converge_step": self.converge_step, "threshold": self.threshold, "dead": self.dead}

    def load(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.final = RunningMean.from_state(state["final"]) if state["final"] else None
        self.converge_step, self.threshold = state["converge_step"], state["threshold"]
        self.dead = state["dead"]


@register("swad")
class SWAD(Averaging):
    """SWAD's dense averaging over the loss valley (khanrc/swad's defaults). Validation
    (``--trainer.val_check_interval``) ends each segment; the trained model is validated, the
    average is built at the end, its BatchNorm statistics recomputed, written as
    ``checkpoints/swad.ckpt`` and tested.

    Args:
        n_converge: segments in the window that must start with its lowest loss (3).
        n_tolerance: segments whose lowest loss must stay under the threshold (6).
        tolerance_ratio: the threshold above the converged window's mean loss (0.3).
        recompute_bn: see :class:`~dgkit.averaging.Averaging`.
    """

    validates_average = False
    needs_metrics = ("cross_entropy",)

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3,
                 recompute_bn: bool = True):
        for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if value < 1:
                raise ConfigError(f"model.averaging.{name}", f"{value}", ">= 1")
        if tolerance_ratio < 0:
            raise ConfigError("model.averaging.tolerance_ratio", f"{tolerance_ratio} is negative", ">= 0")
        super().__init__(recompute_bn)
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.segment_start: int | None = None
        self.outcome: str | None = None
        self._final: dict[str, Tensor] | None = None  # the average, with its BatchNorm statistics

    def update(self, algorithm: nn.Module, step: int) -> None:
        if self.segment_start is None:
            self.segment_start = step
        self.average.update_parameters(algorithm)

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.segment_start is None:
            return
        loss = trainer.callback_metrics.get(LOSS)
        if loss is None:
            raise ConfigError("model.metrics", f"SWAD reads {LOSS}, which validation did not log",
                              "a metrics list with cross_entropy")
        params = {k: v.cpu().clone() for k, v in parameters_of(self.average.module).items()}
        self.valley.push({"params": params, "loss": float(loss), "start": self.segment_start,
                          "end": trainer.global_step - 1})
        self.average.n_averaged.zero_()  # the next step starts a new segment
        self.segment_start = None
        if self.valley.dead:
            rank_zero_info(f"SWAD: the loss valley ended at step {self.valley.final.end}; training stops")
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.interrupted or not self.valley.recent:
            return
        algorithm = pl_module.algorithm
        params, self.outcome = self.valley.result()
        device = next(algorithm.parameters()).device
        self._load_parameters(algorithm, {k: v.to(device) for k, v in params.items()})
        self.refresh_batchnorm(trainer, pl_module)
        self._final = {**{k: v.clone() for k, v in parameters_of(algorithm).items()},
                       **norm_buffers(algorithm)}
        path = checkpoint_beside(trainer, FINAL_CHECKPOINT)
        if path is not None:
            trainer.save_checkpoint(path, weights_only=False)
            self.test_checkpoint = path
        algorithm.load_state_dict(self._last)  # the trained weights stay the module's
        rank_zero_info(f"SWAD: averaged {self.outcome}" + (f", kept as {path}" if path else ""))

    def evaluated_weights(self) -> dict[str, Tensor]:
        # Until the valley's average exists, checkpoints hold the validated trained model.
        return self._final or {}

    def method_state(self) -> dict[str, Any]:
        return {"valley": self.valley.state(), "segment_start": self.segment_start,
                "final": self._final, "outcome": self.outcome}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.valley.load(state["valley"])
        self.segment_start, self._final = state["segment_start"], state["final"]
        self.outcome = state["outcome"]

    def describe(self) -> str:
        return self.outcome or "no segment finished"

    def results_entries(self) -> dict[str, Any]:
        entries = super().results_entries()
        if entries and self.valley.converge_step is not None:
            entries["averaging"]["valley"] = {"converged_at": self.valley.converge_step,
                                              "threshold": self.valley.threshold, "ended": self.valley.dead}
        return entries

