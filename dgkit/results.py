"""Per-domain results of a test run: collected from logged metrics, printed, saved as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dgkit.atomic import write_atomically
from dgkit.evaluation import LAST, UNADAPTED
from dgkit.task import Task

RESULTS_FILE = "test_results.json"
COMPANION_NAMES = {UNADAPTED: "no adaptation", LAST: "last iterate"}


class ResultsContributor:
    """A component (a callback) whose decisions belong in the results file: the stages it
    kept, the head or test-time settings it chose, the representation it loaded. The
    reporting after ``fit``/``test`` merges every contributor's entries into the results."""

    def results_entries(self) -> dict[str, Any]:
        return {}


def collect_results(metrics: Mapping[str, Any], task: Task, **info: Any) -> dict:
    """``{"domains": {domain: {metric: value}}, "average": {...}, ...info}`` from ``test/*``."""
    domains: dict[str, dict[str, float]] = {d: {} for d in task.target_domains}
    average: dict[str, float] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] not in ("test", *COMPANION_NAMES) or len(parts) < 2:
            continue
        # Another model on the same images, beside the tested one: without its test-time
        # stage, or the last iterate of an averaged run.
        name = parts[1] if parts[0] == "test" else f"{parts[1]} ({COMPANION_NAMES[parts[0]]})"
        if len(parts) == 2:
            average[name] = float(value)
        else:
            domains.setdefault("/".join(parts[2:]), {})[name] = float(value)
    if not task.average_test:  # official splits (OOD test, ID test): never averaged together
        average = {}
    return {"dataset": task.dataset, "source_domains": list(task.source_domains),
            "domains": domains, "average": average, "headline_metrics": list(task.headline_metrics),
            **info}


def _cell(metric: str, value: float) -> str:
    if metric.startswith("count"):  # sample counts (WILDS' count_*), not fractions
        return f"{value:g}"
    if metric.startswith("cross_entropy"):  # a loss, not a fraction
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def print_results(results: dict, console: Console | None = None) -> None:
    everything = sorted({m for values in results["domains"].values() for m in values})
    headline = results.get("headline_metrics") or []
    shown = [m for m in everything if not headline or m in headline
             or m.split(" (")[0] in headline]
    console = console or Console()
    console.print(f"[bold]{results.get('algorithm', '')}[/bold] on {results['dataset']}, trained "
                  f"on {', '.join(results['source_domains'])}; held-out domains:")
    rows = [(domain, values) for domain, values in results["domains"].items()]
    if len(rows) > 1 and results.get("average"):
        rows.append(("average", results["average"]))
    width = len("test domain") + sum(len(m) + 3 for m in shown) + 4
    if width <= console.width:
        table = Table()
        table.add_column("test domain")
        for m in shown:
            table.add_column(m, justify="right", no_wrap=True, min_width=len(m))
        for domain, values in rows:
            table.add_row(domain, *(_cell(m, values[m]) if m in values else "-" for m in shown),
                          style="bold" if domain == "average" else None)
    else:  # too many metrics for the terminal: one row per metric instead
        table = Table()
        table.add_column("metric", no_wrap=True)
        for domain, _ in rows:
            table.add_column(domain, justify="right", style="bold" if domain == "average" else None)
        for m in shown:
            table.add_row(m, *(_cell(m, values[m]) if m in values else "-" for _, values in rows))
    console.print(table)
    if len(shown) < len(everything):
        console.print(f"{len(everything) - len(shown)} more metrics per split in {RESULTS_FILE}")
    ensemble = results.get("ensemble")
    if ensemble:
        of = f" (of {ensemble['candidates']})" if ensemble["size"] != ensemble["candidates"] else ""
        console.print(f"{ensemble['method']} of {ensemble['size']} run(s){of}")
    else:
        console.print(f"checkpoint: {results.get('ckpt_path') or '(weights at the end of training)'}")
    if results.get("transductive"):
        console.print("[bold]transductive[/bold]: training saw unlabeled images of the held-out domains")
    for stage in results.get("stages", []):
        console.print(f"stage {stage['stage']} (to step {stage['step']}): "
                      f"{stage['checkpoint'] or '(not saved)'}")
    init = results.get("init_from")
    if init:
        console.print(f"initialized from {init['checkpoint']}"
                      + (" (featurizer frozen)" if init["frozen"] else ""))
    averaging = results.get("averaging")
    if averaging:
        console.print(f"averaged weights: {averaging['averaged']}")
    stream = results.get("test_stream") or {}
    if stream.get("streams") == "mixed" or stream.get("label_shift") is not None:
        cut = ("one stream mixing the held-out domains" if stream["streams"] == "mixed"
               else "one stream per domain")
        shift = f", label-shifted (Dirichlet {stream['label_shift']})" if stream.get("label_shift") else ""
        console.print(f"test stream: {cut}{shift}, batches of {stream['batch_size']}", soft_wrap=True)
    method = results.get("test_time")
    if method:
        settings = ", ".join(f"{k}={v}" for k, v in method["settings"].items())
        reset = ("episodic: reset every batch" if method["reset"] == "batch"
                 else "online: reset between streams")
        console.print(f"test-time method: {method['method']} ({settings}); {reset}", soft_wrap=True)
    selection = results.get("head_selection")
    if selection:
        console.print(f"head {selection['selected_head']} chosen by {selection['by']} "
                      f"({selection['labels_used']} labels)")


def write_results(results: dict, directory: Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    return write_atomically(directory / RESULTS_FILE,
                            lambda fh: json.dump(results, fh, indent=2, default=str), binary=False)
