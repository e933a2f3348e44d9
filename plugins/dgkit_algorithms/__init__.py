"""dgkit's built-in algorithms, registered through the ``dgkit`` entry point like any plugin."""

from dgkit import hookimpl
from dgkit_algorithms.erm import ERM


@hookimpl
def dgkit_algorithms():
    return {"erm": ERM}
