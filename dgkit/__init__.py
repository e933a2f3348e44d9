"""dgkit: domain generalization on Lightning, with algorithms as pluggy plugins."""

import os

# albumentations asks PyPI for updates on import; that hangs or warns offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dgkit.algorithm import Algorithm, Batch, Optimization, Progress, Wrapper
from dgkit.data.base import MultiDomainDataset
from dgkit.errors import ConfigError, DGKitError, check
from dgkit.hookspecs import hookimpl
from dgkit.networks import Backbone
from dgkit.plugins import register
from dgkit.task import Task

__version__ = "0.1.0"
__all__ = ["Algorithm", "Backbone", "Batch", "ConfigError", "DGKitError", "MultiDomainDataset",
           "Optimization", "Progress", "Task", "Wrapper", "check", "hookimpl", "register"]
