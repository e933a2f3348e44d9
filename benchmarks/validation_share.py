"""The share of a run's wall time spent validating, under dgkit's default schedule (a
validation at every epoch's end) and under DomainBed's (every ``checkpoint_freq`` steps:
100 on the MNIST data sets, 300 on the image ones).

Run by hand:  python benchmarks/validation_share.py [--data rotated_mnist] [--epochs 2]

Each row is the installed ``dgkit fit`` command with its defaults (loggers, progress bar,
checkpoints), for ``--epochs`` epochs, and a timing callback added as a user adds one
(``--trainer.callbacks+=``): the time between ``on_fit_start`` and ``on_fit_end``, and
within it the time inside validation loops (the sanity check included, the test after
fit not).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lightning import Callback
from loop_overhead import fit_with_callback


class StageClock(Callback):
    """Writes ``{"fit": s, "validation": s, "validations": n, "steps": n}`` to ``path``."""

    def __init__(self, path: str):
        self.path, self.validating, self.validations, self._start = path, 0.0, 0, 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validating += time.perf_counter() - self._start
        self.validations += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps({
            "fit": time.perf_counter() - self.fit_start, "validation": self.validating,
            "validations": self.validations, "steps": trainer.global_step}))


def measure(data: str, epochs: int, extra: list[str]) -> dict:
    return fit_with_callback(["--data", data, "--trainer.max_epochs", str(epochs),
                              "--trainer.limit_test_batches", "0", *extra], "validation_share.StageClock")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="rotated_mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-freq", type=int, default=100, help="DomainBed's, for this data set")
    parser.add_argument("args", nargs="*", help="more dgkit fit arguments (after --)")
    args = parser.parse_args()
    schedules = {
        "dgkit default (every epoch)": [],
        f"DomainBed's (every {args.checkpoint_freq} steps)": [
            "--trainer.check_val_every_n_epoch", "null",
            "--trainer.val_check_interval", str(args.checkpoint_freq)],
    }
    print(f"\n{args.data}, {args.epochs} epochs, dgkit fit defaults {' '.join(args.args)}")
    print(f"{'schedule':<34} {'steps':>6} {'validations':>12} {'fit (s)':>8} {'validating (s)':>15} "
          f"{'share':>7}")
    for name, extra in schedules.items():
        r = measure(args.data, args.epochs, [*extra, *args.args])
        print(f"{name:<34} {r['steps']:>6} {r['validations']:>12} {r['fit']:>8.1f} {r['validation']:>15.1f} "
              f"{r['validation'] / r['fit']:>7.1%}")


if __name__ == "__main__":
    main()
