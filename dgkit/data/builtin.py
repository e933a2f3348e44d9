"""Registers the built-in data sets, through the same hook a third-party plugin uses."""

from dgkit.data.folders import PACS, VLCS, DomainNet, OfficeHome, TerraIncognita
from dgkit.data.mnist import ColoredMNIST, RotatedMNIST
from dgkit.data.wilds_sets import Camelyon17, FMoW, IWildCam
from dgkit.hookspecs import hookimpl


@hookimpl
def dgkit_datasets():
    return {"rotated_mnist": RotatedMNIST, "colored_mnist": ColoredMNIST,
            "officehome": OfficeHome, "pacs": PACS, "vlcs": VLCS,
            "terraincognita": TerraIncognita, "domainnet": DomainNet,
            "camelyon17": Camelyon17, "iwildcam": IWildCam, "fmow": FMoW}
