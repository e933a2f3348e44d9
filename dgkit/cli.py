"""The ``dgkit`` command: a LightningCLI over DGModule and DomainDataModule.

``--algo ALIAS`` and ``--data ALIAS`` are resolved through the plugin registries and
rewritten into the class paths LightningCLI understands (``dgkit.aliases``), so everything
else (``--config``, ``--print_config``, ``--trainer.*``, ``--model.*``, ``--data.*``) is
plain LightningCLI. Resuming is ``dgkit.resume``, the run folder ``dgkit.run_folder``,
testing and reporting after fit ``dgkit.reporting``. ``dgkit list`` shows what the
installed plugins register.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning import Trainer
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.text import Text

from dgkit.aliases import data_from_checkpoint, rewrite_aliases
from dgkit.checkpoint_io import AtomicCheckpointIO
from dgkit.checkpointing import ResumeCheckpoint
from dgkit.data import DomainDataModule
from dgkit.divergence import DivergenceCheck
from dgkit.errors import ConfigError, RunStopped
from dgkit.explain import (
    algorithm_help,
    algorithm_mismatch,
    built_by_parser,
    parse_message,
    user_error,
)
from dgkit.final_step import ValidateFinalStep
from dgkit.module import DGModule
from dgkit.noise import quiet_dependencies
from dgkit.out_of_memory import ExplainOutOfMemory
from dgkit.plugins import plugin_of, plugins, qualified_name, registry
from dgkit.progress import ThrottledProgressBar
from dgkit.reporting import report, save_predictions, test_after_fit
from dgkit.resume import resume_unfinished
from dgkit.run_folder import DEFAULT_ROOT, beside_run, follow_root_dir, share_one_folder
from dgkit.task import DEFAULT_SELECTION

DEFAULT_ALGORITHM = "erm"
DEFAULT_DATASET = "rotated_mnist"
# Subcommands outside LightningCLI: name -> module with main(argv).
TOOLS = {"data": "dgkit.data.download", "sweep": "dgkit.sweep", "report": "dgkit.report",
         "ensemble": "dgkit.ensemble"}

#: model options that say how a checkpoint is evaluated: the command line's win over its own
TEST_TIME_KEYS = ("tta", "tta_grid", "adaptation", "adapt_validation")
TRAINER_DEFAULTS = {"default_root_dir": DEFAULT_ROOT, "max_epochs": 15, "log_every_n_steps": 10}
# Loggers and callbacks are parser defaults (not trainer_defaults) so a config can change them.
CONFIGURABLE_DEFAULTS = {
    "trainer.logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": DEFAULT_ROOT, "name": ""}},
    ],
}
try:  # TensorBoard beside CSV when it is installed
    import tensorboard  # noqa: F401

    CONFIGURABLE_DEFAULTS["trainer.logger"].append(
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": DEFAULT_ROOT, "name": "", "sub_dir": "tensorboard"}})
except ImportError:
    pass


class DGCLI(LightningCLI):
    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        quiet_dependencies()
        self._argv = list(args or [])
        self._kept_metrics: list[dict[str, int | float]] = []
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
        averaging = self.config[sub].model.get("averaging") if sub else None
        asks_averaging = _asks(self._argv, "--model.averaging")
        # How to evaluate is the command's choice, not the trained run's: a test-time method
        # and its settings asked for here stay.
        evaluation = {key: self.config[sub].model.get(key) for key in TEST_TIME_KEYS
                      if _asks(self._argv, f"--model.{key}")} if sub else {}
        hyperparameters = {name: chosen.init_args.get(name) for name in _algorithm_args(self._argv)
                           } if explicit and chosen.get("init_args") is not None else {}
        super()._parse_ckpt_path()
        for key, value in evaluation.items():
            self.config[sub].model[key] = value
        if hyperparameters:
            self._keep_test_time_hyperparameters(sub, hyperparameters)
        if asks_averaging:
            written = self.config[sub].model.get("averaging")
            names = [_class_of(a.class_path) if a else "none" for a in (written, averaging)]
            if names[0] != names[1]:
                written_name = names[0].rpartition(".")[2]
                raise ConfigError("model.averaging", f"{self.config[sub].ckpt_path} was trained with "
                                  f"averaging {written_name}, which a resumed or evaluated run keeps",
                                  "drop --model.averaging, or start a new run without --ckpt_path")
        if explicit:
            written = _class_of(self.config[sub].model.algorithm.class_path)
            wanted = _class_of(chosen.class_path)
            if written != wanted:
                raise algorithm_mismatch(self.config[sub].ckpt_path, written, wanted, "--algo asks for")

    def _keep_test_time_hyperparameters(self, sub: str, asked: dict[str, Any]) -> None:
        """The algorithm's test-time hyperparameters asked for on the command line evaluate
        the checkpoint; a training hyperparameter that differs from the checkpoint's is an
        error, not silently the checkpoint's."""
        algorithm = self.config[sub].model.algorithm
        written = algorithm.get("init_args") or {}
        module, _, name = algorithm.class_path.rpartition(".")
        try:
            test_time = getattr(importlib.import_module(module), name).test_time_hyperparameters
        except (ImportError, AttributeError):
            return  # the class mismatch check below says what is wrong
        for key, value in asked.items():
            if key in test_time:
                algorithm.init_args[key] = value
            elif key in written and written[key] != value:
                ckpt = self.config[sub].ckpt_path
                raise ConfigError(f"model.algorithm.{key}", f"{ckpt} was trained with {key} "
                                  f"{written[key]!r}, which it keeps (asked: {value!r})",
                                  "its test-time hyperparameters (" + (", ".join(test_time) or "none")
                                  + "), or a new run without --ckpt_path")

    def add_arguments_to_parser(self, parser) -> None:
        # The Task itself, decided once by the data module, not a copy rebuilt from a dict.
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.set_defaults(CONFIGURABLE_DEFAULTS)
        parser.set_defaults({
            "model.algorithm": {"class_path": registry("algorithm").get(DEFAULT_ALGORITHM).target},
            "data.dataset": {"class_path": registry("dataset").get(DEFAULT_DATASET).target},
        })
        # Validation picks the checkpoint that is tested after fit; which metric it watches
        # is the task's selection metric unless --checkpoint.monitor says otherwise.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt, kept fresh for resuming (and Slurm's requeue signal), is its own callback.
        parser.add_lightning_class_args(ResumeCheckpoint, "last_checkpoint")
        # A loss that explodes but stays finite stops the run (--divergence.factor 0: off).
        parser.add_lightning_class_args(DivergenceCheck, "divergence")
        parser.add_argument("--resume", type=bool, default=True,
                            help="fit: continue the newest unfinished run of this same "
                            "configuration from its last.ckpt, in its folder (false: start anew)")
        parser.set_defaults({
            "checkpoint.monitor": DEFAULT_SELECTION,
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
        config = self.config[self.subcommand]
        if self.subcommand == "fit":
            steps_decide(config, self._argv)
        follow_root_dir(config)
        if self.subcommand == "fit" and ckpt is None and config.get("resume"):
            with warnings.catch_warnings():  # the same dump as config.yaml (SaveConfigCallback)
                warnings.simplefilter("ignore")
                dump = yaml.safe_load(self._parser("fit").dump(config, skip_none=False))
            self._kept_metrics = resume_unfinished(config, dump)
        if self.subcommand in ("validate", "test", "predict") and ckpt:
            beside_run(config, Path(ckpt), self.subcommand, _evaluation_name(config))

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
        callbacks = [*callbacks, ValidateFinalStep(), ExplainOutOfMemory()]
        # A rich progress bar by default, unless bars are off or the user chose another.
        chosen = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in chosen):
            callbacks = [*callbacks, ThrottledProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.monitor == DEFAULT_SELECTION:  # the task decides
            callback.monitor = self.datamodule.task.selection_metric
        share_one_folder(self.trainer, self._kept_metrics)

    def after_fit(self) -> None:
        test_after_fit(self.trainer, self.model, self.datamodule, self._seed())

    def after_test(self) -> None:
        report(self.trainer, self.model, ckpt_path=self.config[self.subcommand].get("ckpt_path"),
               seed=self._seed())

    def after_predict(self) -> None:
        save_predictions(self.trainer)

    def _seed(self) -> object:
        return self.config[self.subcommand].get("seed_everything")


def _evaluation_name(config: Any) -> str:
    """What sets this evaluation apart from the plain test of the checkpoint, for its
    folder's name: the test-time method's alias and the test scenario (``-tent-mixed-shift0.1``)."""
    parts = []
    method = config.model.get("tta")
    if method:
        path = method.class_path if hasattr(method, "class_path") else str(method)
        parts.append(next((e.alias for e in registry("tta") if e.target == path),
                          path.rpartition(".")[2].lower()))
    if config.data.get("test_stream") == "mixed":
        parts.append("mixed")
    if config.data.get("label_shift") is not None:
        parts.append(f"shift{config.data.label_shift:g}")
    return "".join(f"-{p}" for p in parts)


def _asks(argv: Sequence[str], option: str) -> bool:
    """Whether ``argv`` sets ``option`` or one of its own settings (``option.name``)."""
    flags = [a.split("=", 1)[0] for a in argv]
    return any(f == option or f.startswith(option + ".") for f in flags)


def _algorithm_args(argv: Sequence[str]) -> list[str]:
    """The algorithm hyperparameters ``argv`` sets (``--model.algorithm.NAME`` or
    ``--model.algorithm.init_args.NAME``)."""
    names = []
    for flag in (a.split("=", 1)[0] for a in argv):
        rest = flag.removeprefix("--model.algorithm.")
        if rest != flag:
            rest = rest.removeprefix("init_args.")
            if rest and "." not in rest and rest not in ("help", "class_path", "init_args"):
                names.append(rest)
    return names


def steps_decide(config: Any, argv: list[str]) -> None:
    """``--trainer.max_steps N`` trains N steps: dgkit's default of 15 epochs (for runs
    that name neither) gives way unless the epochs were asked for too, on the command line
    or in a ``--config`` file."""
    trainer = config.trainer
    if trainer.get("max_steps") in (None, -1) or trainer.get("max_epochs") != TRAINER_DEFAULTS["max_epochs"]:
        return
    if any(a.startswith("--trainer.max_epochs") for a in argv):
        return
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path and Path(path).is_file():
            written = yaml.safe_load(Path(path).read_text()) or {}
            if "max_epochs" in (written.get("trainer") or {}):
                return
    trainer.max_epochs = -1


def _class_of(class_path: str) -> str:
    """The qualified name of the class a class path names (jsonargparse shortens them, e.g.
    ``dgkit_algorithms.ERM`` for ``dgkit_algorithms.erm.ERM``)."""
    module, _, name = class_path.rpartition(".")
    try:
        return qualified_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return class_path


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


def _leave_process_group() -> None:
    """Destroy the DDP process group before the interpreter does. Lightning destroys NCCL's
    at exit but not gloo's, whose threads then meet interpreter shutdown: a non-zero rank
    of a two-node CPU run aborted there ("terminate called without an active exception",
    exit -6) after its work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
            _leave_process_group()
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
