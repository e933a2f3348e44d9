"""dgkit's built-in algorithms, registered through the ``dgkit`` entry point like any plugin."""

from dgkit import hookimpl
from dgkit_algorithms.adanpc import AdaNPC
from dgkit_algorithms.bonsai import Bonsai
from dgkit_algorithms.diversify import DBAT, DivDis
from dgkit_algorithms.drm import DRM
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.itta import ITTA
from dgkit_algorithms.sam import ASAM, SAM
from dgkit_algorithms.udim import UDIM


@hookimpl
def dgkit_algorithms():
    return {
        "erm": ERM, "sam": SAM, "asam": ASAM, "udim": UDIM, "adanpc": AdaNPC, "itta": ITTA,
        "divdis": DivDis, "dbat": DBAT, "drm": DRM, "bonsai": Bonsai,
    }
