"""The test-time stage: runs an algorithm's ``adapt`` over each evaluation stream, restoring
the trained state between streams, and picks test-time hyperparameters on source data.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.errors import ConfigError

Reset = Literal["domain", "batch"]


class TestTimeStage:
    """Owns the snapshot of the trained state and the stream bookkeeping.

    ``reset="domain"``: adaptation is online within one domain's stream and reset between
    domains. ``reset="batch"``: episodic, every batch starts from the trained state.
    Either way, one domain's adaptation never reaches another domain's result, and the
    trained state is back in place when the evaluation ends.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, algorithm: Algorithm, reset: Reset = "domain"):
        if reset not in ("domain", "batch"):
            raise ConfigError("model.adaptation", f"{reset!r}", "domain, batch")
        self.algorithm, self.reset = algorithm, reset
        self._trained: dict[str, Any] | None = None
        self._stream: Any = None

    @property
    def active(self) -> bool:
        return self._trained is not None

    def begin(self, source: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        algo = self.algorithm
        was_training = algo.training
        algo.eval()
        with torch.no_grad():
            algo.prepare_adaptation(source)
        algo.train(was_training)
        self._trained = copy.deepcopy(algo.state_dict())
        self._stream = None

    def restore(self) -> None:
        if self._trained is not None:
            self.algorithm.load_state_dict(copy.deepcopy(self._trained))

    def restart(self) -> None:
        """The next ``predict`` starts a new stream from the trained state."""
        self._stream = None

    def end(self) -> None:
        self.restore()
        self._trained, self._stream = None, None

    def predict(self, stream: Any, x: Tensor) -> Tensor:
        """Adapted logits for a batch of ``stream`` (any hashable naming the domain)."""
        if self.reset == "batch" or stream != self._stream:
            self.restore()
            self._stream = stream
        with torch.enable_grad() if self.algorithm.needs_grad_at_test else torch.no_grad():
            return self.algorithm.adapt(x)


def grid(space: Mapping[str, list]) -> list[dict[str, Any]]:
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def select_hyperparameters(stage: TestTimeStage, space: Mapping[str, list],
                           streams: list[Iterable[tuple[Tensor, Tensor]]]) -> tuple[dict, list]:
    """Pick the test-time hyperparameters with the best mean accuracy over ``streams``
    (source validation data: never test labels). Returns the choice and every score."""
    algo = stage.algorithm
    for name in space:
        if not hasattr(algo, name):
            raise ConfigError("model.tta_grid", f"{type(algo).__name__} has no hyperparameter "
                              f"{name!r}", ", ".join(sorted(_public_attributes(algo))))
    device = next(algo.parameters()).device
    scores = []
    for config in grid(space):
        for name, value in config.items():
            setattr(algo, name, value)
        accuracies = []
        for index, stream in enumerate(streams):
            correct = total = 0
            for x, y, *_ in stream:
                x, y = x.to(device), y.to(device)
                pred = stage.predict(("select", index), x).argmax(1)
                correct += (pred == y).sum().item()
                total += len(y)
            accuracies.append(correct / max(total, 1))
        scores.append((config, sum(accuracies) / len(accuracies)))
        stage.restart()  # the next configuration starts from the trained state
    best = max(scores, key=lambda item: item[1])[0]  # grid() yields at least one config
    for name, value in best.items():
        setattr(algo, name, value)
    stage.restore()
    return best, scores


def _public_attributes(algo: Algorithm) -> list[str]:
    return [n for n, v in vars(algo).items()
            if not n.startswith("_") and isinstance(v, (int, float, str, bool))]


class TestOptimizerState:
    """Mixin for algorithms that own an optimizer used only at test time (ITTA's adaptive
    parameters, DRM's head retraining): its state travels in the module's state dict, so
    restoring the trained state between domains also resets the optimizer's moments."""

    __test__ = False  # not a pytest test class, despite its name
    _test_optimizer: torch.optim.Optimizer

    def _new_test_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def get_extra_state(self) -> dict:
        return {"test_optimizer": self._test_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self._test_optimizer = self._new_test_optimizer()
        if state and state.get("test_optimizer", {}).get("state"):
            self._test_optimizer.load_state_dict(state["test_optimizer"])
