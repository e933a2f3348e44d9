"""``dgkit report DIR``: the results tables of a sweep, one per selection method, as
papers print them (rows: algorithms; columns: held-out domains and their average; mean
± standard error over seeds), in Markdown, LaTeX and CSV, with plots.

Selection happens after the fact from each run's ``metrics.csv``: every validation
logged the training-domain (``val/accuracy``), crafted-shift (``crafted/accuracy``) and
test-domain oracle (``oracle/accuracy``) scores beside the held-out test accuracy
(``heldout/accuracy``, from ``--data.track_test true``). For each algorithm, held-out
domain and seed, a method picks the hyperparameter setting and validation with its best
score; the table reports the held-out accuracy there. The crafted-shift k-fold and
leave-one-domain-out methods score a setting from its extra runs (``dgkit sweep --kfold``,
``--lodo``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from dgkit.errors import DGKitError
from dgkit.task import DEFAULT_SELECTION

SCORES = {  # a method that reads one logged score -> that score
    "training-domain validation": DEFAULT_SELECTION,
    "crafted-shift validation": "crafted/accuracy",
    "test-domain oracle": "oracle/accuracy",
}
HELD_OUT = "heldout/accuracy"
Choice = tuple[float, float]  # (validation score, held-out accuracy)


@dataclass
class Record:
    algorithm: str
    test_domain: str
    seed: int
    config: str  # the hyperparameter setting
    variant: str  # "" for the reported model; fold-A/fold-B/lodo-<domain> for helpers
    hparams: dict[str, str]
    folder: Path
    rows: list[dict[str, float]]  # validations, in step order

    def select(self, score: str) -> dict[str, float] | None:
        """The first validation with the best ``score`` (None if never logged)."""
        rows = [r for r in self.rows if score in r and HELD_OUT in r]
        return max(rows, key=lambda r: r[score]) if rows else None


def load_runs(directory: Path) -> list[Record]:
    records = []
    for run_file in sorted(directory.rglob("run.json")):
        run = json.loads(run_file.read_text())
        versions = sorted(run_file.parent.glob("runs/version_*/metrics.csv"),
                          key=lambda p: int(p.parent.name.split("_")[1]))
        if not versions or not list(run_file.parent.glob("runs/version_*/test_results.json")):
            continue  # unfinished: reported once it has run
        records.append(Record(run["algorithm"], str(run["test_domain"]), int(run["seed"]),
                              run.get("config", "default"), run.get("variant", ""),
                              run.get("hparams", {}), run_file.parent, _validations(versions[-1])))
    if not records:
        raise DGKitError(f"no finished runs under {directory} (folders with run.json and "
                         "runs/version_*/test_results.json, as `dgkit sweep --dir` writes them)")
    return records


def _validations(path: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv merged by step, keeping the steps that have validation scores."""
    by_step: dict[int, dict[str, float]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["step"]))
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            by_step.setdefault(step, {"step": step}).update(values)
    return [r for _, r in sorted(by_step.items()) if HELD_OUT in r or DEFAULT_SELECTION in r]


# --- selection methods: the runs of one setting -> (validation score, held-out accuracy) ---
def _by_score(score: str):
    def choose(runs: dict[str, Record]) -> Choice | None:
        row = runs[""].select(score)
        return None if row is None else (row[score], row[HELD_OUT])
    return choose


def _kfold(runs: dict[str, Record]) -> Choice | None:
    """CV score: the fold runs' final accuracy averaged over the categories each held out
    (fold B's under fold-A training and the reverse); the reported model is the one trained
    on every category, at its end (Efthymiadis et al.)."""
    folds = [runs.get("fold-A"), runs.get("fold-B")]
    if None in folds or not runs[""].rows or HELD_OUT not in runs[""].rows[-1]:
        return None
    prefix = SCORES["crafted-shift validation"] + "/"
    scores = [v for r in folds if r.rows for k, v in r.rows[-1].items() if k.startswith(prefix)]
    return (statistics.fmean(scores), runs[""].rows[-1][HELD_OUT]) if scores else None


