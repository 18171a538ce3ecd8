"""Square-root-GGN rules for layers BackPACK's ``SqrtGGN`` table lacks.

BackPACK ships the derivatives of these layers (used by its other second-order
extensions) but does not register them for the square-root GGN; registering
them here lets, e.g., torchvision's ResNets (``AdaptiveAvgPool2d``) through.
The cross-entropy rule of :mod:`vivitlib.extensions.losses` replaces BackPACK's
so that class weights, ``ignore_index`` and label smoothing are exact.
"""

from __future__ import annotations

from backpack.core.derivatives.adaptive_avg_pool_nd import (
    AdaptiveAvgPool1dDerivatives,
    AdaptiveAvgPool2dDerivatives,
    AdaptiveAvgPool3dDerivatives,
)
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch.nn import AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d

from vivitlib.extensions.losses import LOSS_SQRT


def _sqrt_rule(derivatives_cls: type) -> type:
    class _Rule(SqrtGGNBaseModule):
        def __init__(self):
            super().__init__(derivatives_cls())

    _Rule.__name__ = f"SqrtGGN{derivatives_cls.__name__.replace('Derivatives', '')}"
    return _Rule


#: Module class -> square-root-GGN rule added on top of BackPACK's table.
EXTRA_SQRT = {
    AdaptiveAvgPool1d: _sqrt_rule(AdaptiveAvgPool1dDerivatives),
    AdaptiveAvgPool2d: _sqrt_rule(AdaptiveAvgPool2dDerivatives),
    AdaptiveAvgPool3d: _sqrt_rule(AdaptiveAvgPool3dDerivatives),
    **LOSS_SQRT,
}
