"""``dgkit fit`` run twice with the same configuration continues the first run: the newest
unfinished run folder (no ``test_results.json``, no live process of this machine still
training in it) whose saved ``config.yaml`` matches is
resumed from its ``last.ckpt``, in the same folder, with its metrics kept up to the
checkpoint. This is what makes a killed or Slurm-requeued job resume by running the same
command again.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dgkit.checkpointing import METRICS_FILE, RESUME_FILE, ResumeCheckpoint, held_by_live_process
from dgkit.results import RESULTS_FILE

CONFIG_FILE = "config.yaml"


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


# --- RNG states in checkpoints (plain tensors and ints: they load with weights_only) ---
def rng_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