def _leave_one_domain_out(runs: dict[str, Record]) -> Choice | None:
    """DomainBed's leave-one-domain-out: at each step, the mean accuracy of the runs that
    also held out one training domain, on that domain; the best step of the reported run."""
    helpers = {v.removeprefix("lodo-"): r for v, r in runs.items() if v.startswith("lodo-")}
    if not helpers:
        return None
    steps = {domain: {row["step"]: row for row in r.rows} for domain, r in helpers.items()}
    choices = []
    for row in runs[""].rows:
        scores = [steps[d].get(row["step"], {}).get(f"{HELD_OUT}/{d}") for d in helpers]
        if HELD_OUT in row and None not in scores:
            choices.append((statistics.fmean(scores), row[HELD_OUT]))
    return max(choices, key=lambda c: c[0]) if choices else None


METHODS = {
    "training-domain validation": _by_score(SCORES["training-domain validation"]),
    "crafted-shift validation": _by_score(SCORES["crafted-shift validation"]),
    "crafted-shift k-fold": _kfold,
    "leave-one-domain-out": _leave_one_domain_out,
    "test-domain oracle": _by_score(SCORES["test-domain oracle"]),
}


def _settings(records: list[Record]) -> dict[tuple[str, str, int], dict[str, dict[str, Record]]]:
    """``(algorithm, test domain, seed) -> setting -> variant -> run``, settings that have
    their reported run only."""
    out: dict = {}
    for r in records:
        out.setdefault((r.algorithm, r.test_domain, r.seed), {}).setdefault(r.config, {})[r.variant] = r
    return {trial: {c: runs for c, runs in settings.items() if "" in runs}
            for trial, settings in out.items()}


