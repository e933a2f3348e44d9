"""Multi-domain data: data sets as lists of domains, and the Lightning data module."""

from dgkit.data.base import MultiDomainDataset
from dgkit.data.datamodule import DomainDataModule

__all__ = ["DomainDataModule", "MultiDomainDataset"]
