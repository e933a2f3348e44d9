"""The ``dgkit`` command: a LightningCLI over DGModule and DomainDataModule.

``--algo ALIAS`` and ``--data ALIAS`` are resolved through the plugin registries and
rewritten into the class paths LightningCLI understands, so everything else
(``--config``, ``--print_config``, ``--trainer.*``, ``--model.*``, ``--data.*``) is plain
LightningCLI. ``dgkit list`` shows what the installed plugins register.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from lightning import Trainer
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.text import Text

from dgkit.checkpointing import AtomicCheckpointIO, ResumeCheckpoint, read_checkpoint
from dgkit.data import DomainDataModule
from dgkit.divergence import DivergenceCheck
from dgkit.errors import ConfigError, DGKitError, RunStopped, UnknownAliasError
from dgkit.explain import algorithm_help, built_by_parser, parse_message, user_error
from dgkit.final_step import ValidateFinalStep
from dgkit.module import DGModule, algorithm_mismatch, task_dict
from dgkit.plugins import plugin_of, plugins, registry
from dgkit.results import collect_results, print_results, write_results
from dgkit.resume import CONFIG_FILE, find_unfinished, metrics_logged_before

DEFAULT_ALGORITHM = "erm"
DEFAULT_DATASET = "rotated_mnist"
ALIAS_FLAGS = {  # flag -> (registry kind, LightningCLI key it rewrites to)
    "--algo": ("algorithm", "--model.algorithm"),
    "--data": ("dataset", "--data.dataset"),
    "--model.algorithm": ("algorithm", "--model.algorithm"),
    "--model.algorithm.base": ("algorithm", "--model.algorithm.base"),
    "--data.dataset": ("dataset", "--data.dataset"),
}
# Subcommands outside LightningCLI: name -> module with main(argv).
TOOLS = {"data": "dgkit.data.download", "sweep": "dgkit.sweep", "report": "dgkit.report"}
_ALIAS_LIKE = re.compile(r"^[A-Za-z][\w\-]*$")

TRAINER_DEFAULTS = {"default_root_dir": "runs", "max_epochs": 15, "log_every_n_steps": 10}
# Loggers and callbacks are parser defaults (not trainer_defaults) so a config can change them.
CONFIGURABLE_DEFAULTS = {
    "trainer.logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": "runs", "name": ""}},
    ],
}
try:  # TensorBoard beside CSV when it is installed
    import tensorboard  # noqa: F401

    CONFIGURABLE_DEFAULTS["trainer.logger"].append(
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "runs", "name": "", "sub_dir": "tensorboard"}})
except ImportError:
    pass


# Lines dependencies print on every run that carry no news for a dgkit user.
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


class DGCLI(LightningCLI):
    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        quiet_dependencies()
        self._argv = list(args or [])
        super().__init__(
            DGModule,
            DomainDataModule,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            load_from_checkpoint_support=True,
            # Parse errors raise (main() prints them as one line) instead of a usage dump.
            parser_kwargs={"description": "dgkit: domain generalization. Pick an algorithm "
                           "and data set with --algo ALIAS and --data ALIAS (see `dgkit list`).",
                           "exit_on_error": False, "allow_abbrev": False,
                           **{cmd: {"exit_on_error": False, "allow_abbrev": False}
                              for cmd in self.subcommands()}},
            args=list(args) if args is not None else None,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning lays the checkpoint's model hyperparameters over the command line; an
        # algorithm named there explicitly would silently give way to the checkpoint's.
        sub = self.config.get("subcommand")
        chosen = self.config[sub].model.algorithm if sub else None
        explicit = chosen is not None and any(a.startswith("--model.algorithm") for a in self._argv)
        super()._parse_ckpt_path()
        if explicit:
            written = _qualified_path(self.config[sub].model.algorithm.class_path)
            wanted = _qualified_path(chosen.class_path)
            if written != wanted:
                raise algorithm_mismatch(self.config[sub].ckpt_path, written, wanted, "--algo asks for")

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task", compute_fn=task_dict,
                              apply_on="instantiate")
        parser.set_defaults(CONFIGURABLE_DEFAULTS)
        parser.set_defaults({
            "model.algorithm": {"class_path": registry("algorithm").get(DEFAULT_ALGORITHM).target},
            "data.dataset": {"class_path": registry("dataset").get(DEFAULT_DATASET).target},
        })
        # Training-domain validation picks the checkpoint that is tested after fit.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt, kept fresh for resuming (and Slurm's requeue signal), is its own callback.
        parser.add_lightning_class_args(ResumeCheckpoint, "last_checkpoint")
        # A loss that explodes but stays finite stops the run (--divergence.factor 0: off).
        parser.add_lightning_class_args(DivergenceCheck, "divergence")
        parser.add_argument("--resume", type=bool, default=True,
                            help="fit: continue the newest unfinished run of this same "
                            "configuration from its last.ckpt, in its folder (false: start anew)")
        parser.set_defaults({
            "checkpoint.monitor": "val/accuracy",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,
            "checkpoint.filename": "best-{epoch}-{step}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt and ckpt not in ("best", "last", "hpc", "registry") and not Path(ckpt).is_file():
            raise ConfigError("ckpt_path", f"no checkpoint file at {ckpt!r}",
                              "a .ckpt written by `dgkit fit`, e.g. runs/version_0/checkpoints/last.ckpt")
        self._kept_metrics: list[dict[str, int | float]] = []
        config = self.config[self.subcommand]
        self._loggers_follow_root_dir(config)
        if self.subcommand == "fit" and ckpt is None and config.get("resume"):
            self._resume_unfinished()
        if self.subcommand in ("validate", "test", "predict") and ckpt:
            self._log_beside_run(config, Path(ckpt))

    @staticmethod
    def _file_loggers(config) -> list:
        """The configured loggers that lay runs out as ``save_dir/name/version`` (CSV,
        TensorBoard); others (MLflow) keep their own stores."""
        loggers = config.trainer.logger
        if not isinstance(loggers, list):
            return []
        return [lg for lg in loggers if "init_args" in lg
                and {"save_dir", "name", "version"} <= set(lg.init_args.keys())]

    def _loggers_follow_root_dir(self, config) -> None:
        """``--trainer.default_root_dir D`` puts the run in ``D/version_N`` (Lightning's
        habit): the default loggers write where the trainer's root says."""
        root = config.trainer.get("default_root_dir")
        if not root or root == TRAINER_DEFAULTS["default_root_dir"]:
            return
        for logger in self._file_loggers(config):
            if logger.init_args.save_dir == TRAINER_DEFAULTS["default_root_dir"]:
                logger.init_args.save_dir = str(root)

    def _log_beside_run(self, config, ckpt: Path) -> None:
        """``dgkit test --ckpt_path D/version_N/checkpoints/X.ckpt`` writes its files to
        ``D/version_N/test-X/``, beside the run it evaluates, not to a new run."""
        run = ckpt.parent.parent  # as the user wrote it: the printed paths read the same
        if ckpt.resolve().parent.name != "checkpoints" or not (run / CONFIG_FILE).is_file():
            return  # not a dgkit run folder: Lightning's default versioning
        config.checkpoint.dirpath = str(ckpt.parent)  # the run's, as in its fit
        for logger in self._file_loggers(config):
            logger.init_args.save_dir = str(run.parent)
            logger.init_args.name = ""
            logger.init_args.version = f"{run.name}/{self.subcommand}-{ckpt.stem}"

    def _resume_unfinished(self) -> None:
        """Same configuration as an unfinished run: continue it (see dgkit.resume)."""
        config = self.config.fit
        loggers = config.trainer.logger
        if not isinstance(loggers, list) or not loggers or "init_args" not in loggers[0]:
            return  # no logger, no run folder to find
        first = loggers[0].init_args
        if first.get("version") is not None:
            return
        root = Path(first.get("save_dir") or ".") / (first.get("name") or "")
        with warnings.catch_warnings():  # the same dump as config.yaml (SaveConfigCallback)
            warnings.simplefilter("ignore")
            dump = yaml.safe_load(self._parser("fit").dump(config, skip_none=False))
        found = find_unfinished(root, dump)
        if found is None:
            return
        version, checkpoint = found
        for logger in loggers:
            if "init_args" in logger and "version" in logger.init_args:
                logger.init_args.version = version
        config.ckpt_path = str(checkpoint)
        # Memory-mapped: only the step and the callbacks' state are read here; Lightning
        # reads the rest when it restores.
        try:
            state = read_checkpoint(checkpoint, mmap=True)
        except DGKitError as exc:
            raise DGKitError(f"the unfinished run {checkpoint.parent.parent} cannot be resumed: {exc} "
                             f"Resume from another with --ckpt_path {checkpoint.parent}/<file>, or "
                             "start a new run with --resume false.") from None
        step = state["global_step"]
        self._kept_metrics = metrics_logged_before(state, checkpoint.parent.parent)
        Console(stderr=True).print(f"resuming the unfinished run {checkpoint.parent.parent} from step "
                                   f"{step} ({checkpoint}); --resume false starts a new run")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            # ResumeCheckpoint acts on the requeue signal at a batch boundary; Lightning's own
            # handler would save from inside the signal handler, possibly mid-update.
            plugins.append(SLURMEnvironment(auto_requeue=False))
        config = {**config, "plugins": plugins}
        callbacks = [*callbacks, ValidateFinalStep()]
        # A rich progress bar by default, unless bars are off or the user chose another.
        chosen = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in chosen):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        # Benchmarks with an official selection protocol (WILDS: its OOD validation split
        # and metric) replace the default training-domain validation accuracy.
        metric = getattr(getattr(self.datamodule, "dataset", None), "selection_metric", None)
        callback = self.trainer.checkpoint_callback
        if metric and callback is not None and callback.monitor == "val/accuracy":
            callback.monitor = metric
        # Keep TensorBoard's events inside the CSV logger's run directory (one run, one
        # folder) instead of letting each logger count versions on its own.
        loggers = self.trainer.loggers
        if len(loggers) > 1:
            for logger in loggers[1:]:
                if isinstance(logger, TensorBoardLogger):
                    logger._version = loggers[0].version
        # A resumed run: its CSV logger starts a fresh metrics.csv; the rows logged before
        # the checkpoint go back in first.
        csv_logger = loggers[0] if loggers and isinstance(loggers[0], CSVLogger) else None
        if self._kept_metrics and csv_logger is not None and self.trainer.is_global_zero:
            for row in self._kept_metrics:
                step = int(row.pop("step"))
                csv_logger.experiment.log_metrics(row, step)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.OutOfMemoryError as exc:
            raise DGKitError(out_of_memory_message(exc, self.datamodule, self.trainer)) from None

    def after_fit(self) -> None:
        if self.trainer.interrupted or self.trainer.fast_dev_run:
            return
        if any(getattr(c, "requeued", False) for c in self.trainer.callbacks):
            return  # stopped for a Slurm requeue: the requeued job finishes and tests
        best = self.trainer.checkpoint_callback
        ckpt = "best" if best is not None and best.best_model_path else None
        stages = list(self.model.stages)  # of the whole fit; loading the best one resets them
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        extra: dict = {"stages": stages} if stages else {}
        if best is not None and best.monitor:
            extra["selection"] = f"best {best.monitor} ({best.mode})"
        if self.model.init_report is not None:
            extra["init_from"] = self.model.init_report
        self._report(ckpt_path=best.best_model_path if ckpt else None, **extra)

    def after_test(self) -> None:
        self._report(ckpt_path=self.config[self.subcommand].get("ckpt_path"))

    def after_predict(self) -> None:
        predictions = self.trainer.predict_loop.predictions
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero or not predictions or not log_dir:
            return
        path = Path(log_dir) / "predictions.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(predictions, path)
        Console(stderr=True).print(f"predictions written to {path}")

    def _report(self, ckpt_path: str | None, **extra) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        results = collect_results(self.trainer.callback_metrics, self.model.task,
                                  algorithm=type(self.model.algorithm).__name__,
                                  ckpt_path=ckpt_path,
                                  seed=self.config[self.subcommand].get("seed_everything"),
                                  test_time_selection=self.model.tta_selection,
                                  head_selection=self.model.head_selection,
                                  transductive=getattr(self.datamodule, "transductive", False),
                                  **extra)
        print_results(results)
        if log_dir:
            path = write_results(results, Path(log_dir))
            Console(stderr=True).print(f"results written to {path}")


