"""The test-time stage: runs an algorithm's ``adapt``, or a test-time method over any
algorithm (``--tta``, ``dgkit.tta``), over each evaluation stream, restoring the trained
state between streams, and picks test-time hyperparameters on source data.

:class:`TestTimeStage` owns the trained-state snapshot and the streams;
:class:`TestTimeAdaptation` is the Lightning callback that opens and closes it around
validation, test and predict, and gives it the source data.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from dgkit.algorithm import Algorithm
from dgkit.distributed import average_gradients
from dgkit.errors import ConfigError, check_choice
from dgkit.heads import data_module_method, validation_loaders
from dgkit.results import ResultsContributor
from dgkit.tta import TestTimeMethod

Reset = Literal["domain", "batch"]


class TestTimeStage:
    """Owns the snapshot of the trained state and the stream bookkeeping.

    ``reset="domain"``: adaptation is online within one domain's stream and reset between
    domains. ``reset="batch"``: episodic, every batch starts from the trained state.
    Either way, one domain's adaptation never reaches another domain's result, and the
    trained state is back in place when the evaluation ends. With a ``method``, the method
    adapts the algorithm instead of the algorithm's own ``adapt``, and a frozen copy of the
    trained algorithm gives the un-adapted predictions.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, algorithm: Algorithm, reset: Reset = "domain", method: TestTimeMethod | None = None):
        check_choice(reset, Reset, "model.adaptation")
        self.algorithm, self.reset, self.method = algorithm, reset, method
        self._trained: dict[str, Any] | None = None
        self._stream: Any = None
        self._reference: Algorithm | None = None

    @property
    def needs_grad(self) -> bool:
        return self.method.needs_grad if self.method is not None else self.algorithm.needs_grad_at_test

    @property
    def tuned(self) -> Algorithm | TestTimeMethod:
        """What ``--model.tta_grid`` sets hyperparameters on."""
        return self.method if self.method is not None else self.algorithm

    @property
    def active(self) -> bool:
        return self._trained is not None

    def begin(self, source: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        algo = self.algorithm
        was_training = algo.training
        algo.eval()
        with torch.no_grad():
            algo.prepare_adaptation(source)
        if self.method is not None:
            with torch.enable_grad() if self.method.needs_grad else torch.no_grad():
                self.method.setup(algo, source)
            self._reference = copy.deepcopy(algo).requires_grad_(False)
        algo.train(was_training)
        self._trained = copy.deepcopy(algo.state_dict())
        self._stream = None
        if self.method is not None:
            self.method.reset(algo)

    def restore(self) -> None:
        if self._trained is not None:
            self.algorithm.load_state_dict(copy.deepcopy(self._trained))
            if self.method is not None:
                self.method.reset(self.algorithm)
                self.method.reset_requested = False

    def restart(self) -> None:
        """The next ``predict`` starts a new stream from the trained state."""
        self._stream = None

    def end(self) -> None:
        self.restore()
        self._trained, self._stream, self._reference = None, None, None

    def unadapted(self, x: Tensor) -> Tensor:
        """The trained model's logits, whatever the stream's adaptation has changed."""
        model = self._reference if self._reference is not None else self.algorithm
        model.train(self.algorithm.training)
        return model(x)

    def predict(self, stream: Any, x: Tensor) -> Tensor:
        """Adapted logits for a batch of ``stream`` (any hashable naming the domain)."""
        if self.reset == "batch" or stream != self._stream:
            self.restore()
            self._stream = stream
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            if self.method is None:
                return self.algorithm.adapt(x)
            logits = self.method.adapt(self.algorithm, x)
        if self.method.reset_requested:  # collapsed (SAR's recovery): back to the trained state
            self.restore()
        return logits


def grid(space: Mapping[str, list]) -> list[dict[str, Any]]:
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def select_hyperparameters(stage: TestTimeStage, space: Mapping[str, list],
                           streams: list[Iterable[tuple[Tensor, Tensor]]]) -> tuple[dict, list]:
    """Pick the test-time hyperparameters with the best mean accuracy over ``streams``
    (source validation data: never test labels). Returns the choice and every score."""
    algo = stage.tuned
    for name in space:
        if not hasattr(algo, name) or name.startswith("_"):
            raise ConfigError("model.tta_grid", f"{type(algo).__name__} has no hyperparameter "
                              f"{name!r}", ", ".join(sorted(_public_attributes(algo))))
    device = next(stage.algorithm.parameters()).device
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


def _public_attributes(algo: Algorithm | TestTimeMethod) -> list[str]:
    return [n for n, v in vars(algo).items()
            if not n.startswith("_") and isinstance(v, (int, float, str, bool))]


class TestTimeAdaptation(Callback, ResultsContributor):
    """Runs the test-time stage of an algorithm that ``adapts_at_test``, or of a test-time
    ``method`` over any algorithm, during test and predict (and validation with
    ``adapt_validation``); with ``grid``, first picks its test-time hyperparameters by
    adapted accuracy on source validation streams. While the stage is open the module
    predicts through it (``pl_module.test_time``)."""

    __test__ = False

    def __init__(self, algorithm: Algorithm, reset: Reset = "domain", adapt_validation: bool = False,
                 grid: Mapping[str, list] | None = None, method: TestTimeMethod | None = None):
        self.stage = TestTimeStage(algorithm, reset, method)
        self.adapt_validation, self.grid = adapt_validation, grid
        self.selection: dict | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.stage.needs_grad:
            # The stage takes gradients: evaluate under no_grad (which adapt() lifts with
            # enable_grad) instead of inference_mode, whose tensors refuse autograd. No public
            # switch per loop exists (Trainer(inference_mode=...) is set before the model).
            for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop,
                         trainer.fit_loop.epoch_loop.val_loop):
                loop.inference_mode = False

    def _open(self, trainer: Trainer, pl_module: LightningModule, include_holdout: bool) -> None:
        source_loader = data_module_method(
            trainer, "source_eval_dataloader",
            f"{type(self.stage.algorithm).__name__} adapts at test time and needs the source domains")

        def source():
            for x, y, *_ in source_loader(include_holdout):
                yield x.to(pl_module.device), y.to(pl_module.device)

        self.stage.begin(source)
        pl_module.test_time = self.stage

    def _close(self, pl_module: LightningModule) -> None:
        self.stage.end()
        pl_module.test_time = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.adapt_validation:
            self._open(trainer, pl_module, include_holdout=False)  # never the validation samples

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.grid:
            self._open(trainer, pl_module, include_holdout=False)
            streams = validation_loaders(trainer, "val", "--model.tta_grid selects")
            chosen, scores = select_hyperparameters(self.stage, self.grid, streams)
            self._close(pl_module)
            self.selection = {"chosen": chosen, "validation_accuracy": [
                {"config": c, "accuracy": a} for c, a in scores]}
        self._open(trainer, pl_module, include_holdout=True)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._open(trainer, pl_module, include_holdout=True)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(pl_module)

    def results_entries(self) -> dict[str, Any]:
        entries: dict[str, Any] = {"test_time_selection": self.selection} if self.selection else {}
        method = self.stage.method
        if method is not None:
            from dgkit.plugins import registry

            found = registry("tta").find(type(method))
            entries["test_time"] = {"method": found.alias if found else type(method).__name__,
                                    "settings": method.settings(), "reset": self.stage.reset}
        return entries


