"""``dgkit sweep``: algorithms x held-out domains x seeds x hyperparameters, one ``dgkit
fit`` per combination, each in its own folder; finished runs are skipped, so a sweep
that was stopped resumes by running the same command again.

Locally the runs go one after another in this process. ``--slurm`` writes a job-array
script (one array task per run, ``--index $SLURM_ARRAY_TASK_ID``) for ``sbatch``.

``--random N --trials K`` without ``--grid`` is DomainBed's protocol: for every algorithm
and held-out domain, N hyperparameter settings (0: the defaults, ``h > 0``: drawn from the
algorithm's search space with the seed ``seed_hash(h, t)``, as DomainBed's) times K trials
(trial ``t`` also sets the holdout split, ``--data.split_seed t``); ``dgkit report`` picks a
setting per trial and averages over trials. With ``--grid``, ``--random N`` samples N of the
grid's combinations instead.

Two selection methods need runs of their own beside each setting's run, which the sweep
adds: ``--kfold`` (crafted-shift k-fold, Efthymiadis et al.) trains on fold A's shifts
validating on fold B's (``fold-A``), the reverse (``fold-B``), and the reported model on
every category (``fold-all``); ``--lodo`` (DomainBed's leave-one-domain-out) holds out one
more training domain per extra run (``lodo-<domain>``), trained like the reported one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
    #: DomainBed's protocol: the setting's number (0: defaults); ``seed`` is then the trial
    hparams_seed: int | None = None
    #: the training seed, when it is not ``seed`` (the protocol derives it, as DomainBed)
    run_seed: int | None = None

    @property
    def config(self) -> str:
        if self.hparams_seed is not None:
            return f"hp{self.hparams_seed}"
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
        repeat = f"trial{self.seed}" if self.hparams_seed is not None else f"seed{self.seed}"
        base = f"{self.algorithm}/{self.test_domain}/{self.config}/{repeat}"
        return f"{base}/{leaf}" if leaf else base

    def argv(self, extra: list[str]) -> list[str]:
        held_out = ", ".join(filter(None, (self.test_domain, self.validate_on)))
        seed = self.seed if self.run_seed is None else self.run_seed
        out = ["fit", "--algo", self.algorithm, *extra,
               "--data.test_domains", f"[{held_out}]", "--seed_everything", str(seed)]
        if self.hparams_seed is not None:  # each trial its own holdout split, as DomainBed
            out += ["--data.split_seed", str(self.seed)]
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
        runs += with_helper_runs(Run(a, d, s, h), kfold, lodo)
    return runs


def with_helper_runs(run: Run, kfold: bool, lodo: list[str] | None) -> list[Run]:
    """``run`` (as k-fold's ``fold-all`` run under ``kfold``) and the runs its selection
    methods need: k-fold's ``fold-A`` and ``fold-B``, one per ``lodo`` domain held out too."""
    main = dataclasses.replace(run, fold="all" if kfold else "")
    return ([dataclasses.replace(run, fold=f) for f in (("A", "B") if kfold else ())] + [main]
            + [dataclasses.replace(main, validate_on=v) for v in (lodo or []) if v != run.test_domain])


def plan_protocol(algorithms: list[str], test_domains: list[str], n_hparams: int, n_trials: int,
                  dataset: str, kfold: bool = False, lodo: list[str] | None = None) -> list[Run]:
    """DomainBed's random search: every algorithm x held-out domain x setting ``h`` (of
    ``n_hparams``) x trial ``t`` (of ``n_trials``), with the extra runs of ``kfold`` and
    ``lodo`` as :func:`plan` adds them."""
    from dgkit.plugins import registry
    from dgkit.search_space import cli_value, seed_hash, setting

    runs = []
    for a, d, h, t in itertools.product(algorithms, test_domains, range(n_hparams), range(n_trials)):
        values = setting(a, registry("algorithm").get(a).obj, dataset, None if h == 0 else seed_hash(h, t))
        hparams = {key: cli_value(v) for key, v in values.items()}
        run = Run(a, d, t, hparams, hparams_seed=h, run_seed=seed_hash(dataset, a, d, h, t))
        runs += with_helper_runs(run, kfold, lodo)
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


def init_checkpoints(directory: Path) -> dict[tuple[str, int], Path]:
    """``--init-from DIR``: ``(held-out domain, data split) -> the tested checkpoint`` of
    DIR's finished runs, one per domain and split (a shared start is one model)."""
    from dgkit.ensemble import find_members

    out: dict[tuple[str, int], Path] = {}
    for (_, domain, split), members in find_members(directory).items():
        if (domain, split) in out or len(members) > 1:
            raise DGKitError(f"--init-from {directory}: several finished runs held out {domain} "
                             f"(split {split}); a shared start is one run per held-out domain "
                             "(sweep it with one algorithm, setting and seed)")
        out[(domain, split)] = members[0].checkpoint.resolve()
    return out


def init_argument(run: Run, starts: dict[tuple[str, int], Path], extra: list[str]) -> list[str]:
    """``--model.init_from`` of the start that held out ``run``'s domain, on its data split
    (the only one of that domain when the start was trained on one split)."""
    split = run.seed if run.hparams_seed is not None else int(_option(extra, "--data.split_seed") or 0)
    path = starts.get((run.test_domain, split))
    if path is None:
        same_domain = [p for (d, _), p in starts.items() if d == run.test_domain]
        if len(same_domain) != 1:
            raise DGKitError(f"--init-from: no finished run there held out {run.test_domain} "
                             f"(split {split}); run that sweep with --test-domains {run.test_domain} first")
        path = same_domain[0]
    return ["--model.init_from", str(path)]


def _option(extra: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


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


def dataset_alias(extra: list[str]) -> str:
    """The data set the runs use (``--data ALIAS``; Rotated MNIST by default)."""
    from dgkit.cli import DEFAULT_DATASET

    return _option(extra, "--data") or DEFAULT_DATASET


def all_domains(extra: list[str]) -> list[str]:
    """Every domain of the data set the runs use."""
    from dgkit.plugins import registry

    alias = dataset_alias(extra)
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
    parser.add_argument("--random", type=int, metavar="N",
                        help="N hyperparameter settings: DomainBed's random search over each "
                        "algorithm's search space (with --grid: N of the grid's combinations)")
    parser.add_argument("--trials", type=int, metavar="K",
                        help="with --random and no --grid: K trials of every setting (DomainBed's "
                        "trial_seed 0..K-1; default 1)")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--kfold", action="store_true",
                        help="crafted-shift k-fold selection: fold-A, fold-B and fold-all runs")
    parser.add_argument("--lodo", nargs="*", metavar="DOMAIN",
                        help="leave-one-domain-out selection over these training domains "
                        "(no names: the other --test-domains)")
    parser.add_argument("--init-from", metavar="DIR",
                        help="start every run from the run of sweep DIR that held out the same "
                        "domain (--model.init_from its tested checkpoint): a shared start, as DiWA's")
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
    grid = parse_grid(args.grid)
    if args.trials is not None and (args.random is None or grid):
        raise DGKitError("--trials K goes with --random N and no --grid (DomainBed's random search); "
                         "for repeated grid runs use --seeds")
    if args.random is not None and not grid:
        if args.random < 1 or (args.trials or 1) < 1:
            raise DGKitError("--random N and --trials K: N and K must be at least 1")
        runs = plan_protocol(args.algos, args.test_domains, args.random, args.trials or 1,
                             dataset_alias(extra), args.kfold, lodo)
    else:
        runs = plan(args.algos, args.test_domains, args.seeds, grid, args.random,
                    args.sweep_seed, args.kfold, lodo)
    if args.slurm:
        own = [a for a in ["sweep", *argv] if a != "--slurm" and not a.startswith("--sbatch")]
        path = slurm_script(root, own, len(runs), args.sbatch)
        print(f"{len(runs)} runs; submit with: sbatch {path}")
        return
    chosen = runs if args.index is None else [runs[args.index]]
    starts = init_checkpoints(Path(args.init_from)) if args.init_from else None
    failures = 0
    for i, run in enumerate(chosen):
        status = execute(run, root, extra + (init_argument(run, starts, extra) if starts else []))
        failures += status.startswith("failed")
        print(f"[{i + 1}/{len(chosen)}] {run.folder}: {status}", file=sys.stderr)
    if failures:
        raise DGKitError(f"{failures} run(s) failed; see their folders under {root}; rerun the "
                         "same command to retry them (finished runs are skipped)")
