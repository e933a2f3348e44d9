"""ERM (and CORAL) trained by DomainBed's own ``train.py`` and by ``dgkit fit`` on the same
embedded Rotated MNIST domains, both read at DomainBed's training-domain validation.

    python benchmarks/erm_vs_domainbed.py --domainbed /tmp/DomainBed --dir sweeps/vs_domainbed \\
        [--algos erm coral] [--seeds 0 1 2] [--test-domains 75] [--steps 200] [--checkpoint-freq 50] \\
        [--jobs 2] [--domainbed-sampling without-replacement]

DomainBed is not a dependency: its ``domainbed/scripts/train.py`` runs unmodified from the
checkout, in its own process, with ``domainbed.datasets.RotatedMNIST`` replaced by dgkit's
embedded domains (the same 6 x 833 images dgkit trains on; DomainBed's hyperparameter
defaults for RotatedMNIST therefore apply: Adam, lr 1e-3, batch 64 per domain, no weight
decay). The same network (DomainBed's MNIST CNN; dgkit's ``mnist_cnn``), batch, optimizer,
steps and evaluation every ``--checkpoint-freq`` steps on both sides. Each side then picks
the evaluation of best mean source-domain hold-out accuracy and reports the held-out
domain's accuracy there (DomainBed's ``IIDAccuracySelectionMethod.run_acc``; dgkit's best
checkpoint, tested). Seed ``s`` is DomainBed's ``--seed s --trial_seed s`` and dgkit's
``--seed_everything s --data.split_seed s``: the 80/20 hold-out splits are drawn by each
library's own rule, so the two sides see the same domains, not the same split. Runs already
done (their results in ``--dir``) are read, not rerun. ``--jobs N`` runs N trainings at a
time, each on its share of the cores (``OMP_NUM_THREADS``). ``--domainbed-sampling
without-replacement`` gives DomainBed's training loaders its own
``InfiniteDataLoaderWithoutReplacement``, which walks each domain in passes as dgkit does
(its ``train.py`` draws with replacement): the one difference of the two loops left after
the same network, data, batch, optimizer and update (the step is a plain Adam step on the
concatenated minibatches on both sides, ``tests/test_training_step.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import runpy
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOMAINS = ("0", "15", "30", "45", "60", "75")


def domainbed_train(root: Path, argv: list[str], without_replacement: bool = False) -> None:
    """DomainBed's train.py as ``__main__``, on dgkit's embedded domains (this process only);
    ``without_replacement``: its training loaders are DomainBed's own
    ``InfiniteDataLoaderWithoutReplacement`` (passes over each domain, as dgkit samples)."""
    sys.path.insert(0, str(root))
    from domainbed import datasets
    from domainbed.lib import fast_data_loader
    from torch.utils.data import TensorDataset

    from dgkit.data.mnist import RotatedMNIST

    class EmbeddedRotatedMNIST(datasets.MultipleDomainDataset):
        ENVIRONMENTS = list(DOMAINS)
        N_WORKERS = 0  # dgkit's default; the tensors are in memory either way

        def __init__(self, root, test_envs, hparams):
            super().__init__()
            ours = RotatedMNIST()
            self.datasets = [TensorDataset(*ours.domain_dataset(i).tensors) for i in range(len(DOMAINS))]
            self.input_shape, self.num_classes = (1, 28, 28), 10

    datasets.RotatedMNIST = EmbeddedRotatedMNIST  # the name keeps DomainBed's small-image defaults
    if without_replacement:  # train.py imports the name when it runs, after this
        fast_data_loader.InfiniteDataLoader = fast_data_loader.InfiniteDataLoaderWithoutReplacement
    sys.argv = ["train.py", *argv]
    runpy.run_path(str(root / "domainbed" / "scripts" / "train.py"), run_name="__main__")


def domainbed_accuracy(out: Path) -> tuple[float, float]:
    """(test, source validation) accuracy at the best training-domain validation (DomainBed's
    IID selection)."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    test = records[0]["args"]["test_envs"][0]

    def validation(r: dict) -> float:
        return statistics.mean(r[f"env{i}_out_acc"] for i in range(len(DOMAINS)) if i != test)

    best = max(records, key=validation)
    return best[f"env{test}_in_acc"], validation(best)


