"""Checkpoints that survive being killed: atomic writes, a resume checkpoint kept fresh
during training, and Slurm's pre-emption warning turned into a checkpoint and a requeue.

- :class:`AtomicCheckpointIO` writes every checkpoint (best, last, stage, Slurm) to a
  temporary file in the same folder and renames it over the old one, so no reader ever
  takes half a file for the latest. (Lightning's own writer stages the file in the
  system's temporary folder and moves it, which is a copy when that folder is on
  another file system, as it is on clusters.)
- :class:`ResumeCheckpoint` keeps ``last.ckpt`` at most ``every_n_steps`` behind, after
  every validation and at the end; the file holds everything an exact resume needs
  (weights, optimizers, schedulers, loops, the data position and the RNG states).
- SIGTERM and SIGINT (Ctrl-C) are acted on the same way: at the next batch boundary
  the checkpoint is written and the run stops with :class:`~dgkit.errors.RunStopped`
  (exit code 143 or 130); the same command resumes it.
- Under Slurm, the requeue signal (``SIGUSR1``, ``#SBATCH --signal=SIGUSR1@90``) is
  acted on at the next batch boundary, on every rank at the same step: the checkpoint is
  written, the job requeued with ``scontrol requeue`` and training stopped; the requeued
  job runs the same command and resumes (see :func:`dgkit.resume.find_unfinished`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import re
import signal
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dgkit.errors import ConfigError, DGKitError, RunStopped
from dgkit.results import file_mode

RESUME_FILE = "last.ckpt"
LOCK_FILE = ".running"  # "host pid" of the process training in a run folder
METRICS_FILE = "metrics.csv"


def read_checkpoint(path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """A checkpoint's contents, loaded safely (``weights_only``: tensors and plain data,
    never arbitrary objects); a file that is no readable checkpoint is named and refused."""
    path = Path(path)

    def load(**options: Any) -> Any:
        with warnings.catch_warnings():  # torch's own warning repeats the unsafe advice
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, **options)

    try:
        try:
            checkpoint = load(**kwargs)
        except RuntimeError as exc:
            if not kwargs.get("mmap") or "zipfile" not in str(exc):
                raise
            checkpoint = load()  # not torch's zip format, which mmap needs: read it whole
    except FileNotFoundError:
        raise DGKitError(f"no checkpoint file at {str(path)!r}") from None
    except pickle.UnpicklingError as exc:
        # torch's advice here is to load with weights_only=False: never for a file of
        # unknown origin, so only its reason is kept.
        reason = re.search(r"WeightsUnpickler error: ([^.]*)", str(exc))
        if "Unsupported global" not in str(exc):  # not even a pickle torch can read
            raise _damaged(path, reason.group(1) if reason else "not a pickle") from None
        raise DGKitError(f"{path} is not a dgkit checkpoint: it holds data that a safe load refuses "
                         f"({reason.group(1) if reason else 'not tensors and plain data'}), and loading "
                         "it unsafely could run code from it. Use a .ckpt written by `dgkit fit`.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise _damaged(path, " ".join(str(exc).split())[:200]) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DGKitError(f"{path} is not a Lightning checkpoint (no state_dict); use a .ckpt "
                         "written by `dgkit fit`")
    return checkpoint


def _damaged(path: Path, detail: str) -> DGKitError:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    listing = f" Other checkpoints in {path.parent}: {', '.join(others)}." if others else ""
    return DGKitError(f"{path} is not a readable checkpoint (truncated, damaged or another kind of file: "
                      f"{detail}).{listing}")


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:  # asked for explicitly by the caller
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        return read_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, file_mode())  # as the run's other files, not mkstemp's 0600
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


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

    def __init__(self, every_n_steps: int = 50):
        """
        Args:
            every_n_steps: write the resume checkpoint every this many training steps
                (besides after each validation and at the end); 0 turns the periodic
                writes off.
        """
        if every_n_steps < 0:
            raise ConfigError("last_checkpoint.every_n_steps", f"{every_n_steps}", ">= 0")
        self.every_n_steps = every_n_steps
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
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer)

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
