"""The hooks a dgkit plugin may implement.

A plugin is any module (or object) exposed in the ``dgkit`` entry-point group. Each hook
returns a mapping from short alias to the thing it registers; dgkit collects them into
registries. Built-ins register through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torchmetrics import Metric

    from dgkit.algorithm import Algorithm
    from dgkit.data.base import MultiDomainDataset
    from dgkit.task import Task

PROJECT = "dgkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dgkit_algorithms() -> Mapping[str, type[Algorithm]]:
    """Return ``{alias: Algorithm subclass}`` for ``--algo``."""


@hookspec
def dgkit_datasets() -> Mapping[str, type[MultiDomainDataset]]:
    """Return ``{alias: MultiDomainDataset subclass}`` for ``--data``."""


@hookspec
def dgkit_averaging() -> Mapping[str, type]:
    """Return ``{alias: dgkit.averaging.Averaging subclass}`` for ``--model.averaging``."""


@hookspec
def dgkit_tta() -> Mapping[str, type]:
    """Return ``{alias: dgkit.tta.TestTimeMethod subclass}`` for ``--tta`` (``--model.tta``)."""


@hookspec
def dgkit_metrics() -> Mapping[str, Callable[[Task], Metric]]:
    """Return ``{name: factory}``; a factory builds a fresh torchmetrics Metric for a task.

    Metrics are computed per domain and named ``<stage>/<name>/<domain>`` in the logs.
    """
