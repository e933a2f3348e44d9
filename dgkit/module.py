"""DGModule: the one LightningModule that trains, evaluates and checkpoints any Algorithm.

It holds the training step and the optimizer wiring. What an algorithm opts into is a
component the module composes (Lightning callbacks, see ``configure_callbacks``): the
progress clock and stages (``dgkit.stages``), head selection (``dgkit.heads``), the
test-time stage (``dgkit.adaptation``) and ``init_from`` (``dgkit.representation``); the
per-stream metrics are ``dgkit.evaluation``. Data facts reach it through the ``Task``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dgkit.adaptation import TestTimeAdaptation, TestTimeStage
from dgkit.algorithm import Algorithm, Batch, Optimization
from dgkit.averaging import Averaging
from dgkit.errors import ConfigError, DGKitError
from dgkit.evaluation import LAST, UNADAPTED, StreamMetrics
from dgkit.explain import algorithm_mismatch
from dgkit.heads import HeadSelection
from dgkit.host_scalar import HostScalar, Reading
from dgkit.networks import Backbone, speed_up
from dgkit.plugins import qualified_name, registry
from dgkit.rank_agreement import RankAgreement
from dgkit.representation import CHECKPOINT_KEY, InitFrom, representation_prefixes
from dgkit.rng import rng_states, set_rng_states
from dgkit.stages import Stages
from dgkit.task import Task
from dgkit.tta import TestTimeMethod

AlgorithmFactory = Callable[[Task, Backbone], Algorithm]
AveragingFactory = Callable[[], Averaging]
TestTimeFactory = Callable[[], TestTimeMethod]


class DGModule(LightningModule):
    def __init__(
        self,
        algorithm: AlgorithmFactory | None = None,
        task: Task | dict | None = None,
        backbone: str = "auto",
        pretrained: bool | str | None = None,
        dropout: float = 0.0,
        freeze_bn: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        clip_grad_norm: float | None = None,
        metrics: list[str] | None = None,
        adaptation: Literal["domain", "batch"] = "domain",
        adapt_validation: bool = False,
        tta_grid: dict[str, list] | None = None,
        init_from: str | None = None,
        freeze_featurizer: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        averaging: AveragingFactory | None = None,
        tta: TestTimeFactory | None = None,
    ):
        """
        Args:
            algorithm: the DG algorithm (``--algo ALIAS`` picks one; its own
                hyperparameters are ``--model.algorithm.<name>``).
            task: input shape, classes and domains; linked from the data module.
            backbone: ``auto`` (the data set's default), ``mnist_cnn`` (``mnist_cnn_bn``:
                with BatchNorm), ``mlp``, any timm model
                name, or ``torchvision/<name>``.
            pretrained: load pretrained weights from the hub (``true``) or a local file;
                default: the data set's choice (ImageNet weights for the photo data sets,
                as DomainBed and the papers start; none for the digits).
            dropout: dropout on the features (DomainBed's ``resnet_dropout``).
            freeze_bn: keep BatchNorm running statistics fixed (as DomainBed does).
            optimizer: optimizer class and its arguments (lr, weight_decay, ...).
            lr_scheduler: optional learning-rate scheduler on the main optimizer.
            scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
            clip_grad_norm: clip the gradient norm to this value (any algorithm).
            metrics: per-domain metrics to compute (registered names); default accuracy.
            adaptation: for algorithms with a test-time stage: ``domain`` adapts online
                along each domain's stream and resets between domains; ``batch`` resets
                before every batch (episodic). Trained weights are always restored.
            adapt_validation: run the test-time stage on validation streams too (with
                source training data only), to select by adapted validation accuracy.
            tta_grid: test-time hyperparameters to choose before testing, e.g.
                ``{k: [10, 100], temperature: [0.05, 0.1]}``; chosen by adapted accuracy
                on the source validation splits, never on test labels.
            init_from: a checkpoint whose representation initializes this algorithm
                before training (e.g. a Bonsai run's): its featurizer goes into every
                featurizer, its classifier (if any) into the task classifiers. Applied
                at the start of ``fit`` only; resuming and evaluating use the checkpoint
                being resumed or evaluated.
            freeze_featurizer: keep the featurizers fixed (weights and BatchNorm
                statistics); only heads train. With ``init_from``, the "(cf)" protocol.
            channels_last: run the featurizers' convolutions in the channels-last memory
                layout (faster on recent GPUs, mostly with ``--trainer.precision
                bf16-mixed``).
            compile: compile every featurizer with ``torch.compile`` (the first steps are
                slow while it compiles; not for algorithms that differentiate twice
                through the featurizer: UDIM, ITTA).
            averaging: average the weights while training (``ema``, ``sma``, ``swad``; their
                own settings are ``--model.averaging.<name>``): the average is validated,
                checkpointed and tested, the last iterate tested beside it (``test_last``).
            tta: a test-time method over the trained model (``tent``, ``t3a``, ``bn``, ...;
                ``--tta ALIAS``, its settings ``--model.tta.<name>``): test and predict
                adapt with it, the un-adapted model tested beside it (``test_unadapted``);
                it replaces an algorithm's own test-time stage (ITTA's, AdaNPC's).
        """
        super().__init__()
        self.save_hyperparameters()
        if algorithm is None:
            raise ConfigError("model.algorithm", "no algorithm given",
                              "--algo " + "|".join(e.alias for e in registry("algorithm")))
        if task is None:
            raise ConfigError("model.task", "the model needs the data's task (input shape, "
                              "classes, domains)", "DomainDataModule(...).task")
        self.task = Task(**task) if isinstance(task, Mapping) else task
        self.hparams["task"] = self.task.to_dict()  # plain data in the checkpoint
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ConfigError("model.clip_grad_norm", f"{clip_grad_norm}", "> 0 or null")
        if freeze_featurizer and init_from is None:
            raise ConfigError("model.freeze_featurizer", "freezes a random featurizer",
                              "together with --model.init_from CKPT")
        _check_optimizer(optimizer)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.backbone_spec = Backbone(backbone, pretrained, dropout, freeze_bn)
        self.algorithm = algorithm(self.task, self.backbone_spec)
        if not isinstance(self.algorithm, Algorithm):
            raise ConfigError("model.algorithm", f"{type(self.algorithm).__name__} is not a "
                              "dgkit Algorithm", "subclasses of dgkit.Algorithm")
        self.automatic_optimization = not self.algorithm.manual_optimization
        if compile and self.algorithm.differentiates_twice:
            raise ConfigError("model.compile", f"{type(self.algorithm).__name__} differentiates "
                              "twice through its featurizer, which torch.compile does not support",
                              "false for this algorithm")
        speed_up(self.algorithm, channels_last, compile)
        # Lightning's model summary measures FLOPs (and sizes) on it.
        self.example_input_array = torch.zeros(1, *self.task.input_shape)
        self.averaging = averaging() if averaging is not None else None
        metrics = list(metrics or ["accuracy"])
        metrics += [m for m in (self.averaging.needs_metrics if self.averaging else ()) if m not in metrics]
        method = tta() if tta is not None else None
        adapts = self.algorithm.adapts_at_test or method is not None
        self.metrics = StreamMetrics(self.task, metrics, self.algorithm.num_heads,
                                     unadapted=adapts, last=self.averaging is not None)
        #: the open test-time stage while one runs (set by TestTimeAdaptation)
        self.test_time: TestTimeStage | None = None
        self._host_loss = HostScalar()
        #: the latest training loss read on the host and its step (one step late on CUDA)
        self.last_loss: Reading | None = None
        # Made once: Lightning asks configure_callbacks again for every fit/test call, and
        # their state (finished stages, choices made) must outlive each.
        self.components: list[Callback] = [Stages(), HeadSelection(), RankAgreement()]
        if adapts:
            self.components.append(TestTimeAdaptation(self.algorithm, adaptation, adapt_validation,
                                                      tta_grid, method))
        if init_from is not None:
            self.components.append(InitFrom(init_from, freeze_featurizer))
        if self.averaging is not None:
            self.components.append(self.averaging)

    def configure_callbacks(self) -> list[Callback]:
        # Asked again by every trainer.fit/test: the components already attached stay.
        attached = self.trainer.callbacks
        return [c for c in self.components if all(c is not a for a in attached)]

    # --- optimization -----------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        main = self.optimizer_factory(self.algorithm.parameter_groups())
        for group in main.param_groups:  # a group's lr_scale multiplies the configured lr
            group["lr"] *= group.get("lr_scale", 1.0)
        extra = self.algorithm.extra_optimizers(self._make_optimizer)
        if extra and self.automatic_optimization:
            raise DGKitError(f"{type(self.algorithm).__name__} defines extra optimizers; it "
                             "must set manual_optimization = True")
        if self.lr_scheduler_factory is None:
            return [main, *extra]
        scheduler = {"scheduler": self.lr_scheduler_factory(main),
                     "interval": self.hparams.scheduler_interval,
                     "monitor": self.task.selection_metric}
        return [main, *extra], [scheduler]

    def _make_optimizer(self, params: Any, lr_scale: float = 1.0, **overrides: Any
                        ) -> torch.optim.Optimizer:
        opt = self.optimizer_factory(params)
        for group in opt.param_groups:
            group["lr"] *= lr_scale
            group.update(overrides)
        return opt

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.hparams.clip_grad_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.clip_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _optimization(self) -> Optimization:
        optimizers = self.optimizers()
        optimizers = list(optimizers) if isinstance(optimizers, list) else [optimizers]
        return Optimization(optimizers, self.manual_backward, self._manual_step, self._no_sync,
                            self._make_optimizer)

    def _manual_step(self, optimizer, count: bool) -> bool:
        if self.hparams.clip_grad_norm is not None:
            self.clip_gradients(optimizer, self.hparams.clip_grad_norm, "norm")
        if count and isinstance(optimizer, LightningOptimizer):
            optimizer.step()
            return True
        # Further steps in the same batch go around Lightning's counter, so global_step
        # (and max_steps) count batches, not optimizer calls.
        getattr(optimizer, "optimizer", optimizer).step()
        return False

    def _no_sync(self) -> contextlib.AbstractContextManager:
        strategy = self.trainer.strategy
        block = getattr(strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _step_schedulers(self, interval: str) -> None:
        if self.automatic_optimization or self.lr_scheduler_factory is None:
            return
        if self.hparams.scheduler_interval != interval:
            return
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.trainer.callback_metrics.get(self.task.selection_metric)
            if value is not None:
                scheduler.step(value)
        else:
            scheduler.step()

    # --- training ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A lagged non-finite loss stops the run before its weights overwrite a checkpoint.
        self._read_loss(self._host_loss.flush())
        checkpoint["dgkit_rng"] = rng_states()  # dropout and the algorithm's own draws
        checkpoint["dgkit_algorithm"] = qualified_name(type(self.algorithm))
        prefixes = representation_prefixes(self.algorithm)
        if prefixes is not None:
            checkpoint[CHECKPOINT_KEY] = prefixes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        written_by = checkpoint.get("dgkit_algorithm")
        mine = qualified_name(type(self.algorithm))
        if written_by is not None and written_by != mine:
            path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise algorithm_mismatch(path, written_by, mine, "this run builds")
        trainer = self._trainer
        if "dgkit_rng" in checkpoint and trainer is not None and trainer.state.fn == "fit":
            set_rng_states(checkpoint["dgkit_rng"])  # resuming: continue the same random stream

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        b = as_batch(batch)
        if self.automatic_optimization:
            out = self.algorithm.training_loss(b)
        else:
            out = self.algorithm.training_update(b, self._optimization())
        loss, extras = _split_output(out, type(self.algorithm).__name__)
        self._read_loss(self._host_loss.push(loss, self.global_step))
        if self._logs_this_batch():
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(b))
            for key, value in extras.items():
                self.log(f"train/{key}", value.detach() if torch.is_tensor(value) else value,
                         batch_size=len(b))
        if not self.automatic_optimization:
            self._averaging_update(self.global_step - 1)  # the batch's steps are counted
            self._step_schedulers("step")
            return None
        return loss

    def _logs_this_batch(self) -> bool:
        """Whether the loggers write this batch's step metrics (Lightning's rule: every
        ``log_every_n_steps`` optimizer steps, counted in batches that step, or when the run
        stops). Lightning's ``self.log`` moves its stored result to the value's device at every
        call, a fixed cost of the loop's step that buys nothing on the batches no logger
        writes; the progress bar shows the host copy of each step's loss instead."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        if not every:
            return False
        stepped = trainer.fit_loop.total_batch_idx // (trainer.accumulate_grad_batches
                                                       if self.automatic_optimization else 1)
        return (stepped + 1) % every == 0 or trainer.should_stop

    def _read_loss(self, reading: Reading | None) -> None:
        if reading is None:
            return
        value, step = reading
        if not math.isfinite(value):
            raise DGKitError(
                f"{type(self.algorithm).__name__} produced a non-finite loss ({value}) at "
                f"step {step}. Lower the learning rate or enable gradient clipping "
                "(--model.clip_grad_norm)."
            )
        self.last_loss = reading

    def on_train_end(self) -> None:
        self._read_loss(self._host_loss.flush())  # the last step's, on CUDA

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._averaging_update(self.global_step)  # Lightning counts this step after the hook

    def _averaging_update(self, step: int) -> None:
        if self.averaging is not None and self.averaging.average is not None:
            self.averaging.update(self.algorithm, step)

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    # --- evaluation -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.algorithm(x)

    def _evaluate(self, stage: str, index: int, batch: Any) -> None:
        x, y = batch[0], batch[1]
        # WILDS streams carry metadata, which only the official evaluators take.
        extra = {"metadata": batch[2]} if len(batch) > 2 else {}
        if self.test_time is not None:
            if stage == "test" and UNADAPTED in self.metrics:
                self.metrics.update(UNADAPTED, index, self.test_time.unadapted(x), y, **extra)
            logits = self.test_time.predict((stage, index), x)
        else:
            logits = self.algorithm(x)
        last = self.averaging.last_model if self.averaging is not None else None
        if stage == "test" and last is not None:
            self.metrics.update(LAST, index, last(x), y, **extra)
        heads = self.algorithm.head_logits(x) if self.metrics.tracks_heads else None
        self.metrics.update(stage, index, logits, y, heads=heads, **extra)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(*self.task.validation_streams[dataloader_idx], batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", dataloader_idx, batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x = batch[0]
        tta = self.test_time
        logits = tta.predict(("predict", dataloader_idx), x) if tta is not None else self.algorithm(x)
        return {"logits": logits, "prediction": logits.argmax(1),
                "domain": self.task.stages["test"][dataloader_idx]}

    def setup(self, stage: str) -> None:
        name = type(self.algorithm).__name__
        if self.algorithm.differentiates_twice and str(self.trainer.precision).startswith("16"):
            raise ConfigError("trainer.precision", f"{name}'s double backward is unstable in fp16",
                              "bf16-mixed, 32")
        strategy = self.trainer.strategy
        if self.algorithm.trains_in_stages and isinstance(strategy, DDPStrategy):
            # Before the strategy wraps the model in DDP (after this hook); the user's plain
            # --trainer.strategy ddp would otherwise stop at the first idle parameter. The
            # strategy offers no public setter once built.
            if not strategy._ddp_kwargs.get("find_unused_parameters"):
                strategy._ddp_kwargs["find_unused_parameters"] = True
                rank_zero_info(f"{name} trains in stages, leaving some parameters out of some "
                               "steps: DDP runs with find_unused_parameters=True")

    def on_validation_epoch_end(self) -> None:
        logged = self._log_metrics(tuple(s for s in self.metrics.streams if not s.startswith("test")))
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.algorithm.on_validation_metrics(
                {k: float(v) for k, v in logged.items() if k.startswith("val/")})

    def on_test_epoch_end(self) -> None:
        self._log_metrics(("test", UNADAPTED, LAST))

    def _log_metrics(self, stages: tuple[str, ...]) -> dict[str, Tensor]:
        logged = self.metrics.compute(stages)
        for key, value in logged.items():
            # Already reduced across ranks by torchmetrics: Lightning need not sync again.
            self.log(key, value, sync_dist=False, prog_bar=key.count("/") == 1 and key.startswith("val/"))
        return logged


def as_batch(batch: Any) -> Batch:
    """Concatenate the per-domain minibatches of a training step into one ``Batch``."""
    if isinstance(batch, Batch):
        return batch
    unlabeled = None
    if isinstance(batch, Mapping):
        unlabeled = batch.get("unlabeled")
        if "mixed" in batch:  # one shuffled stream whose samples carry their domain index
            x, y, domain = batch["mixed"][:3]
            return Batch(x, y, domain, unlabeled)
        batch = batch["sources"]
    xs, ys = [], []
    for x, y, *_ in batch:
        xs.append(x)
        ys.append(y)
    sizes = tuple(len(y) for y in ys)
    return Batch(torch.cat(xs), torch.cat(ys), _domain_index(sizes, ys[0].device), unlabeled, sizes)


@functools.lru_cache(maxsize=16)
def _domain_index(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Every sample's domain index for per-domain minibatches of these sizes. Cached: the
    sizes repeat from step to step, and building it is a fixed cost of every step (one
    small tensor per domain); algorithms read it and never write it."""
    return torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(sizes)]).to(device)


def _split_output(out: Any, algo: str) -> tuple[Tensor, dict[str, Any]]:
    if torch.is_tensor(out):
        return out, {}
    if isinstance(out, Mapping) and "loss" in out:
        extras = {k: v for k, v in out.items() if k != "loss"}
        return out["loss"], extras
    raise DGKitError(f"{algo}'s training step must return a loss tensor or a dict with a "
                     f"'loss' key, got {type(out).__name__}")


def _check_optimizer(optimizer: OptimizerCallable) -> None:
    """Build the optimizer on a dummy parameter so a bad lr fails now, not after loading data."""
    try:
        optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        raise ConfigError("model.optimizer", str(exc),
                          "lr >= 0, weight_decay >= 0, betas in [0, 1)") from None
