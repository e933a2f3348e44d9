"""Checkpoints that survive being killed: atomic writes, a resume checkpoint kept fresh
during training, and Slurm's pre-emption warning turned into a checkpoint and a requeue.

- every checkpoint is written atomically and read safely (``dgkit.checkpoint_io``);
- :class:`ResumeCheckpoint` keeps ``last.ckpt`` at most ``every_n_steps`` (by default
  about ten minutes) behind, after every validation and at the end; the file holds
  everything an exact resume needs (weights, optimizers, schedulers, loops, the data
  position and the RNG states).
- SIGTERM and SIGINT (Ctrl-C) are acted on the same way: at the next batch boundary
  the checkpoint is written and the run stops with :class:`~dgkit.errors.RunStopped`
  (exit code 143 or 130); the same command resumes it.
- Under Slurm, the requeue signal (``SIGUSR1``, ``#SBATCH --signal=SIGUSR1@90``) is
  acted on at the next batch boundary, on every rank at the same step: the checkpoint is
  written, the job requeued with ``scontrol requeue`` and training stopped; the requeued
  job runs the same command and resumes (see :func:`dgkit.resume.find_unfinished`).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dgkit.errors import ConfigError, RunStopped

RESUME_FILE = "last.ckpt"
LOCK_FILE = ".running"  # "host pid" of the process training in a run folder
METRICS_FILE = "metrics.csv"
TIMED_STEPS = (5, 25)  # the steps whose time sets the interval of periodic writes


def _count_rows(trainer: Trainer) -> int | None:
    loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if not loggers:
        return None
    path = Path(loggers[0].log_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    with open(path, newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def held_by_live_process(folder: Path) -> bool:
    """Whether a process on this machine is still training in ``folder``. A lock from
    another host counts as stale: a requeued Slurm job may restart anywhere."""
    try:
        host, pid = (folder / LOCK_FILE).read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_partial_checkpoints(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes that a killed process left (SIGKILL,
    a node lost, Slurm's time limit mid-write: ``.last.ckpt.<random>.tmp``, as large as the
    checkpoint); only the run's own process writes in its folder, and it holds the lock."""
    stale = sorted(folder.glob(".*.ckpt.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        rank_zero_info(f"removed {len(stale)} partial checkpoint file(s) a killed run left in {folder}")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (an array task's own id), or None outside Slurm."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class ResumeCheckpoint(Callback):
    """Keep ``last.ckpt`` in the run's checkpoint folder fresh; act on Slurm's requeue signal."""

    requeue_signal = signal.SIGUSR1  # what `#SBATCH --signal=SIGUSR1@90` sends
    stop_signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, every_n_steps: int | None = None, every_n_minutes: float = 10.0):
        """
        Args:
            every_n_steps: write the resume checkpoint every this many training steps
                (besides after each validation, at the end and on a signal); 0 turns the
                periodic writes off. Default: about every ``every_n_minutes``.
            every_n_minutes: without ``every_n_steps``, the time between periodic writes,
                turned into a step count once, from the speed of the run's first steps
                (rank 0's, so that every rank writes at the same step). A fixed step count
                would write a large model's optimizer state every few seconds on an
                accelerator.
        """
        if every_n_steps is not None and every_n_steps < 0:
            raise ConfigError("last_checkpoint.every_n_steps", f"{every_n_steps}", ">= 0")
        if every_n_minutes <= 0:
            raise ConfigError("last_checkpoint.every_n_minutes", f"{every_n_minutes}",
                              "> 0 (or --last_checkpoint.every_n_steps 0 for no periodic writes)")
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self._interval = every_n_steps  # periodic writes every this many steps, once known
        self._clock: list[tuple[float, int]] = []  # (time, global step) after the first batches
        self.requeued = False
        self._signalled = False
        self._stop_signal = 0  # the SIGTERM/SIGINT received, 0 for none
        self._metrics_rows: int | None = None
        self._lock: Path | None = None
        self._previous_handlers: dict[int, Any] = {}

    # --- where -------------------------------------------------------------------------
    @staticmethod
    def folder(trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def save(self, trainer: Trainer) -> Path:
        # The metrics logged so far go to disk first and their count into the checkpoint,
        # so a resumed run keeps exactly them (see dgkit.resume.metrics_logged_before).
        for logger in trainer.loggers:
            logger.save()
        self._metrics_rows = _count_rows(trainer) if trainer.is_global_zero else None
        path = self.folder(trainer) / RESUME_FILE
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank 0 writes
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"metrics_rows": self._metrics_rows}

    # --- when --------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:  # a second identical command must not resume a live run
            self._lock = self.folder(trainer).parent / LOCK_FILE
            self._lock.parent.mkdir(parents=True, exist_ok=True)
            self._lock.write_text(f"{socket.gethostname()} {os.getpid()}")
            remove_partial_checkpoints(self.folder(trainer))
        # Replaces Lightning's SIGTERM handler (which stops without a checkpoint and exits 0)
        # for the time of training; teardown puts the previous handlers back.
        wanted = [*self.stop_signals, *([self.requeue_signal] if slurm_job_id() is not None else [])]
        for signum in wanted:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the weights may be half-way through an update right now.
        if signum == self.requeue_signal:
            self._signalled = True
        elif self._stop_signal == signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the batch to end
        else:
            self._stop_signal = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.requeued:
            return
        if self._previous_handlers:
            stop, requeue = self._stop_signal, int(self._signalled)
            if trainer.world_size > 1:
                # Every rank acts at the same step, whichever of them got the signal (one
                # collective for both flags); one process needs no tensor and no device sync.
                flags = torch.tensor([float(stop), float(requeue)], device=trainer.strategy.root_device)
                stop, requeue = (int(v) for v in trainer.strategy.reduce(flags, reduce_op="max").tolist())
            if stop:
                self._stop(trainer, stop)
            if requeue:
                self._requeue(trainer)
                return
        if self._interval is None:
            self._interval = self._measure_interval(trainer)
        step = trainer.global_step
        if self._interval and step > 0 and step % self._interval == 0:
            self.save(trainer)

    def _measure_interval(self, trainer: Trainer) -> int | None:
        """Steps per ``every_n_minutes``, from the time of this process's steps 5 to 25
        (after the first steps' warm-up); None until then."""
        self._clock.append((time.perf_counter(), trainer.global_step))
        first, last = TIMED_STEPS
        if len(self._clock) < last:
            return None
        (start, start_step), (end, end_step) = self._clock[first - 1], self._clock[last - 1]
        per_step = (end - start) / max(end_step - start_step, 1)  # steps, not batches: accumulation
        interval = max(1, round(60 * self.every_n_minutes / max(per_step, 1e-9)))
        return int(trainer.strategy.broadcast(interval, src=0))  # once: every rank the same

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not after a requeue: Lightning validates once more when told to stop, and the
        # checkpoint must stay at the batch boundary where the signal was acted on.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not self.requeued:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.requeued:
            self.save(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop(self, trainer: Trainer, signum: int) -> None:
        path = self.save(trainer)
        name = signal.Signals(signum).name
        raise RunStopped(signum, f"{name} received: stopped at step {trainer.global_step} after "
                         f"writing {path}; run the same command again to resume from there "
                         "(--resume false starts anew)")

    def _requeue(self, trainer: Trainer) -> None:
        path = self.save(trainer)
        self.requeued = True
        trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        job = slurm_job_id()
        try:
            result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
            ok, detail = result.returncode == 0, (result.stderr or result.stdout).strip()
        except FileNotFoundError:
            ok, detail = False, "scontrol not found"
        if ok:
            rank_zero_info(f"Slurm requeue signal: checkpoint {path} written at step "
                           f"{trainer.global_step}; job {job} requeued, it resumes from there")
        else:
            rank_zero_warn(f"Slurm requeue signal: checkpoint {path} written at step "
                           f"{trainer.global_step}, but `scontrol requeue {job}` failed ({detail}); "
                           "run the same command again to resume")
