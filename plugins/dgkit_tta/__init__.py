"""dgkit's built-in test-time methods, registered through the ``dgkit`` entry point like
any plugin: BN adaptation, TENT, SAR, EATA (normalization layers), T3A (prototypes),
SHOT-IM (information maximization) and LAME (Laplacian adjustment of the outputs)."""

from dgkit import hookimpl
from dgkit.plugins import registered_in


@hookimpl
def dgkit_tta():
    # Each alias is given where its method is defined (@register).
    return registered_in(__name__)