def _qualified_path(class_path: str) -> str:
    """The defining module and name of a class path (jsonargparse shortens them, e.g.
    ``dgkit_algorithms.ERM`` for ``dgkit_algorithms.erm.ERM``)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


def out_of_memory_message(exc: BaseException, datamodule: object, trainer: Trainer) -> str:
    batch = getattr(datamodule, "batch_size", None)
    official = getattr(datamodule, "official", False)  # WILDS: one mixed stream
    domains = 1 if official or datamodule is None else len(datamodule.task.source_domains)
    per_step = (f"{batch} per domain x {domains} domain(s) = {batch * domains} images per step "
                "per device") if batch else "the batch"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    return (f"out of memory on {trainer.strategy.root_device} with --data.batch_size {batch} "
            f"({per_step}): {first}. Lower --data.batch_size (and keep the effective batch with "
            "--trainer.accumulate_grad_batches), train in --trainer.precision bf16-mixed, or pick a "
            "smaller --model.backbone.")


def rewrite_aliases(argv: Sequence[str]) -> list[str]:
    """Turn ``--algo ALIAS`` / ``--data ALIAS`` into LightningCLI class-path arguments."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, _, inline = arg.partition("=")
        if flag in ALIAS_FLAGS:
            kind, target = ALIAS_FLAGS[flag]
            has_value = bool(inline) or i + 1 < len(argv)
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            consumed = 1 if inline else 2
            if has_value and _is_alias(flag, value):
                out.append(f"{target}={registry(kind).get(value).target}")
                i += consumed
                continue
        out.append(arg)
        i += 1
    return out


