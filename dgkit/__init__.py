"""dgkit: domain generalization on Lightning, with algorithms as pluggy plugins."""

import os

# albumentations asks PyPI for updates on import; that hangs or warns offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dgkit.algorithm import Algorithm, Batch, Optimization, Progress
from dgkit.hookspecs import hookimpl
from dgkit.networks import Backbone
from dgkit.task import Task

__version__ = "0.1.0"
__all__ = ["Algorithm", "Backbone", "Batch", "Optimization", "Progress", "Task", "hookimpl"]
