"""Weight averaging over any algorithm's training (``--model.averaging ema|sma|swad``): an
averaged copy of the algorithm's parameters is kept beside training, its BatchNorm
statistics recomputed on the source training data before it is evaluated, and it is the
model that is validated, selected, checkpointed and tested; the last iterate is tested
beside it (``test_last/...``).

Built on torch's ``AveragedModel`` (the ecosystem's average) and Lightning's checkpoint
convention for averaged weights (``state_dict``: the average, ``current_model_state``: the
trained weights, as ``lightning.pytorch.callbacks.WeightAveraging`` writes them). Lightning's
own callback is not used as it is: it averages buffers (BatchNorm statistics of an average
are recomputed here, and buffers that are state, AdaNPC's memory or GroupDRO's weights,
stay the trained model's), and a checkpoint tested after ``fit`` would give back the
trained weights instead of the average.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from dgkit.errors import ConfigError
from dgkit.heads import data_module_method
from dgkit.hookspecs import hookimpl
from dgkit.plugins import register, registered_in
from dgkit.results import ResultsContributor
from dgkit.rng import rng_states, set_rng_states

CHECKPOINT_KEY = "dgkit_averaging"
TRAINED_KEY = "current_model_state"  # Lightning's WeightAveraging names the trained weights so


def parameters_of(module: nn.Module) -> dict[str, Tensor]:
    """The parameters by name, read through ``state_dict`` so that modules deriving some
    from others when saved (Bonsai's averaged head) give them as they would save them."""
    state = module.state_dict(keep_vars=True)
    return {name: state[name].detach() for name, _ in module.named_parameters()}


def state_copy(module: nn.Module) -> dict[str, Any]:
    """A copy of ``module``'s state dict (tensors and the extra state some modules keep)."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for k, v in module.state_dict().items()}


def norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def norm_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The BatchNorm statistics of ``module`` by state-dict name (copies)."""
    layers = {id(m) for m in norm_layers(module)}
    return {f"{name}.{b}" if name else b: getattr(m, b).detach().clone()
            for name, m in module.named_modules() if id(m) in layers
            for b in ("running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Running statistics of every BatchNorm layer as the cumulative mean over ``batches``
    (torch's ``update_bn``, with the rest of the model in eval mode so dropout draws no
    random numbers). Returns how many images went through (0: no BatchNorm, nothing run)."""
    layers = norm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    model.eval()
    momenta = {}
    for layer in layers:
        layer.reset_running_stats()
        momenta[layer], layer.momentum = layer.momentum, None
        layer.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for layer in layers:
        layer.momentum = momenta[layer]
    model.train(was_training)
    return seen


class Averaging(Callback, ResultsContributor):
    """What every averaging method shares; a method says how the average is updated
    (``update``) and, if it is not the one validated as it goes, which average it ends with
    (``final_average``).

    Args:
        recompute_bn: recompute the averaged model's BatchNorm statistics on the source
            training data (every source domain's training split, in evaluation order, no
            augmentation) before each evaluation of it.
    """

    #: the average is what validation sees (EMA, SMA); SWAD validates the trained model,
    #: whose validation loss decides where the average starts and ends
    validates_average = True
    #: metrics the method reads from validation, added to the run's metrics
    needs_metrics: tuple[str, ...] = ()

    def __init__(self, recompute_bn: bool = True):
        self.recompute_bn = recompute_bn
        self.average: AveragedModel | None = None
        self._trained: dict[str, Tensor] | None = None  # swapped out while the average is evaluated
        self._evaluated_buffers: dict[str, Tensor] | None = None
        self._last: dict[str, Tensor] | None = None  # the last iterate's weights, after fit
        self.last_model: nn.Module | None = None
        self.test_checkpoint: str | None = None  # set by methods that end with their own model
        self.tested: str | None = None  # what the tested checkpoint's average spans

    # --- what a method defines ---------------------------------------------------------
    def multi_avg_fn(self) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
        """The ``AveragedModel`` update over all parameters at once (here the running mean).
        Passed explicitly because without one ``AveragedModel`` takes foreach kernels only on
        accelerators and on CPU loops over the parameters in Python: 2 ms against 0.2 ms per
        update of dgkit's `mlp`."""
        return get_swa_multi_avg_fn()

    def update(self, algorithm: nn.Module, step: int) -> None:
        """After every training step (0-based ``step``), called by the module once the step's
        updates are done: before any callback (``last.ckpt``'s included) sees the batch end."""
        self.average.update_parameters(algorithm)

    def evaluated_weights(self) -> dict[str, Tensor]:
        """What a checkpoint's ``state_dict`` holds instead of the trained weights: the
        average's parameters, with the BatchNorm statistics its last evaluation computed."""
        return {**parameters_of(self.average.module), **(self._evaluated_buffers or {})}

    def method_state(self) -> dict[str, Any]:
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return f"{type(self).__name__} of {int(self.average.n_averaged)} steps"

    # --- training ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.average is None:
            self.average = AveragedModel(pl_module.algorithm, multi_avg_fn=self.multi_avg_fn(),
                                         use_buffers=False)
            self.average.requires_grad_(False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = state_copy(pl_module.algorithm)

    # --- evaluating the average ----------------------------------------------------------
    def _source_images(self, trainer: Trainer, device: torch.device) -> Iterable[Tensor]:
        loader = data_module_method(trainer, "source_eval_dataloader",
                                    "recomputing the average's BatchNorm statistics needs the source data")
        for x, *_ in loader(include_holdout=False):
            yield x.to(device)

    def swap_in(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the average's parameters (and freshly computed BatchNorm statistics) into the
        algorithm; ``swap_out`` puts the trained ones back."""
        algorithm = pl_module.algorithm
        self._trained = state_copy(algorithm)
        self._load_parameters(algorithm, parameters_of(self.average.module))
        self.refresh_batchnorm(trainer, pl_module)
        self._evaluated_buffers = norm_buffers(algorithm)

    def refresh_batchnorm(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The algorithm's BatchNorm statistics recomputed for the weights it now holds."""
        if self.recompute_bn and norm_layers(pl_module.algorithm):
            states = rng_states()  # the data order and dropout of training stay as they were
            recompute_batchnorm(pl_module.algorithm, self._source_images(trainer, pl_module.device))
            set_rng_states(states)

    def swap_out(self, pl_module: LightningModule) -> None:
        if self._trained is not None:
            pl_module.algorithm.load_state_dict(self._trained)
            self._trained = None

    @staticmethod
    def _load_parameters(algorithm: nn.Module, values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in algorithm.named_parameters():
                p.copy_(values[name])

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.validates_average and self.average is not None and trainer.state.fn == "fit":
            self.swap_in(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.swap_out(pl_module)

    # --- checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.average is None:  # a checkpoint written outside fit holds what it evaluates
            return
        trained = checkpoint["state_dict"]
        evaluated = dict(trained)
        averaged = self.evaluated_weights()
        for name, value in averaged.items():
            evaluated[f"algorithm.{name}"] = value.clone()
        checkpoint["state_dict"], checkpoint[TRAINED_KEY] = evaluated, trained
        checkpoint[CHECKPOINT_KEY] = {"method": type(self).__name__,
                                      "average": self.average.state_dict(),
                                      "evaluated_buffers": self._evaluated_buffers,
                                      "state": self.method_state(), "averaged": self.describe()}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if trainer.state.fn != "fit":
            # Testing: the checkpoint's state_dict is the average; its trained weights
            # are the last iterate tested beside it (unless this fit just kept its own).
            self.tested = (saved or {}).get("averaged")
            if self._last is None and TRAINED_KEY in checkpoint:
                self._last = {k.removeprefix("algorithm."): v for k, v in checkpoint[TRAINED_KEY].items()
                              if k.startswith("algorithm.")}
            return
        if saved is None:
            raise ConfigError("ckpt_path", "the checkpoint was written without weight averaging, so "
                              "the average cannot resume", "resume without --model.averaging, or start anew")
        if saved["method"] != type(self).__name__:
            raise ConfigError("model.averaging", f"the checkpoint averages with {saved['method']}, "
                              f"this run with {type(self).__name__}", saved["method"].lower())
        self.average.load_state_dict(saved["average"])
        self._evaluated_buffers = saved.get("evaluated_buffers")
        self.load_method_state(saved["state"])
        pl_module.load_state_dict(checkpoint[TRAINED_KEY])

    # --- testing ----------------------------------------------------------------------
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_model = None
        if self._last is not None:
            self.last_model = copy.deepcopy(pl_module.algorithm)
            self.last_model.load_state_dict(self._last)
            self.last_model.eval()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_model = None

    def results_entries(self) -> dict[str, Any]:
        if self.average is None and self.tested is None:
            return {}
        return {"averaging": {"method": type(self).__name__, "averaged": self.tested or self.describe(),
                              "recompute_bn": self.recompute_bn}}


@register("ema")
class EMA(Averaging):
    """Exponential moving average of the weights, updated every step: ``avg = d * avg +
    (1 - d) * w``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates when
    ``warmup`` (timm's and TensorFlow's ramp, so early averages are not mostly the initial
    weights).

    Args:
        decay: the decay ``d`` (0 < d < 1).
        warmup: ramp the decay up over the first updates.
        recompute_bn: see :class:`Averaging`.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, recompute_bn: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError("model.averaging.decay", f"{decay}", "0 < decay < 1, e.g. 0.999")
        super().__init__(recompute_bn)
        self.decay, self.warmup = decay, warmup

    def multi_avg_fn(self) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
        if not self.warmup:
            return get_ema_multi_avg_fn(self.decay)

        def ramped(averaged: list[Tensor], current: list[Tensor], n: Tensor) -> None:
            count = int(n)  # read once per update, not once per parameter
            get_ema_multi_avg_fn(min(self.decay, (1.0 + count) / (10.0 + count)))(averaged, current, n)
        return ramped


@register("sma")
class SMA(Averaging):
    """Simple moving average of the weights from step ``start`` on (Arpit et al.'s, the members
    of an ensemble of averages); before it the average follows the weights, and the weights of
    the step before ``start`` are its first member, as in salesforce/ensemble-of-averages.

    Args:
        start: the first averaged step (EoA's ``sma_start_iter``, 100).
        recompute_bn: see :class:`Averaging`.
    """

    def __init__(self, start: int = 100, recompute_bn: bool = True):
        if start < 0:
            raise ConfigError("model.averaging.start", f"{start} is negative", ">= 0")
        super().__init__(recompute_bn)
        self.start = start

    def update(self, algorithm: nn.Module, step: int) -> None:
        if step < self.start:
            self._load_parameters(self.average.module, parameters_of(algorithm))
            self.average.n_averaged.fill_(1)
        else:
            self.average.update_parameters(algorithm)

    def describe(self) -> str:
        return f"SMA of {max(int(self.average.n_averaged) - 1, 0)} steps from step {self.start}"


@hookimpl
def dgkit_averaging():
    return registered_in(__name__, "dgkit.swad")


def checkpoint_beside(trainer: Trainer, name: str) -> str | None:
    """A checkpoint path in the run's checkpoint folder, or None without one."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.dirpath:
        return None
    return os.path.join(callback.dirpath, name)