def _numeric(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _setting_order(runs: dict[str, Record]) -> tuple:
    hparams = runs[""].hparams  # learning rates first, as the tie rule reads them
    keys = sorted(hparams, key=lambda k: (not k.endswith("lr"), k))
    return tuple(_numeric(hparams[k]) for k in keys)


def choose(settings: dict[str, dict[str, Record]], method: str) -> Choice | None:
    """The best setting (and step) of one trial under ``method``. Ties between settings go
    to the middle of the tied ones sorted by learning rate (the crafting-shifts rule)."""
    scored = [(c, runs) for c, runs in settings.items() if METHODS[method](runs) is not None]
    if not scored:
        return None
    choices = {c: METHODS[method](runs) for c, runs in scored}
    best = max(v[0] for v in choices.values())
    tied = sorted((c for c, v in choices.items() if v[0] == best),
                  key=lambda c: _setting_order(settings[c]))
    return choices[tied[len(tied) // 2]]


def tables(records: list[Record]) -> dict[str, dict]:
    """Per method: ``{"domains": [...], "rows": {algorithm: {domain|"Avg": (mean, se, n)}}}``."""
    trials = _settings(records)
    domains = sorted({r.test_domain for r in records}, key=lambda d: (len(d), d))
    out = {}
    for method in METHODS:
        chosen = {trial: c for trial, settings in trials.items()
                  if (c := choose(settings, method)) is not None}
        if not chosen:
            continue
        rows = {}
        for algorithm in sorted({a for a, _, _ in chosen}):
            per_domain: dict[str, list[float]] = {}
            for (a, d, _), c in chosen.items():
                if a == algorithm:
                    per_domain.setdefault(d, []).append(c[1])
            row = {d: (*mean_se(v), len(v)) for d, v in per_domain.items()}
            # Average over domains per seed, then mean ± SE over seeds (DomainBed's way).
            averages = []
            for seed in sorted({s for a, _, s in chosen if a == algorithm}):
                per_seed = [chosen.get((algorithm, d, seed)) for d in domains]
                if None not in per_seed:
                    averages.append(statistics.fmean(c[1] for c in per_seed))
            if averages:
                row["Avg"] = (*mean_se(averages), len(averages))
            rows[algorithm] = row
        out[method] = {"domains": [*domains, "Avg"], "rows": rows}
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _pairs(records: list[Record], method: str, algorithm: str | None = None) -> list[Choice]:
    """Every setting's selected (validation score, held-out accuracy) under ``method``."""
    return [c for (a, _, _), settings in _settings(records).items() if algorithm in (None, a)
            for runs in settings.values() if (c := METHODS[method](runs)) is not None]


def _cell(value: tuple[float, float, int] | None, latex: bool = False) -> str:
    if value is None:
        return "-"
    if value[2] == 1:  # one seed: no standard error to show
        return f"{100 * value[0]:.1f} (n=1)"
    pm = r" $\pm$ " if latex else " ± "
    return f"{100 * value[0]:.1f}{pm}{100 * value[1]:.1f}"


def display_name(alias: str) -> str:
    """An algorithm as papers name it (its class: ``SAM``, ``AdaNPC``), not its alias."""
    from dgkit.plugins import registry

    base, plus, method = alias.partition(" + ")  # an ensemble's row: "erm + EoA of 6"
    if plus:
        return f"{display_name(base)} + {method}"
    try:
        return registry("algorithm").get(alias).obj.__name__
    except DGKitError:
        return alias


def markdown(results: dict[str, dict]) -> str:
    parts = []
    for method, table in results.items():
        head = ["Algorithm", *table["domains"]]
        lines = [f"### {method}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for algorithm, row in table["rows"].items():
            cells = [display_name(algorithm), *(_cell(row.get(d)) for d in table["domains"])]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def latex(results: dict[str, dict]) -> str:
    parts = []
    for method, table in results.items():
        cols = "l" + "c" * len(table["domains"])
        lines = [f"% {method}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                 " & ".join(["Algorithm", *table["domains"]]) + r" \\", r"\midrule"]
        for algorithm, row in table["rows"].items():
            lines.append(" & ".join([display_name(algorithm), *(_cell(row.get(d), latex=True)
                                                  for d in table["domains"])]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(results: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["selection", "algorithm", "domain", "mean", "se", "n"])
        for method, table in results.items():
            for algorithm, row in table["rows"].items():
                for domain, (mean, se, n) in row.items():
                    writer.writerow([method, algorithm, domain, mean, se, n])


def correlations(records: list[Record]) -> dict[str, dict[str, float]]:
    """Per method, across runs and settings: the selected validation score against the
    held-out accuracy there (Pearson and Spearman)."""
    from scipy.stats import pearsonr, spearmanr

    out = {}
    for method in METHODS:
        pairs = _pairs(records, method)
        if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
            x, y = zip(*pairs, strict=True)
            out[method] = {"pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0]),
                           "runs": len(pairs)}
    return out


def plots(records: list[Record], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = [m for m in METHODS if _pairs(records, m)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    corr = correlations(records)
    for ax, method in zip(axes[0], methods, strict=True):
        for algorithm in sorted({r.algorithm for r in records}):
            points = _pairs(records, method, algorithm)
            if points:
                ax.scatter(*zip(*points, strict=True), label=algorithm, s=18)
        r = corr.get(method)
        stats = f"\nPearson {r['pearson']:.2f}, Spearman {r['spearman']:.2f}" if r else ""
        ax.set_title(method + stats, fontsize=9)
        ax.set_xlabel(f"{method} score")
        ax.set_ylabel(HELD_OUT)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "validation_vs_test.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        rows = [row for row in record.rows if HELD_OUT in row]
        if record.variant or not rows:
            continue
        ax.plot([row["step"] for row in rows], [row[HELD_OUT] for row in rows], alpha=0.6,
                label=f"{record.algorithm} {record.test_domain} {record.config} s{record.seed}")
    ax.set_xlabel("step")
    ax.set_ylabel(HELD_OUT)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    written.append(directory / "learning_curves.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def report(directory: str | Path, out: str | Path | None = None) -> dict:
    directory = Path(directory)
    out = Path(out) if out else directory
    out.mkdir(parents=True, exist_ok=True)
    records = load_runs(directory)
    results = tables(records)
    from dgkit.ensemble import ensemble_rows

    ensembles = ensemble_rows(directory)
    if ensembles and "training-domain validation" in results:  # members were picked by it
        results["training-domain validation"]["rows"].update(ensembles)
    if not results:
        raise DGKitError(f"the runs under {directory} logged no held-out accuracy during validation; "
                         "sweep with --data.track_test true so any selection can be read off")
    (out / "results.md").write_text(markdown(results))
    (out / "results.tex").write_text(latex(results))
    write_csv(results, out / "results.csv")
    corr = correlations(records)
    (out / "correlations.json").write_text(json.dumps(corr, indent=2))
    figures = plots(records, out)
    print(markdown(results))
    for method, values in corr.items():
        print(f"{method}: validation vs held-out accuracy over {values['runs']} runs, Pearson "
              f"{values['pearson']:.3f}, Spearman {values['spearman']:.3f}")
    files = [out / "results.md", out / "results.tex", out / "results.csv", *figures]
    print(f"written: {', '.join(str(p) for p in files)}")
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dgkit report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a sweep folder (dgkit sweep --dir)")
    parser.add_argument("--out", help="where to write the tables and plots (default: DIR)")
    args = parser.parse_args(argv)
    report(args.dir, args.out)
