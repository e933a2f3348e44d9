"""A training step's scalar (its loss) on the host, without making the host wait for it.

Reading a CUDA tensor's value (``float(loss)``, ``if not torch.isfinite(loss)``) blocks the
host until the device has finished the step, so the next step's kernels are queued only
then and the device idles between steps. ``HostScalar`` copies the value into pinned host
memory without blocking and hands it back one step later, when the copy has long arrived:
the non-finite and divergence checks then cost nothing on an accelerator. On the CPU
there is nothing to wait for, and the value is handed back at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: (value, the training step it was taken at)
Reading = tuple[float, int]


class HostScalar:
    def __init__(self, lagged: bool | None = None):
        """
        Args:
            lagged: hand each value back at the next ``push`` instead of at once; ``None``:
                lagged for CUDA tensors only (elsewhere a copy waits for the value anyway).
        """
        self.lagged = lagged
        self._pending: tuple[Tensor, int, torch.cuda.Event | None] | None = None
        self._buffer: Tensor | None = None  # pinned, for CUDA tensors

    def push(self, value: Tensor, step: int) -> Reading | None:
        """Record ``value`` (a scalar tensor) of ``step``; return the reading that is ready:
        this one when not lagged, else the previous push's (``None`` at the first)."""
        lagged = value.is_cuda if self.lagged is None else self.lagged
        if not lagged:
            return float(value.detach()), step
        ready = self.flush()  # read before its buffer takes the new copy
        self._pending = self._start_copy(value.detach(), step)
        return ready

    def flush(self) -> Reading | None:
        """The reading not handed back yet, waiting for its copy if need be (``None``: none)."""
        if self._pending is None:
            return None
        host, step, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        return float(host), step

    def _start_copy(self, value: Tensor, step: int) -> tuple[Tensor, int, torch.cuda.Event | None]:
        if not value.is_cuda:
            return value.float().clone(), step, None
        if self._buffer is None:
            self._buffer = torch.empty((), dtype=torch.float32, pin_memory=True)
        self._buffer.copy_(value.float(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return self._buffer, step, done
