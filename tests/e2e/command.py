"""Helpers of the end-to-end layer: the installed ``dgkit`` command in subprocesses, as users run it.

No test here imports dgkit's internals; each runs the console script and checks what a
user sees: exit codes, the lines printed, the files a run writes and where.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).with_name("dgkit")
DGKIT = str(BIN) if BIN.exists() else shutil.which("dgkit")
# Small and quick, but the real command: no progress bar so the output is plain lines.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_line(self) -> str:
        """The one ``dgkit: error:`` line (and that there is exactly one, no traceback)."""
        lines = [line for line in self.err.splitlines() if line.startswith("dgkit: error:")]
        assert len(lines) == 1, self.text[-3000:]
        assert "Traceback" not in self.text, self.text[-3000:]
        return lines[0]


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "COLUMNS": "100", **extra}
    for key in [k for k in env if k.startswith("SLURM_")]:  # a run under `srun` outside Slurm
        del env[key]
    return env


def dgkit(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> Result:
    proc = subprocess.run([DGKIT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or environment())
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([DGKIT, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or environment())


def wait_for(predicate, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def steps_logged(run: Path) -> int:
    """The highest training step in a run's metrics.csv (-1 before any)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return -1
    import csv

    with open(path, newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("step")]
    return max(steps, default=-1)


def results(run: Path) -> dict:
    return json.loads((run / "test_results.json").read_text())


def interrupt(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> tuple[int, str, str]:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err
