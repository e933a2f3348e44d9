"""Where a run's files go: one folder per run (``runs/version_N``) that every logger, the
checkpoints and the results share, wherever ``--trainer.default_root_dir`` puts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

DEFAULT_ROOT = "runs"
CONFIG_FILE = "config.yaml"


def file_loggers(config: Any) -> list:
    """The configured loggers that lay runs out as ``save_dir/name/version`` (CSV,
    TensorBoard); others (MLflow) keep their own stores."""
    loggers = config.trainer.logger
    if not isinstance(loggers, list):
        return []
    return [lg for lg in loggers if "init_args" in lg
            and {"save_dir", "name", "version"} <= set(lg.init_args.keys())]


def follow_root_dir(config: Any) -> None:
    """``--trainer.default_root_dir D`` puts the run in ``D/version_N`` (Lightning's habit):
    the default loggers write where the trainer's root says."""
    root = config.trainer.get("default_root_dir")
    if not root or root == DEFAULT_ROOT:
        return
    for logger in file_loggers(config):
        if logger.init_args.save_dir == DEFAULT_ROOT:
            logger.init_args.save_dir = str(root)


def beside_run(config: Any, ckpt: Path, subcommand: str, name: str = "") -> None:
    """``dgkit test --ckpt_path D/version_N/checkpoints/X.ckpt`` writes its files to
    ``D/version_N/test-X<name>/`` (``name``: what sets the evaluation apart, e.g.
    ``-tent``), beside the run it evaluates, not to a new run."""
    run = ckpt.parent.parent  # as the user wrote it: the printed paths read the same
    if ckpt.resolve().parent.name != "checkpoints" or not (run / CONFIG_FILE).is_file():
        return  # not a dgkit run folder: Lightning's default versioning
    config.checkpoint.dirpath = str(ckpt.parent)  # the run's, as in its fit
    for logger in file_loggers(config):
        logger.init_args.save_dir = str(run.parent)
        logger.init_args.name = ""
        logger.init_args.version = f"{run.name}/{subcommand}-{ckpt.stem}{name}"


def share_one_folder(trainer: Trainer, kept_metrics: list[dict[str, int | float]]) -> None:
    """TensorBoard's events go inside the CSV logger's run folder (one run, one folder)
    instead of each logger counting versions on its own; a resumed run's fresh
    ``metrics.csv`` gets the rows logged before its checkpoint back first."""
    loggers = trainer.loggers
    for logger in loggers[1:]:
        if isinstance(logger, TensorBoardLogger):
            # TensorBoardLogger takes its version only in its constructor, which the
            # configuration built before the CSV logger had counted its own.
            logger._version = loggers[0].version
    csv_logger = loggers[0] if loggers and isinstance(loggers[0], CSVLogger) else None
    if kept_metrics and csv_logger is not None and trainer.is_global_zero:
        for row in kept_metrics:
            step = int(row.pop("step"))
            csv_logger.experiment.log_metrics(row, step)