def data_from_checkpoint(argv: list[str]) -> list[str]:
    """For validate/test/predict, default the data config to the one saved in the checkpoint.

    Lightning restores the model's hyperparameters from ``--ckpt_path``; without the data
    module's too, the default data set would be evaluated. Inserted right after the
    subcommand, so the user's own ``--data.*``/``--config`` still win.
    """
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return argv
    ckpt = None
    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            ckpt = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            ckpt = argv[i + 1]
    if not ckpt or not Path(ckpt).is_file():
        return argv
    hparams = read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}
    data = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if "dataset" not in data:
        return argv
    return [argv[0], "--data=" + json.dumps(data, default=list), *argv[1:]]


def _is_alias(flag: str, value: str) -> bool:
    """``--data`` also takes LightningCLI config (a path or a dict); only bare words are aliases."""
    if flag == "--algo":
        return True
    kind = ALIAS_FLAGS[flag][0]
    if value in registry(kind):  # even beside a folder of that name (./fmow is the path)
        return True
    if not _ALIAS_LIKE.match(value) or Path(value).exists():
        return False
    # A bare word that is no alias: --data.dataset also accepts class names (RotatedMNIST).
    if value[:1].isupper():
        return False
    raise UnknownAliasError(kind, value, registry(kind).entries)


