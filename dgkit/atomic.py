"""Files that a reader never sees half-written: written beside their target, then renamed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask
    (``mkstemp`` creates its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder (the same file system,
    so the rename is atomic; the system's temporary folder often is not), flush it to disk
    and rename it over ``path``. A failure leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # as the run's other files, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
