"""DGModule: the one LightningModule that trains, evaluates and checkpoints any Algorithm."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection

from dgkit.adaptation import TestTimeStage, select_hyperparameters
from dgkit.algorithm import Algorithm, Batch, Optimization
from dgkit.errors import ConfigError, DGKitError
from dgkit.metrics import OfficialEvaluation
from dgkit.metrics import accuracy as accuracy_metric
from dgkit.networks import Backbone, Featurizer
from dgkit.plugins import registry
from dgkit.representation import CHECKPOINT_KEY, load_representation, representation_prefixes
from dgkit.resume import rng_states, set_rng_states
from dgkit.task import Task

AlgorithmFactory = Callable[[Task, Backbone], Algorithm]


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
    ):
        """
        Args:
            algorithm: the DG algorithm (``--algo ALIAS`` picks one; its own
                hyperparameters are ``--model.algorithm.<name>``).
            task: input shape, classes and domains; linked from the data module.
            backbone: ``auto`` (the data set's default), ``mnist_cnn``, any timm model
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
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ConfigError("model.clip_grad_norm", f"{clip_grad_norm}", "> 0 or null")
        _check_optimizer(optimizer)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.backbone_spec = Backbone(backbone, pretrained, dropout, freeze_bn)
        self.algorithm = algorithm(self.task, self.backbone_spec)
        if not isinstance(self.algorithm, Algorithm):
            raise ConfigError("model.algorithm", f"{type(self.algorithm).__name__} is not a "
                              "dgkit Algorithm", "subclasses of dgkit.Algorithm")
        self.automatic_optimization = not self.algorithm.manual_optimization
        self._speed_up(channels_last, compile)
        # Lightning's model summary measures FLOPs (and sizes) on it.
        self.example_input_array = torch.zeros(1, *self.task.input_shape)

        metric_names = metrics or ["accuracy"]
        factories = {name: registry("metric").get(name).obj for name in metric_names}
        # Evaluation streams by stage, as the task names them: by default ``val`` (source
        # out-splits: training-domain validation), ``oracle`` (target out-splits: test-domain
        # oracle), ``test`` (target in-splits); ``crafted``/``heldout`` or a benchmark's
        # official splits when the data module adds them; with a test-time stage also
        # ``test_unadapted`` (the same model without it).
        domains = dict(self.task.stages)
        if self.algorithm.adapts_at_test:
            domains["test_unadapted"] = domains["test"]
        self.domain_metrics = nn.ModuleDict({
            stage: nn.ModuleList(
                MetricCollection({n: f(self.task) for n, f in factories.items()})
                for _ in domains[stage])
            for stage in domains
        })
        self._stage_domains = domains
        self._updated: set[tuple[str, int]] = set()
        # Several hypotheses (DRM, DivDis, D-BAT): each head's accuracy beside the result.
        self.head_metrics = nn.ModuleDict({
            stage: nn.ModuleList(
                MetricCollection({f"accuracy_head{h}": accuracy_metric(self.task)
                                  for h in range(self.algorithm.num_heads)})
                for _ in domains[stage])
            for stage in domains if stage != "test_unadapted"
        }) if self.algorithm.num_heads > 1 else None
        self.tta = TestTimeStage(self.algorithm, adaptation)
        self.tta_selection: dict | None = None
        self.head_selection: dict | None = None
        self.init_report: dict | None = None
        self._official_added = False
        if freeze_featurizer and init_from is None:
            raise ConfigError("model.freeze_featurizer", "freezes a random featurizer",
                              "together with --model.init_from CKPT")
        self._stage: str | None = None
        #: finished stages of a multi-stage algorithm: name, step and checkpoint file
        self.stages: list[dict] = []

    def _speed_up(self, channels_last: bool, compile: bool) -> None:
        featurizers = [m for m in self.algorithm.modules() if isinstance(m, Featurizer)]
        if compile and self.algorithm.differentiates_twice:
            raise ConfigError("model.compile", f"{type(self.algorithm).__name__} differentiates "
                              "twice through its featurizer, which torch.compile does not support",
                              "false for this algorithm")
        for featurizer in featurizers:
            if channels_last:
                featurizer.to(memory_format=torch.channels_last)
                featurizer.register_forward_pre_hook(_to_channels_last)
            if compile:
                featurizer.compile()

    # --- optimization -----------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        main = self.optimizer_factory(self.algorithm.parameter_groups())
        extra = self.algorithm.extra_optimizers(self._make_optimizer)
        if extra and self.automatic_optimization:
            raise DGKitError(f"{type(self.algorithm).__name__} defines extra optimizers; it "
                             "must set manual_optimization = True")
        if self.lr_scheduler_factory is None:
            return [main, *extra]
        scheduler = {"scheduler": self.lr_scheduler_factory(main),
                     "interval": self.hparams.scheduler_interval, "monitor": "val/accuracy"}
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
        return Optimization(optimizers, self.manual_backward, self._manual_step, self._no_sync)

    def _manual_step(self, optimizer) -> None:
        if self.hparams.clip_grad_norm is not None:
            self.clip_gradients(optimizer, self.hparams.clip_grad_norm, "norm")
        main = self.optimizers()
        main = main[0] if isinstance(main, list) else main
        if optimizer is main:
            optimizer.step()
        else:
            # Extra optimizers step outside Lightning's counter, so global_step (and
            # max_steps) count batches, not optimizer calls.
            getattr(optimizer, "optimizer", optimizer).step()

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
            value = self.trainer.callback_metrics.get("val/accuracy")
            if value is not None:
                scheduler.step(value)
        else:
            scheduler.step()

    # --- training ---------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.algorithm.progress.total_steps = int(self.trainer.estimated_stepping_batches)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.algorithm.progress.step = self.global_step
        self.algorithm.progress.epoch = self.current_epoch
        stage = self.algorithm.stage_name()
        if self._stage is not None and stage != self._stage:
            self._finish_stage(self._stage)
        self._stage = stage

    def on_train_end(self) -> None:
        if self._stage is not None and not self.trainer.interrupted:
            self._finish_stage(self._stage)
            self._stage = None

    def _finish_stage(self, name: str) -> None:
        """End a stage of a multi-stage algorithm and keep its model as a checkpoint."""
        self.algorithm.end_stage(name)
        record = {"stage": name, "step": self.global_step, "checkpoint": None}
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            path = os.path.join(callback.dirpath, f"stage-{name}.ckpt")
            self.trainer.save_checkpoint(path + ".tmp", weights_only=False)
            if self.trainer.is_global_zero:  # a reader never sees half a file
                os.replace(path + ".tmp", path)
            record["checkpoint"] = path
        self.stages.append(record)
        kept = f", kept as {record['checkpoint']}" if record["checkpoint"] else ""
        rank_zero_info(f"{type(self.algorithm).__name__}: stage {name} finished at step "
                       f"{self.global_step}{kept}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dgkit_stages"] = {"current": self._stage, "finished": self.stages}
        checkpoint["dgkit_rng"] = rng_states()  # dropout and the algorithm's own draws
        checkpoint["dgkit_algorithm"] = _qualified(type(self.algorithm))
        prefixes = representation_prefixes(self.algorithm)
        if prefixes is not None:
            checkpoint[CHECKPOINT_KEY] = prefixes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_same_algorithm(checkpoint)
        trainer = self._trainer
        if "dgkit_rng" in checkpoint and trainer is not None and trainer.state.fn == "fit":
            set_rng_states(checkpoint["dgkit_rng"])  # resuming: continue the same random stream
        stages = checkpoint.get("dgkit_stages") or {}
        self._stage, self.stages = stages.get("current"), list(stages.get("finished", []))

    def _check_same_algorithm(self, checkpoint: dict[str, Any]) -> None:
        written_by = checkpoint.get("dgkit_algorithm")
        mine = _qualified(type(self.algorithm))
        if written_by is not None and written_by != mine:
            path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise algorithm_mismatch(path, written_by, mine, "this run builds")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        b = as_batch(batch)
        if self.automatic_optimization:
            out = self.algorithm.training_loss(b)
        else:
            out = self.algorithm.training_update(b, self._optimization())
        loss, extras = _split_output(out, type(self.algorithm).__name__)
        if not torch.isfinite(loss):
            raise DGKitError(
                f"{type(self.algorithm).__name__} produced a non-finite loss ({loss.item()}) at "
                f"step {self.global_step}. Lower the learning rate or enable gradient clipping "
                "(--model.clip_grad_norm)."
            )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(b))
        for key, value in extras.items():
            self.log(f"train/{key}", value.detach() if torch.is_tensor(value) else value,
                     batch_size=len(b))
        if not self.automatic_optimization:
            self._step_schedulers("step")
            return None
        return loss

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    # --- evaluation -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.algorithm(x)

    def _evaluate(self, stage: str, index: int, batch: Any) -> None:
        x, y = batch[0], batch[1]
        # WILDS streams carry metadata, which only the official evaluators take.
        extra = {"metadata": batch[2]} if len(batch) > 2 else {}
        if self.tta.active:
            if "test_unadapted" in self.domain_metrics and stage == "test":
                self._update("test_unadapted", index, self.algorithm(x), y, **extra)
            logits = self.tta.predict((stage, index), x)
        else:
            logits = self.algorithm(x)
        self._update(stage, index, logits, y, **extra)
        self._update_heads(stage, index, x, y)

    def _update(self, stage: str, index: int, logits: Tensor, y: Tensor, **extra: Any) -> None:
        self.domain_metrics[stage][index].update(logits, y, **extra)
        self._updated.add((stage, index))

    def _update_heads(self, stage: str, index: int, x: Tensor, y: Tensor) -> None:
        if self.head_metrics is None or stage not in self.head_metrics:
            return
        heads = self.algorithm.head_logits(x)
        for h, metric in enumerate(self.head_metrics[stage][index].values()):
            metric.update(heads[:, h], y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(*self.task.validation_streams[dataloader_idx], batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", dataloader_idx, batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x = batch[0]
        logits = self.tta.predict(("predict", dataloader_idx), x) if self.tta.active else self.algorithm(x)
        return {"logits": logits, "prediction": logits.argmax(1),
                "domain": self.task.stages["test"][dataloader_idx]}

    # --- test-time stage ----------------------------------------------------------------
    def _source_data(self, include_holdout: bool):
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "source_eval_dataloader"):
            raise DGKitError(f"{type(self.algorithm).__name__} adapts at test time and needs the "
                             "source domains: evaluate with a DomainDataModule (datamodule=...)")

        def batches():
            for x, y, *_ in datamodule.source_eval_dataloader(include_holdout):
                yield x.to(self.device), y.to(self.device)

        return batches

    def setup(self, stage: str) -> None:
        self._add_official_evaluation()
        strategy = self.trainer.strategy
        if self.algorithm.unused_parameters and isinstance(strategy, DDPStrategy):
            # Before the strategy wraps the model in DDP (after this hook); the user's
            # plain --trainer.strategy ddp would otherwise stop at the first idle parameter.
            if not strategy._ddp_kwargs.get("find_unused_parameters"):
                strategy._ddp_kwargs["find_unused_parameters"] = True
                rank_zero_info(f"{type(self.algorithm).__name__} leaves some parameters out of "
                               "some steps: DDP runs with find_unused_parameters=True")
        # Before a resumed checkpoint is restored, so resuming keeps the resumed weights.
        if stage == "fit" and self.hparams.init_from and self.init_report is None:
            self.init_report = load_representation(self.algorithm, self.hparams.init_from,
                                                   self.hparams.freeze_featurizer)
            r = self.init_report
            rank_zero_info(
                f"init_from {r['checkpoint']}: featurizer ({r['featurizer_from']}) loaded into "
                f"{', '.join(r['featurizer_into'])}"
                + (f"; classifier ({r['classifier_from']}) into {', '.join(r['classifier_into'])}"
                   if r["classifier_into"] else "; no classifier loaded")
                + ("; featurizer frozen" if r["frozen"] else ""))
        if self.algorithm.needs_grad_at_test:
            # The test-time stage takes gradients: evaluate under no_grad (which adapt()
            # lifts with enable_grad) instead of inference_mode, whose tensors refuse autograd.
            for loop in (self.trainer.validate_loop, self.trainer.test_loop,
                         self.trainer.predict_loop, self.trainer.fit_loop.epoch_loop.val_loop):
                loop.inference_mode = False

    def _add_official_evaluation(self) -> None:
        """A benchmark's own evaluator (WILDS) beside the per-stream metrics."""
        datamodule = getattr(self.trainer, "datamodule", None)
        evaluator = getattr(getattr(datamodule, "dataset", None), "evaluator", None)
        if evaluator is None or self._official_added:
            return
        for collections in self.domain_metrics.values():
            for collection in collections:
                collection.add_metrics({"official": OfficialEvaluation(evaluator())})
        self._official_added = True

    def _begin_adaptation(self, include_holdout: bool) -> None:
        if self.algorithm.adapts_at_test:
            self.tta.begin(self._source_data(include_holdout))

    def on_validation_start(self) -> None:
        if self.hparams.adapt_validation:
            self._begin_adaptation(include_holdout=False)  # never the validation samples

    def on_validation_end(self) -> None:
        self.tta.end()

    def on_test_start(self) -> None:
        if hasattr(self.algorithm, "choose_head"):
            self._choose_head()
        if not self.algorithm.adapts_at_test:
            return
        if self.hparams.tta_grid:
            self._select_test_time_hyperparameters()
        self._begin_adaptation(include_holdout=True)

    def _choose_head(self) -> None:
        """Disambiguation of multi-hypothesis algorithms, before testing: labelled source
        validation data, or the held-out domains' oracle split (never the test images)."""
        datamodule = self.trainer.datamodule
        stage = "oracle" if self.algorithm.selection == "target_queries" else "val"
        if stage == "oracle" and not getattr(datamodule, "oracle", False):
            raise ConfigError("data.oracle", "target_queries draws its labels from the "
                              "held-out domains' oracle split", "true")
        loaders = self._validation_loaders(stage)
        batches = [(x.to(self.device), y.to(self.device)) for loader in loaders for x, y, *_ in loader]
        self.head_selection = self.algorithm.choose_head(batches)

    def _validation_loaders(self, stage: str) -> list:
        loaders = self.trainer.datamodule.val_dataloader()
        return [loader for loader, (s, _) in zip(loaders, self.task.validation_streams, strict=True)
                if s == stage]

    def _select_test_time_hyperparameters(self) -> None:
        self._begin_adaptation(include_holdout=False)
        val = self._validation_loaders("val")
        chosen, scores = select_hyperparameters(self.tta, self.hparams.tta_grid, val)
        self.tta.end()
        self.tta_selection = {"chosen": chosen, "validation_accuracy": [
            {"config": c, "accuracy": a} for c, a in scores]}

    def on_test_end(self) -> None:
        self.tta.end()

    def on_predict_start(self) -> None:
        self._begin_adaptation(include_holdout=True)

    def on_predict_end(self) -> None:
        self.tta.end()

    def on_validation_epoch_end(self) -> None:
        logged = self._log_metrics(tuple(s for s in self._stage_domains if not s.startswith("test")))
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.algorithm.on_validation_metrics(
                {k: float(v) for k, v in logged.items() if k.startswith("val/")})

    def on_test_epoch_end(self) -> None:
        self._log_metrics(("test", "test_unadapted"))

    def _log_metrics(self, stages: tuple[str, ...]) -> dict[str, Tensor]:
        logged: dict[str, Tensor] = {}
        for stage in (s for s in stages if s in self._stage_domains):
            per_metric: dict[str, list[Tensor]] = {}
            for i, domain in enumerate(self._stage_domains[stage]):
                if (stage, i) not in self._updated:
                    continue
                collections = [self.domain_metrics[stage][i]]
                if self.head_metrics is not None and stage in self.head_metrics:
                    collections.append(self.head_metrics[stage][i])
                for collection in collections:
                    for name, value in collection.compute().items():  # synced across ranks
                        # Already reduced across ranks: Lightning need not sync it again.
                        self.log(f"{stage}/{name}/{domain}", value, sync_dist=False)
                        logged[f"{stage}/{name}/{domain}"] = value
                        per_metric.setdefault(name, []).append(value)
                    collection.reset()
                self._updated.discard((stage, i))
            # DomainBed averages accuracies over domains (not over pooled samples).
            for name, values in per_metric.items():
                logged[f"{stage}/{name}"] = torch.stack(values).mean()
                self.log(f"{stage}/{name}", logged[f"{stage}/{name}"], sync_dist=False,
                         prog_bar=stage == "val")
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
    xs, ys, ds = [], [], []
    for d, (x, y, *_) in enumerate(batch):
        xs.append(x)
        ys.append(y)
        ds.append(torch.full((len(y),), d, dtype=torch.long, device=y.device))
    return Batch(torch.cat(xs), torch.cat(ys), torch.cat(ds), unlabeled)


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


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, *rest)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def algorithm_mismatch(path: str, written_by: str, wanted: str, asked: str) -> ConfigError:
    """The error for a checkpoint of another algorithm (qualified class names, shown by
    alias); ``asked`` says who wants ``wanted``: "this run builds", "--algo asks for"."""
    aliases = {_qualified(e.obj): e.alias for e in registry("algorithm")}
    theirs, mine = aliases.get(written_by, written_by), aliases.get(wanted, wanted)
    return ConfigError("ckpt_path", f"{path} was written by {theirs}, but {asked} {mine}",
                       f"a checkpoint of {mine}; or no --algo (or --algo {theirs}) to use this one as "
                       f"{theirs}; or --model.init_from {path} to start {mine} from its representation")


def task_dict(task: Task) -> dict:
    """The task as plain data, so checkpoints load with ``weights_only=True``."""
    return asdict(task)
