"""dgkit's built-in algorithms, registered through the ``dgkit`` entry point like any plugin."""

from dgkit import hookimpl
from dgkit.plugins import registered_in
from dgkit_algorithms.adanpc import AdaNPC
from dgkit_algorithms.bonsai import Bonsai
from dgkit_algorithms.diversify import DBAT, DivDis
from dgkit_algorithms.drm import DRM
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.itta import ITTA
from dgkit_algorithms.sam import ASAM, SAM
from dgkit_algorithms.udim import UDIM

__all__ = ["ASAM", "DBAT", "DRM", "ERM", "ITTA", "SAM", "UDIM", "AdaNPC", "Bonsai", "DivDis"]


@hookimpl
def dgkit_algorithms():
    # Each alias is given where its algorithm is defined (@register).
    return registered_in(__name__)