def run_domainbed(args: argparse.Namespace, name: str, domain: str, seed: int) -> tuple[float, float]:
    side = "domainbed" if args.domainbed_sampling == "with-replacement" else "domainbed-without-replacement"
    out = args.dir / side / name / domain / f"seed{seed}"
    if not (out / "done").exists():
        argv = ["--data_dir", str(out), "--dataset", "RotatedMNIST", "--algorithm", name,
                "--test_envs", str(DOMAINS.index(domain)), "--steps", str(args.steps),
                "--checkpoint_freq", str(args.checkpoint_freq), "--seed", str(seed),
                "--trial_seed", str(seed), "--output_dir", str(out), "--skip_model_save"]
        subprocess.run([sys.executable, __file__, "--domainbed", str(args.domainbed),
                        "--domainbed-sampling", args.domainbed_sampling, "--train", *argv],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=args.env)
    return domainbed_accuracy(out)


def run_dgkit(args: argparse.Namespace, alias: str, domain: str, seed: int) -> tuple[float, float]:
    out = args.dir / "dgkit" / alias / domain / f"seed{seed}"
    results = out / "runs" / "version_0" / "test_results.json"
    if not results.exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["dgkit", "fit", "--algo", alias, "--data", "rotated_mnist", "--data.test_domains", f"[{domain}]",
             "--model.backbone", "mnist_cnn", "--data.batch_size", "64",
             "--model.optimizer.lr", "1e-3", "--model.optimizer.weight_decay", "0",
             "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
             "--trainer.val_check_interval", str(args.checkpoint_freq),
             "--trainer.check_val_every_n_epoch", "null", "--seed_everything", str(seed),
             "--data.split_seed", str(seed), "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"],
            cwd=out, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=args.env)
    with (results.parent / "metrics.csv").open() as file:  # the CSV logger's, as written
        validation = max(float(r["val/accuracy"]) for r in csv.DictReader(file) if r["val/accuracy"])
    return json.loads(results.read_text())["domains"][domain]["accuracy"], validation


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domainbed", required=True, type=Path, help="a DomainBed checkout")
    parser.add_argument("--dir", type=Path, help="where the runs go (required unless --train)")
    parser.add_argument("--algos", nargs="+", default=["erm", "coral"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-domains", nargs="+", default=["75"], choices=DOMAINS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-freq", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at a time")
    parser.add_argument("--domainbed-sampling", choices=["with-replacement", "without-replacement"],
                        default="with-replacement",
                        help="DomainBed's training loaders: its train.py's InfiniteDataLoader (with "
                        "replacement) or its InfiniteDataLoaderWithoutReplacement (dgkit's passes)")
    parser.add_argument("--train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.domainbed / "domainbed" / "scripts" / "train.py").exists():
        parser.error(f"{args.domainbed} has no domainbed/scripts/train.py: pass the root of a checkout")
    if args.train is not None:  # the child process: DomainBed's script itself
        domainbed_train(args.domainbed, args.train, args.domainbed_sampling == "without-replacement")
        (Path(args.train[args.train.index("--output_dir") + 1]) / "done").touch()
        return
    if args.dir is None:
        parser.error("--dir is required")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    from dgkit.plugins import registry

    print(f"Rotated MNIST (embedded), MNIST CNN, {args.steps} steps, evaluated every "
          f"{args.checkpoint_freq}, seeds {' '.join(map(str, args.seeds))}, DomainBed sampling "
          f"{args.domainbed_sampling}; held-out accuracy (%) at training-domain validation, mean ± "
          "standard error over seeds")
    print("| algorithm | held out | dgkit | DomainBed | dgkit - DomainBed | within the seeds' SE | "
          "source validation dgkit / DomainBed |\n|---|---|---|---|---|---|---|")
    names = {alias: registry("algorithm").get(alias).obj.__name__ for alias in args.algos}
    runs = [(alias, domain, seed) for alias in args.algos for domain in args.test_domains
            for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # each training is its own process
        ours = dict(zip(runs, pool.map(lambda r: run_dgkit(args, *r), runs), strict=True))
        theirs = dict(zip(runs, pool.map(lambda r: run_domainbed(args, names[r[0]], *r[1:]), runs),
                          strict=True))
    for alias in args.algos:
        name = names[alias]
        for domain in args.test_domains:
            ours_ = [100 * ours[alias, domain, s][0] for s in args.seeds]
            theirs_ = [100 * theirs[alias, domain, s][0] for s in args.seeds]
            val1 = statistics.mean(100 * ours[alias, domain, s][1] for s in args.seeds)
            val2 = statistics.mean(100 * theirs[alias, domain, s][1] for s in args.seeds)
            (m1, s1), (m2, s2) = mean_se(ours_), mean_se(theirs_)
            combined = math.hypot(s1, s2)
            print(f"| {name} | {domain} | {m1:.1f} ± {s1:.1f} | {m2:.1f} ± {s2:.1f} | {m1 - m2:+.1f} | "
                  f"{'yes' if abs(m1 - m2) <= combined else 'no'} (SE of the difference {combined:.1f}) | "
                  f"{val1:.1f} / {val2:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
