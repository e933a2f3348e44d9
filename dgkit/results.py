"""Per-domain results of a test run: collected from logged metrics, printed, saved as JSON."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dgkit.task import Task

RESULTS_FILE = "test_results.json"


def collect_results(metrics: Mapping[str, Any], task: Task, **info: Any) -> dict:
    """``{"domains": {domain: {metric: value}}, "average": {...}, ...info}`` from ``test/*``."""
    domains: dict[str, dict[str, float]] = {d: {} for d in task.target_domains}
    average: dict[str, float] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] not in ("test", "test_unadapted") or len(parts) < 2:
            continue
        # The same model without its test-time stage, beside the adapted result.
        name = parts[1] if parts[0] == "test" else f"{parts[1]} (no adaptation)"
        if len(parts) == 2:
            average[name] = float(value)
        else:
            domains.setdefault("/".join(parts[2:]), {})[name] = float(value)
    return {"dataset": task.dataset, "source_domains": list(task.source_domains),
            "domains": domains, "average": average, **info}


def print_results(results: dict, console: Console | None = None) -> None:
    metrics = sorted({m for values in results["domains"].values() for m in values})
    console = console or Console()
    console.print(f"[bold]{results.get('algorithm', '')}[/bold] on {results['dataset']}, trained "
                  f"on {', '.join(results['source_domains'])}; held-out domains:")
    table = Table()
    table.add_column("test domain")
    for m in metrics:
        table.add_column(m, justify="right")
    for domain, values in results["domains"].items():
        table.add_row(domain, *(f"{100 * values[m]:.2f}" if m in values else "-" for m in metrics))
    if len(results["domains"]) > 1:
        table.add_row("average", *(f"{100 * results['average'].get(m, float('nan')):.2f}"
                                   for m in metrics), style="bold")
    console.print(table)
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
    selection = results.get("head_selection")
    if selection:
        console.print(f"head {selection['selected_head']} chosen by {selection['by']} "
                      f"({selection['labels_used']} labels)")


def write_results(results: dict, directory: Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-")
    with os.fdopen(fd, "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    os.replace(tmp, path)
    return path
