"""Checkpoint files: written atomically, read safely.

:class:`AtomicCheckpointIO` writes every checkpoint (best, last, stage, Slurm) to a
temporary file in the same folder and renames it over the old one, so no reader ever takes
half a file for the latest. (Lightning's own writer stages the file in the system's
temporary folder and moves it, which is a copy when that folder is on another file system,
as it is on clusters.) :func:`read_checkpoint` loads with ``weights_only`` (tensors and
plain data, never code) and names a damaged or unsafe file instead of a traceback.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dgkit.atomic import write_atomically
from dgkit.errors import DGKitError


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
        write_atomically(path, lambda fh: torch.save(checkpoint, fh))
