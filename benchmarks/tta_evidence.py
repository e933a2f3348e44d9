"""Every test-time method over the same trained checkpoints, against those checkpoints
un-adapted, over seeds, and each method's time per test batch against a plain forward.

    python benchmarks/tta_evidence.py --dir sweeps/tta [--seeds 3] [--steps 600]
        [--backbone mnist_cnn_bn] [--test-domains 60 75] [--batch-size 64] [--label-shift 0.1]
        [--methods bn tent ...]

ERM on the embedded Rotated MNIST, trained on the other rotations (``dgkit fit``, one run
per seed), then ``dgkit test --ckpt_path CKPT --tta METHOD`` for each method with its
default settings: each result holds the adapted accuracy and the same checkpoint's
un-adapted one ("accuracy (no adaptation)"), averaged over the held-out domains, online
along each domain's stream (reset between domains), ``--batch-size`` test images a batch;
with ``--label-shift ALPHA``, again under TTAB's label shift (``--data.label_shift``: the
class proportions drift along each stream, so a batch holds few classes). The timing runs
in this process on the first seed's checkpoint: the median over the test batches of one
adapted batch (the method's updates included) divided by one forward of the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
METHODS = ["bn", "tent", "t3a", "shot_im", "sar", "eata", "lame"]


def fit(folder: Path, seed: int, args: argparse.Namespace) -> Path:
    run = folder / "runs" / "version_0"
    if not (run / "test_results.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "fit.log").open("a") as log:
            subprocess.run(["dgkit", "fit", "--data", "rotated_mnist", "--data.test_domains",
                            json.dumps(args.test_domains), "--model.backbone", args.backbone,
                            "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval",
                            str(max(1, args.steps // 5)), "--trainer.check_val_every_n_epoch", "null",
                            "--seed_everything", str(seed), *QUIET], cwd=folder, check=True,
                           stdout=log, stderr=log)
    return folder / json.loads((run / "test_results.json").read_text())["ckpt_path"]


def adapted(ckpt: Path, method: str, batch_size: int, shift: float | None) -> tuple[float, float]:
    """(adapted, un-adapted) accuracy averaged over the held-out domains."""
    scenario = ["--data.label_shift", str(shift)] if shift is not None else []
    name = f"{method}-shift{shift:g}" if shift is not None else method
    out = ckpt.parent.parent / f"test-{ckpt.stem}-{name}" / "test_results.json"
    if not out.is_file():
        with (ckpt.parent.parent / f"test-{name}.log").open("w") as log:
            subprocess.run(["dgkit", "test", "--ckpt_path", str(ckpt), "--tta", method,
                            "--data.eval_batch_size", str(batch_size), *scenario, *QUIET],
                           check=True, stdout=log, stderr=log)
    domains = json.loads(out.read_text())["domains"].values()
    return (statistics.fmean(d["accuracy"] for d in domains),
            statistics.fmean(d["accuracy (no adaptation)"] for d in domains))


def cost(ckpt: Path, methods: list[str], batch_size: int) -> dict[str, float]:
    """Median time of an adapted test batch over that of a plain forward, per method."""
    from dgkit.adaptation import TestTimeStage
    from dgkit.data import DomainDataModule
    from dgkit.module import DGModule
    from dgkit.plugins import registry

    data = DomainDataModule.load_from_checkpoint(ckpt, eval_batch_size=batch_size)
    data.prepare_data()
    data.setup("test")
    batches = [x for loader in data.test_dataloader() for x, *_ in loader]

    algo = DGModule.load_from_checkpoint(ckpt, map_location="cpu").algorithm.eval()

    def timed(call, x) -> float:
        start = time.perf_counter()
        call(x)
        return time.perf_counter() - start

    def plain(x):
        with torch.no_grad():
            return algo(x)

    out = {}
    for name in methods:
        stage = TestTimeStage(algo, method=registry("tta").get(name).obj())
        stage.begin(lambda: data.source_eval_dataloader(include_holdout=True))
        adapted, forward = [], []
        for _ in range(3):  # each batch's forward timed beside its adapted batch: drift cancels
            for x in batches:
                forward.append(timed(plain, x))
                adapted.append(timed(lambda x, stage=stage: stage.predict(("test", 0), x), x))
        out[name] = statistics.median(adapted) / statistics.median(forward)
        stage.end()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--backbone", default="mnist_cnn_bn")
    parser.add_argument("--test-domains", nargs="+", default=["60", "75"])
    parser.add_argument("--batch-size", type=int, default=64, help="test images per batch")
    parser.add_argument("--label-shift", type=float, help="also test under this label shift")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    ckpts = [fit(args.dir / f"seed{seed}", seed, args) for seed in range(args.seeds)]
    ratios = cost(ckpts[0], args.methods, args.batch_size)
    print(f"ERM on rotated_mnist, {args.backbone}, {args.steps} steps, held out "
          f"{' and '.join(args.test_domains)}; test batches of {args.batch_size}; {args.seeds} seeds "
          "(mean ± standard error, accuracy in %, averaged over the held-out domains)")
    for shift in [None, *([args.label_shift] if args.label_shift is not None else [])]:
        if shift is not None:
            print(f"\nlabel-shifted streams (--data.label_shift {shift:g})")
        print(f"{'method':<9}{'adapted':>14}{'un-adapted':>14}{'gain':>8}{'gains':>9}"
              f"{'batch time / forward':>23}")
        for name in args.methods:
            pairs = [adapted(ckpt, name, args.batch_size, shift) for ckpt in ckpts]
            a, u = [100 * p[0] for p in pairs], [100 * p[1] for p in pairs]
            gains = [x - y for x, y in zip(a, u, strict=True)]
            print(f"{name:<9}{_mean_se(a):>14}{_mean_se(u):>14}{statistics.fmean(gains):>+8.1f}"
                  f"{sum(g > 0 for g in gains):>5} of {len(gains)}{ratios[name]:>20.1f}x")


def _mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {se:.1f}"


if __name__ == "__main__":
    main()
