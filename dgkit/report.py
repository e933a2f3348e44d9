"""``dgkit report DIR``: the results tables of a sweep, one per selection method, as
papers print them (rows: algorithms; columns: held-out domains and their average; mean
± standard error over seeds), in Markdown, LaTeX and CSV, with plots.

Selection happens after the fact from each run's ``metrics.csv``: every validation
logged the training-domain (``val/accuracy``), crafted-shift (``crafted/accuracy``) and
test-domain oracle (``oracle/accuracy``) scores beside the held-out test accuracy
(``heldout/accuracy``, from ``--data.track_test true``). A method picks the validation
with its best score; the table reports the held-out accuracy there.
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

SELECTION = {  # method -> the score it maximizes
    "training-domain validation": "val/accuracy",
    "crafted-shift validation": "crafted/accuracy",
    "test-domain oracle": "oracle/accuracy",
}
HELD_OUT = "heldout/accuracy"


@dataclass
class Record:
    algorithm: str
    test_domain: str
    seed: int
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
                              run_file.parent, _validations(versions[-1])))
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
    return [r for _, r in sorted(by_step.items()) if HELD_OUT in r]


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def tables(records: list[Record]) -> dict[str, dict]:
    """Per method: ``{"domains": [...], "rows": {algorithm: {domain|"Avg": (mean, se, n)}}}``."""
    domains = sorted({r.test_domain for r in records}, key=lambda d: (len(d), d))
    out = {}
    for method, score in SELECTION.items():
        cells: dict[str, dict[str, list[float]]] = {}
        for record in records:
            chosen = record.select(score)
            if chosen is not None:
                cells.setdefault(record.algorithm, {}).setdefault(record.test_domain, []).append(
                    chosen[HELD_OUT])
        if not cells:
            continue
        rows = {}
        for algorithm, per_domain in sorted(cells.items()):
            row = {d: (*mean_se(v), len(v)) for d, v in per_domain.items()}
            if all(d in per_domain for d in domains):
                # Average over domains per seed, then mean ± SE over seeds (DomainBed's way).
                seeds = sorted({r.seed for r in records if r.algorithm == algorithm})
                averages = []
                for seed in seeds:
                    per_seed = [r.select(score) for r in records
                                if r.algorithm == algorithm and r.seed == seed]
                    if len(per_seed) == len(domains) and all(per_seed):
                        averages.append(statistics.fmean(c[HELD_OUT] for c in per_seed))
                if averages:
                    row["Avg"] = (*mean_se(averages), len(averages))
            rows[algorithm] = row
        out[method] = {"domains": [*domains, "Avg"], "rows": rows}
    return out


def _cell(value: tuple[float, float, int] | None, latex: bool = False) -> str:
    if value is None:
        return "-"
    pm = r" $\pm$ " if latex else " ± "
    return f"{100 * value[0]:.1f}{pm}{100 * value[1]:.1f}"


def markdown(results: dict[str, dict]) -> str:
    parts = []
    for method, table in results.items():
        head = ["Algorithm", *table["domains"]]
        lines = [f"### {method}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for algorithm, row in table["rows"].items():
            cells = [algorithm, *(_cell(row.get(d)) for d in table["domains"])]
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
            lines.append(" & ".join([algorithm, *(_cell(row.get(d), latex=True)
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
    """Per method, across runs: the selected validation score against the held-out
    accuracy there (Pearson and Spearman)."""
    from scipy.stats import pearsonr, spearmanr

    out = {}
    for method, score in SELECTION.items():
        pairs = [(c[score], c[HELD_OUT]) for r in records if (c := r.select(score)) is not None]
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
    methods = [(m, s) for m, s in SELECTION.items() if any(r.select(s) for r in records)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    corr = correlations(records)
    for ax, (method, score) in zip(axes[0], methods, strict=True):
        for algorithm in sorted({r.algorithm for r in records}):
            points = [(c[score], c[HELD_OUT]) for r in records if r.algorithm == algorithm
                      and (c := r.select(score)) is not None]
            ax.scatter(*zip(*points, strict=True), label=algorithm, s=18)
        r = corr.get(method)
        stats = f"\nPearson {r['pearson']:.2f}, Spearman {r['spearman']:.2f}" if r else ""
        ax.set_title(method + stats, fontsize=9)
        ax.set_xlabel(score)
        ax.set_ylabel(HELD_OUT)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "validation_vs_test.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        steps = [row["step"] for row in record.rows]
        ax.plot(steps, [row[HELD_OUT] for row in record.rows], alpha=0.6,
                label=f"{record.algorithm} {record.test_domain} s{record.seed}")
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
