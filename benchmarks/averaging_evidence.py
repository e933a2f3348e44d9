"""Weight averages against the last iterate of the same runs, over seeds, and ensembles of
those runs, on the embedded Rotated MNIST through ``dgkit sweep`` and ``dgkit ensemble``.

    python benchmarks/averaging_evidence.py --dir sweeps/evidence [--seeds 5] [--steps 1500]
        [--backbone mlp] [--test-domain 75] [--methods sma swad] [--sgd LR]

For each averaging method: a sweep of ERM over ``--seeds`` seeds with that averaging; for
every run, the held-out accuracy of its tested average and of its last iterate (both in
its test_results.json), and the rho-sharpness of each (dgkit.sharpness: the loss increase
at SAM's worst point of radius 0.05 and the mean over 10 random directions of norm 2, on
1,024 source training images) from the checkpoint, which holds both. Then EoA and the
soups of the SMA runs (``dgkit ensemble``), and DiWA: the same runs started from one
shared ERM run (``dgkit sweep --init-from``) and their uniform soup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import torch

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SETTINGS = {"sma": lambda steps: ["--model.averaging.start", str(steps // 3)], "swad": lambda steps: [],
            "ema": lambda steps: ["--model.averaging.decay", "0.99"]}


def sweep(directory: Path, seeds: int, args: argparse.Namespace, options: list[str],
          run_options: list[str]) -> None:
    argv = ["dgkit", "sweep", "--dir", str(directory), "--algos", "erm", "--test-domains",
            args.test_domain, "--seeds", *map(str, range(seeds)), *options, "--", "--data", "rotated_mnist",
            "--model.backbone", args.backbone, "--trainer.max_steps", str(args.steps),
            "--trainer.val_check_interval", str(args.steps // 15), "--trainer.check_val_every_n_epoch",
            "null", *QUIET, *args.optimizer, *run_options]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "sweep.log").open("a") as log:  # the runs' own lines, for a failure
        subprocess.run(argv, check=True, stdout=log, stderr=log)


def source_batch(checkpoint: Path, size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    from dgkit.data import DomainDataModule

    data = DomainDataModule.load_from_checkpoint(checkpoint)
    data.prepare_data()
    data.setup("fit")
    xs, ys = [], []
    for x, y, *_ in data.source_eval_dataloader(include_holdout=False):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:size]
    return x[chosen], y[chosen]


def measure(run: Path) -> dict[str, float]:
    """The run's average at the end of training against its last iterate: ``last.ckpt``
    holds both, tested again so that checkpoint selection does not enter the comparison
    (SWAD's average is its valley's, in ``swad.ckpt``, which the run tested; its last
    iterate is ``last.ckpt``'s weights, which SWAD validated)."""
    from dgkit.module import DGModule
    from dgkit.sharpness import random_sharpness, worst_case_sharpness

    folder = run / "runs" / "version_0"
    tested = json.loads((folder / "test_results.json").read_text())
    swad = tested["averaging"]["method"] == "SWAD"
    checkpoint = run / tested["ckpt_path"] if swad else folder / "checkpoints" / "last.ckpt"
    if not swad:
        subprocess.run(["dgkit", "test", "--ckpt_path", str(checkpoint), *QUIET], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tested = json.loads((folder / "test-last" / "test_results.json").read_text())
    scores = tested["domains"][next(iter(tested["domains"]))]
    out = {"average": scores["accuracy"], "last": scores["accuracy (last iterate)"],
           "averaged": tested["averaging"]["averaged"]}
    x, y = source_batch(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    last_ckpt = folder / "checkpoints" / "last.ckpt"
    last = (torch.load(last_ckpt, map_location="cpu", weights_only=False)["state_dict"]
            if swad else saved["current_model_state"])
    for name, state in (("average", saved["state_dict"]), ("last", last)):
        module = DGModule.load_from_checkpoint(checkpoint, map_location="cpu", averaging=None)
        module.load_state_dict(state)
        out[f"worst {name}"] = worst_case_sharpness(module.algorithm, x, y, rho=0.05)
        out[f"random {name}"] = random_sharpness(module.algorithm, x, y, rho=2.0)
    return out


def tested_accuracy(run: Path) -> float:
    results = json.loads((run / "runs" / "version_0" / "test_results.json").read_text())
    return next(iter(results["domains"].values()))["accuracy"]


def ensemble(directory: Path, method: str) -> float:
    subprocess.run(["dgkit", "ensemble", str(directory), "--method", method], check=True,
                   stdout=subprocess.DEVNULL)
    (results,) = directory.glob(f"ensembles/{method}/erm/*/split0/test_results.json")
    return next(iter(json.loads(results.read_text())["domains"].values()))["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--backbone", default="mlp")
    parser.add_argument("--test-domain", default="75")
    parser.add_argument("--methods", nargs="+", default=["sma", "swad"], choices=list(SETTINGS))
    parser.add_argument("--sgd", type=float, metavar="LR",
                        help="train with SGD (momentum 0.9) at this constant rate instead of Adam at 1e-3: "
                        "the noisy iterates SWA was designed for")
    args = parser.parse_args()
    args.optimizer = (["--model.optimizer", "SGD", "--model.optimizer.lr", str(args.sgd),
                       "--model.optimizer.momentum", "0.9"] if args.sgd else [])
    optimizer = f"SGD lr {args.sgd} momentum 0.9" if args.sgd else "Adam lr 0.001"
    print(f"ERM on rotated_mnist held out on {args.test_domain}, {args.backbone}, {optimizer}, "
          f"{args.steps} steps, {args.seeds} seeds; accuracy in %, sharpness: loss increase on 1,024 "
          "source images")
    print(f"{'averaging':<10}{'average':>9}{'last':>8}{'avg >= last':>13}{'worst-case sharpness':>24}"
          f"{'random sharpness':>22}")
    for method in args.methods:
        folder = args.dir / method
        sweep(folder, args.seeds, args, [], ["--model.averaging", method, *SETTINGS[method](args.steps)])
        runs = [measure(p.parent) for p in sorted(folder.glob("erm/*/default/seed*/run.json"))]

        def mean(key: str, scale: float = 1.0, runs=runs) -> float:
            return scale * statistics.fmean(r[key] for r in runs)
        wins = f"{sum(r['average'] >= r['last'] for r in runs)} of {len(runs)}"
        print(f"{method:<10}{mean('average', 100):>9.2f}{mean('last', 100):>8.2f}{wins:>13}"
              f"{mean('worst average'):>11.4f} vs {mean('worst last'):.4f}"
              f"{mean('random average'):>9.4f} vs {mean('random last'):.4f}")
    if "sma" in args.methods:
        folder = args.dir / "sma"
        members = [tested_accuracy(p.parent) for p in sorted(folder.glob("erm/*/default/seed*/run.json"))]
        print(f"\nensembles of the {len(members)} SMA runs' tested checkpoints (the runs: mean "
              f"{100 * statistics.fmean(members):.2f}, best {100 * max(members):.2f})")
        for method in ("eoa", "uniform", "greedy"):
            print(f"{method:<8} {100 * ensemble(folder, method):.2f}")
        init = args.dir / "init"
        sweep(init, 1, args, [], ["--trainer.max_steps", str(args.steps // 3)])
        diwa = args.dir / "diwa"
        sweep(diwa, args.seeds, args, ["--init-from", str(init)],
              ["--model.averaging", "sma", *SETTINGS["sma"](args.steps)])
        shared = [tested_accuracy(p.parent) for p in sorted(diwa.glob("erm/*/default/seed*/run.json"))]
        print(f"\nfrom one shared ERM run of {args.steps // 3} steps (--init-from): runs' mean "
              f"{100 * statistics.fmean(shared):.2f}, best {100 * max(shared):.2f}")
        for method in ("eoa", "uniform", "greedy"):
            print(f"{method:<8} {100 * ensemble(diwa, method):.2f}")


if __name__ == "__main__":
    main()
