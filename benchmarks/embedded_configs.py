"""``configs/embedded/<data set>/<algorithm>.yaml`` from recorded sweeps: per algorithm and
embedded data set, the hyperparameter setting with the best training-domain validation
accuracy, averaged over every held-out domain and trial of the sweeps given.

    python benchmarks/embedded_configs.py SWEEP_DIR [SWEEP_DIR ...] [--algos ...] \\
        [--out configs/embedded]

A sweep folder is what ``dgkit sweep --dir`` writes for one data set (the table's
``benchmarks/domainbed_table.py --dir D`` writes ``D/rotated_mnist`` and ``D/colored_mnist``);
folders of several searches of the same data set are pooled, so a later, wider search of one
algorithm (``dgkit sweep --grid``/``--random``) joins the settings already tried. Selection
reads validation only, never the held-out domains; the held-out accuracy at the selected
checkpoints is written beside it in the config's header, with every setting tried.

The config is ``dgkit fit ... --print_config=skip_default`` of the chosen setting's runs,
minus what belongs to one run of a sweep (held-out domain, seed, split seed, test tracking,
progress bar), with the algorithm and data set always named.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import NoReturn

import yaml

from dgkit.cli import main as dgkit
from dgkit.errors import DGKitError
from dgkit.report import HELD_OUT, SCORES, Record, load_runs

VALIDATION = SCORES["training-domain validation"]
#: options of one sweep run that a config for users leaves out: (option, takes a value)
PER_RUN = {"--data.test_domains": True, "--seed_everything": True, "--data.split_seed": True,
           "--data.track_test": True, "--trainer.enable_progress_bar": True,
           "--trainer.enable_model_summary": True}


def options(argv: list[str]) -> list[str]:
    """A run's ``dgkit fit`` options without the per-run ones."""
    out, skip = [], False
    for i, arg in enumerate(argv[1:], 1):  # argv[0] is "fit"
        if skip:
            skip = False
            continue
        if arg in PER_RUN:
            skip = PER_RUN[arg] and i + 1 < len(argv)
            continue
        out.append(arg)
    return out


def printed(argv: list[str], flag: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        dgkit(["fit", *argv, flag])
    return yaml.safe_load(out.getvalue())


def config_of(argv: list[str], steps: int) -> dict:
    """The non-default part of the run's configuration, algorithm and data set named, for
    ``steps`` training steps."""
    argv = [*argv, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1"]
    full = printed(argv, "--print_config")
    short = printed(argv, "--print_config=skip_default") or {}
    short.setdefault("trainer", {}).update(max_steps=steps, max_epochs=-1)
    model, data = short.setdefault("model", {}), short.setdefault("data", {})
    model["algorithm"] = {**{"class_path": full["model"]["algorithm"]["class_path"]},
                          **model.get("algorithm", {})}
    data["dataset"] = {**{"class_path": full["data"]["dataset"]["class_path"]}, **data.get("dataset", {})}
    data["batch_size"] = full["data"]["batch_size"]
    optimizer = full["model"]["optimizer"]
    model["optimizer"] = {"class_path": optimizer["class_path"],
                          "init_args": {k: optimizer["init_args"][k] for k in ("lr", "weight_decay")}}
    short["seed_everything"] = full["seed_everything"]
    return {k: short[k] for k in ("seed_everything", "trainer", "model", "data") if k in short}


def trained_steps(record: Record) -> int:
    """The steps the run trained (a sweep's runs may stop at ``max_epochs`` before
    ``max_steps``: the config states the length they had)."""
    metrics = max(record.folder.glob("runs/version_*/metrics.csv"),  # a resumed run's last
                  key=lambda p: int(p.parent.name.split("_")[1]))
    with metrics.open() as f:
        return max(int(row["step"]) for row in csv.DictReader(f) if row.get("step"))


def scored(runs: list[Record]) -> tuple[float, float, int] | None:
    """Mean validation score and held-out accuracy at each run's selected checkpoint;
    ``None`` when no run has a validation that knows its held-out accuracy."""
    rows = [r.select(VALIDATION) for r in runs]
    rows = [row for row in rows if row is not None]
    if not rows:
        return None
    return (statistics.fmean(row[VALIDATION] for row in rows),
            statistics.fmean(row[HELD_OUT] for row in rows), len(rows))


def fail(message: str) -> NoReturn:
    print(f"embedded_configs.py: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--algos", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("configs/embedded"))
    parser.add_argument("--search", help="the command(s) that ran the sweeps, for the configs' "
                        "headers (default: the sweep folders)")
    args = parser.parse_args()
    args.search = args.search or ", ".join(map(str, args.sweeps))

    # (data set, algorithm) -> setting (its options) -> runs, pooled over the sweep folders
    found: dict[tuple[str, str], dict[tuple[str, ...], list[Record]]] = defaultdict(lambda: defaultdict(list))
    for folder in args.sweeps:
        try:
            records = load_runs(folder)
        except DGKitError as exc:
            fail(str(exc))
        for record in records:
            if record.variant or (args.algos and record.algorithm not in args.algos):
                continue
            argv = options(json.loads((record.folder / "run.json").read_text())["argv"])
            dataset = argv[argv.index("--data") + 1]
            found[(dataset, record.algorithm)][tuple(argv)].append(record)

    if not found:
        fail(f"no finished runs of {', '.join(args.algos or ['any algorithm'])} in "
             f"{', '.join(map(str, args.sweeps))}; run the searches first (benchmarks/embedded_searches.sh)")
    missing = []
    for (dataset, algorithm), settings in sorted(found.items()):
        table = sorted(((score, argv) for argv, runs in settings.items()
                        if (score := scored(runs)) is not None), reverse=True)
        if not table:
            missing.append(f"{algorithm} on {dataset}")
            continue
        (validation, held_out, n), best = table[0]
        runs = settings[best]
        domains = sorted({r.test_domain for r in runs}, key=lambda d: (len(d), d))
        header = [f"{algorithm} on the embedded {dataset}: the best of {len(table)} setting(s) by "
                  "training-domain validation, averaged over",
                  f"held-out domains {', '.join(domains)} and {len({r.seed for r in runs})} trial(s) "
                  f"({n} runs): validation {100 * validation:.1f}%, held-out {100 * held_out:.1f}% "
                  "at the selected checkpoints.",
                  f"The search: {args.search}.",
                  "Settings tried (validation / held-out %, hyperparameters):"]
        for (v, h, _), argv in table:
            hparams = settings[argv][0].hparams
            drawn = " ".join(f"{k}={x}" for k, x in sorted(hparams.items())) or "(the defaults)"
            header.append(f"  {100 * v:5.1f} / {100 * h:5.1f}  {drawn}")
        header += [f"Held-out domain: the data set's default; another: --data.test_domains '[{domains[0]}]'.",
                   f"  dgkit fit --config {args.out / dataset / algorithm}.yaml"]
        body = yaml.safe_dump(config_of(list(best), max(map(trained_steps, runs))), sort_keys=False)
        path = args.out / dataset / f"{algorithm}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"# {line}\n" for line in header) + body)
        print(f"{path}: {len(table)} setting(s), validation {100 * validation:.1f}%, "
              f"held-out {100 * held_out:.1f}%")
    if missing:
        fail(f"no config for {'; '.join(missing)}: no run has a validation that knows its held-out "
             "accuracy (rerun the sweep with --data.track_test true)")


if __name__ == "__main__":
    main()
