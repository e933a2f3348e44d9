"""Registers the built-in data sets, through the same hook a third-party plugin uses."""

from dgkit.data import folders, mnist, wilds_sets
from dgkit.hookspecs import hookimpl
from dgkit.plugins import registered_in


@hookimpl
def dgkit_datasets():
    # Each alias is given where its data set is defined (@register).
    return registered_in(mnist, folders, wilds_sets)