def print_plugins() -> None:
    from rich.table import Table

    loaded = plugins()
    table = Table(title="dgkit plugins")
    for column in ("kind", "alias", "class", "plugin", "distribution"):
        table.add_column(column)
    for kind, reg in loaded.registries.items():
        for entry in reg:
            table.add_row(kind, entry.alias, entry.target, entry.plugin, entry.distribution)
    console = Console()
    console.width = max(console.width, 140)  # class paths are long; don't truncate them
    console.print(table)
    for failure in loaded.failures:
        console.print(f"[red]plugin {failure.plugin!r} ({failure.distribution}) failed to "
                      f"load[/red]: {failure.error}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (returns nothing: a returned object would become the exit code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["list"]:
            print_plugins()
            return
        if argv[:1] and argv[0] in TOOLS:  # imported on use: `dgkit fit` never loads them
            importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
            return
        previous = {s: signal.signal(s, _stop_outside_training) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            DGCLI(data_from_checkpoint(rewrite_aliases(argv)))
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _algorithm_help(argv)
    except SIGTERMException:  # Lightning's own handler, outside training (setup, testing)
        _fail(_OUTSIDE_TRAINING.format(name="SIGTERM"), code=143)
    except argparse.ArgumentError as exc:
        _fail(parse_message(str(exc), argv[0] if argv else "fit", SECTIONS))
    except Exception as exc:
        if os.environ.get("DGKIT_TRACEBACK"):
            traceback.print_exc()
        if isinstance(exc, MisconfigurationException):
            _fail(_user_message(exc))
        error = user_error(exc)
        if isinstance(error, RunStopped):
            if error.during_training:  # stopped cleanly, resumable: news, not an error
                Console(stderr=True, soft_wrap=True).print(Text("dgkit: ") + Text(str(error)),
                                                           highlight=False)
                sys.exit(error.exit_code)
            _fail(str(error), code=error.exit_code)
        if error is not None:
            _fail(_user_message(error))
        culprit = plugin_of(exc)
        refused = built_by_parser(exc) if culprit is None else None
        if refused is not None:  # a dependency's constructor refused a setting
            _fail(f"building the configured objects failed: {refused} (DGKIT_TRACEBACK=1 shows where)")
        if culprit is None:
            raise
        _fail(f"plugin {culprit.plugin!r} ({culprit.distribution}) raised {type(exc).__name__} in "
              f"{culprit.where}: {exc}. This is an error in that plugin's code (or a setting it "
              "does not check); DGKIT_TRACEBACK=1 shows the whole traceback.", code=1)


_OUTSIDE_TRAINING = ("{name} received outside training (setting up, validating or testing): nothing "
                     "new to checkpoint; run the same command again to continue the unfinished run")


def _stop_outside_training(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT while no training step runs: stop now, with the exit code of that
    signal (training itself stops at a batch boundary, see ResumeCheckpoint)."""
    raise RunStopped(signum, _OUTSIDE_TRAINING.format(name=signal.Signals(signum).name),
                     during_training=False)


def _algorithm_help(argv: list[str]) -> None:
    """``dgkit fit --algo X --help``: X's own options after the command's."""
    if not ({"--help", "-h"} & set(argv)):
        return
    for i, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        alias = inline or (argv[i + 1] if i + 1 < len(argv) else "")
        if flag == "--algo" and alias in registry("algorithm"):
            print("\n" + algorithm_help(alias, registry("algorithm").get(alias).obj))


def _fail(message: str, code: int = 2) -> None:
    # Text, not markup: messages hold brackets ("[Art]") that rich would swallow.
    Console(stderr=True, soft_wrap=True).print(
        Text("dgkit: error: ", style="bold red") + Text(message), highlight=False)
    sys.exit(code)


# Where the options of each top-level config section come from, for "did you mean".
SECTIONS = {"trainer": Trainer.__init__, "model": DGModule.__init__,
            "data": DomainDataModule.__init__, "checkpoint": ModelCheckpoint.__init__,
            "last_checkpoint": ResumeCheckpoint.__init__, "divergence": DivergenceCheck.__init__}


def _user_message(exc: BaseException) -> str:
    """The error's own message; a DataLoader worker re-raises it wrapped in its traceback."""
    message = str(exc)
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


if __name__ == "__main__":
    main()
