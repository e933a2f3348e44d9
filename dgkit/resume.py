"""``dgkit fit`` run twice with the same configuration continues the first run: the newest
unfinished run folder (no ``test_results.json``, no live process of this machine still
training in it) whose saved ``config.yaml`` matches is
resumed from its ``last.ckpt``, in the same folder, with its metrics kept up to the
checkpoint. This is what makes a killed or Slurm-requeued job resume by running the same
command again.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from dgkit.checkpoint_io import read_checkpoint
from dgkit.checkpointing import METRICS_FILE, RESUME_FILE, ResumeCheckpoint, held_by_live_process
from dgkit.errors import DGKitError
from dgkit.results import RESULTS_FILE
from dgkit.run_folder import CONFIG_FILE


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run's configuration that decide what it computes."""
    config = {k: v for k, v in config.items() if k not in ("ckpt_path", "resume")}
    trainer = dict(config.get("trainer") or {})
    loggers = trainer.get("logger")
    if isinstance(loggers, list):  # the version is where a run goes, not what it computes
        trainer["logger"] = [
            {**lg, "init_args": {k: v for k, v in (lg.get("init_args") or {}).items() if k != "version"}}
            if isinstance(lg, dict) else lg for lg in loggers]
    config["trainer"] = trainer
    return config


def find_unfinished(root: Path, config: dict[str, Any]) -> tuple[int, Path] | None:
    """``(version, last checkpoint)`` of the newest unfinished run under ``root`` (a
    logger's ``save_dir/name``) that ran ``config``; None if there is none."""
    if not root.is_dir():
        return None
    wanted = _comparable(config)
    versions = sorted((int(p.name.split("_")[1]), p) for p in root.glob("version_*")
                      if p.name.split("_")[1].isdigit())
    for version, folder in reversed(versions):
        checkpoint = folder / "checkpoints" / RESUME_FILE
        if (folder / RESULTS_FILE).exists() or not checkpoint.is_file() or held_by_live_process(folder):
            continue
        try:
            saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict) and _comparable(saved) == wanted:
            return version, checkpoint
    return None


def metrics_logged_before(checkpoint: dict[str, Any], folder: Path) -> list[dict[str, int | float]]:
    """The rows of the run's ``metrics.csv`` that were logged when ``checkpoint`` was
    written (their count is in it); the resumed run logs the later ones again."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    state = (checkpoint.get("callbacks") or {}).get(ResumeCheckpoint.__qualname__) or {}
    if state.get("metrics_rows") is not None:
        return rows[:state["metrics_rows"]]
    step = checkpoint["global_step"]  # a checkpoint written by another callback: by step
    return [r for r in rows if "step" in r and r["step"] < step]


def _number(text: str) -> int | float:
    try:
        return int(text)  # epoch and step columns stay integers when written back
    except ValueError:
        return float(text)


def resume_unfinished(config: Any, dump: dict[str, Any]) -> list[dict[str, int | float]]:
    """``dgkit fit`` with the configuration of an unfinished run: point ``config`` (the fit
    namespace; ``dump`` is it as ``config.yaml`` holds it) at that run's folder and
    ``last.ckpt``. Returns the metric rows the run logged before its checkpoint, for the
    resumed CSV logger to write back first."""
    loggers = config.trainer.logger
    if not isinstance(loggers, list) or not loggers or "init_args" not in loggers[0]:
        return []  # no logger, no run folder to find
    first = loggers[0].init_args
    if first.get("version") is not None:
        return []
    root = Path(first.get("save_dir") or ".") / (first.get("name") or "")
    found = find_unfinished(root, dump)
    if found is None:
        return []
    version, checkpoint = found
    for logger in loggers:
        if "init_args" in logger and "version" in logger.init_args:
            logger.init_args.version = version
    config.ckpt_path = str(checkpoint)
    # Memory-mapped: only the step and the callbacks' state are read here; Lightning reads
    # the rest when it restores.
    try:
        state = read_checkpoint(checkpoint, mmap=True)
    except DGKitError as exc:
        raise DGKitError(f"the unfinished run {checkpoint.parent.parent} cannot be resumed: {exc} "
                         f"Resume from another with --ckpt_path {checkpoint.parent}/<file>, or "
                         "start a new run with --resume false.") from None
    Console(stderr=True).print(f"resuming the unfinished run {checkpoint.parent.parent} from step "
                               f"{state['global_step']} ({checkpoint}); --resume false starts a new run")
    return metrics_logged_before(state, checkpoint.parent.parent)