class TestOptimizerState:
    """Mixin for algorithms that own an optimizer used only at test time (ITTA's adaptive
    parameters, DRM's head retraining): its state travels in the module's state dict, so
    restoring the trained state between domains also resets the optimizer's moments."""

    __test__ = False  # not a pytest test class, despite its name
    _test_optimizer: torch.optim.Optimizer

    def _new_test_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def test_time_step(self, loss: Tensor, params: list[Tensor], across_ranks: bool = True) -> None:
        """One update of the test optimizer on ``loss`` w.r.t. ``params``; with
        ``across_ranks``, the ranks of a DDP evaluation update as one, on the global batch
        (every rank must then call it equally often)."""
        self._test_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        if across_ranks:
            average_gradients(params)
        self._test_optimizer.step()

    def get_extra_state(self) -> dict:
        return {"test_optimizer": self._test_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self._test_optimizer = self._new_test_optimizer()
        if state and state.get("test_optimizer", {}).get("state"):
            # The moments are the checkpoint's; the lr is this run's (a test-time
            # hyperparameter the command may change), not the one saved with the moments.
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in self._test_optimizer.param_groups]
            self._test_optimizer.load_state_dict(state["test_optimizer"])
            for group, settings in zip(self._test_optimizer.param_groups, fresh, strict=True):
                group.update(settings)
