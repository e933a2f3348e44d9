"""``dgkit sweep``: algorithms x held-out domains x seeds x hyperparameters, one ``dgkit
fit`` per combination, each in its own folder; finished runs are skipped, so a sweep
that was stopped resumes by running the same command again.

Locally the runs go one after another in this process. ``--slurm`` writes a job-array
script (one array task per run, ``--index $SLURM_ARRAY_TASK_ID``) for ``sbatch``.

Two selection methods need runs of their own beside each setting's run, which the sweep
adds: ``--kfold`` (crafted-shift k-fold, Efthymiadis et al.) trains on fold A's shifts
validating on fold B's (``fold-A``), the reverse (``fold-B``), and the reported model on
every category (``fold-all``); ``--lodo`` (DomainBed's leave-one-domain-out) holds out one
more training domain per extra run (``lodo-<domain>``), trained like the reported one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dgkit.errors import DGKitError

RUN_FILE = "run.json"


#: crafted-shift k-fold: the training and validation shifts of each fold run
FOLD_DATA = {"A": ("[A]", "[B]"), "B": ("[B]", "[A]"), "all": ("[all]", "[]")}


@dataclass(frozen=True)
class Run:
    algorithm: str
    test_domain: str
    seed: int
    hparams: dict[str, str] = field(default_factory=dict)
    #: crafted-shift k-fold run (``A``, ``B`` or ``all``); "" outside k-fold sweeps
    fold: str = ""
    #: leave-one-domain-out: the training domain this run holds out as well
    validate_on: str = ""

    @property
    def config(self) -> str:
        return "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(self.hparams.items())) or "default"

    @property
    def variant(self) -> str:
        """"" for the reported model, else which auxiliary run this is."""
        if self.validate_on:
            return f"lodo-{self.validate_on}"
        return f"fold-{self.fold}" if self.fold in ("A", "B") else ""

    @property
    def folder(self) -> str:
        leaf = self.variant or ("fold-all" if self.fold == "all" else "")
        base = f"{self.algorithm}/{self.test_domain}/{self.config}/seed{self.seed}"
        return f"{base}/{leaf}" if leaf else base

    def argv(self, extra: list[str]) -> list[str]:
        held_out = ", ".join(filter(None, (self.test_domain, self.validate_on)))
        out = ["fit", "--algo", self.algorithm, *extra,
               "--data.test_domains", f"[{held_out}]", "--seed_everything", str(self.seed)]
        for key, value in self.hparams.items():
            out += [f"--{key}", value]
        if self.fold:
            training, validation = FOLD_DATA[self.fold]
            out += ["--data.crafted_training", training, "--data.crafted_validation", validation]
        return out


def plan(algorithms: list[str], test_domains: list[str], seeds: list[int],
         grid: dict[str, list[str]], random_count: int | None = None, sweep_seed: int = 0,
         kfold: bool = False, lodo: list[str] | None = None) -> list[Run]:
    """Every combination (or ``random_count`` of them, drawn with ``sweep_seed``), each
    with the extra runs of ``kfold`` and of leave-one-domain-out over ``lodo`` (domains)."""
    settings = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if random_count is not None:
        settings = random.Random(sweep_seed).sample(settings, min(random_count, len(settings)))
    runs = []
    for a, h, d, s in itertools.product(algorithms, settings, test_domains, seeds):
        main = "all" if kfold else ""
        runs += [Run(a, d, s, h, fold=f) for f in (("A", "B") if kfold else ())]
        runs.append(Run(a, d, s, h, fold=main))
        runs += [Run(a, d, s, h, fold=main, validate_on=v) for v in (lodo or []) if v != d]
    return runs


def finished(directory: Path) -> bool:
    return any(directory.glob("runs/version_*/test_results.json"))


@contextlib.contextmanager
def _inside(directory: Path):
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def execute(run: Run, root: Path, extra: list[str]) -> str:
    """Run one combination in its folder; returns ``done``, ``skipped`` or ``failed: ...``."""
    from dgkit.cli import main

    directory = root / run.folder
    if finished(directory):
        return "skipped"
    directory.mkdir(parents=True, exist_ok=True)
    argv = run.argv(extra)
    (directory / RUN_FILE).write_text(json.dumps(
        {**asdict(run), "config": run.config, "variant": run.variant, "argv": argv}, indent=2))
    with _inside(directory):
        try:
            main(argv)
        except SystemExit as exc:  # a bad setting in one run must not end the sweep
            return f"failed: exit {exc.code}"
        except Exception as exc:  # nor a crash: it is reported, and retried on the next call
            return f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return "done" if finished(directory) else "failed: no test results"


def slurm_script(root: Path, argv: list[str], runs: int, options: list[str]) -> Path:
    lines = ["#!/bin/bash", f"#SBATCH --array=0-{runs - 1}", "#SBATCH --requeue",
             "#SBATCH --signal=SIGUSR1@90", f"#SBATCH --output={root}/slurm-%A_%a.out",
             *(f"#SBATCH {o}" for o in options), "",
             # --index before the arguments after `--`, which go to every run's `dgkit fit`.
             f"srun dgkit {shlex.join(argv[:1])} --index $SLURM_ARRAY_TASK_ID {shlex.join(argv[1:])}", ""]
    path = root / "sweep.sbatch"
    path.write_text("\n".join(lines))
    return path


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise DGKitError(f"--grid {item!r}: write KEY=V1,V2 "
                             "(e.g. model.optimizer.init_args.lr=1e-3,1e-4)")
        grid[key.removeprefix("--")] = values.split(",")
    return grid


def all_domains(extra: list[str]) -> list[str]:
    """Every domain of the data set the runs use (``--data ALIAS``; Rotated MNIST by default)."""
    from dgkit.cli import DEFAULT_DATASET
    from dgkit.plugins import registry

    alias = DEFAULT_DATASET
    for i, arg in enumerate(extra):
        if arg == "--data" and i + 1 < len(extra):
            alias = extra[i + 1]
        elif arg.startswith("--data="):
            alias = arg.split("=", 1)[1]
    domains = list(getattr(registry("dataset").get(alias).obj, "domains", ()))
    if not domains:
        raise DGKitError(f"--test-domains all: {alias} has no fixed list of domains; name them")
    return domains


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dgkit sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the sweep's folder")
    parser.add_argument("--algos", nargs="+", required=True)
    parser.add_argument("--test-domains", nargs="+", required=True,
                        help="held-out domains, one run each; `all`: every domain of --data")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2 ... (dgkit fit keys)")
    parser.add_argument("--random", type=int, help="draw this many hyperparameter settings")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--kfold", action="store_true",
                        help="crafted-shift k-fold selection: fold-A, fold-B and fold-all runs")
    parser.add_argument("--lodo", nargs="*", metavar="DOMAIN",
                        help="leave-one-domain-out selection over these training domains "
                        "(no names: the other --test-domains)")
    parser.add_argument("--index", type=int, help="run only this combination (Slurm array task)")
    parser.add_argument("--slurm", action="store_true",
                        help="write DIR/sweep.sbatch (a job array) instead of running")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an #SBATCH line for --slurm, e.g. --sbatch=--gres=gpu:1")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.test_domains == ["all"]:
        args.test_domains = all_domains(extra)
    lodo = None if args.lodo is None else (args.lodo or args.test_domains)
    runs = plan(args.algos, args.test_domains, args.seeds, parse_grid(args.grid), args.random,
                args.sweep_seed, args.kfold, lodo)
    if args.slurm:
        own = [a for a in ["sweep", *argv] if a != "--slurm" and not a.startswith("--sbatch")]
        path = slurm_script(root, own, len(runs), args.sbatch)
        print(f"{len(runs)} runs; submit with: sbatch {path}")
        return
    chosen = runs if args.index is None else [runs[args.index]]
    failures = 0
    for i, run in enumerate(chosen):
        status = execute(run, root, extra)
        failures += status.startswith("failed")
        print(f"[{i + 1}/{len(chosen)}] {run.folder}: {status}", file=sys.stderr)
    if failures:
        raise DGKitError(f"{failures} run(s) failed; see their folders under {root}; rerun the "
                         "same command to retry them (finished runs are skipped)")
