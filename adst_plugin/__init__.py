"""adst-plugin: AdSTNet's adaptive scale thresholding as a training-time plugin for smp models.

>>> model = wrap_with_adst(smp.Unet("resnet34", encoder_weights=None, classes=1))
>>> criterion = ADSTLoss(model)
>>> loss = criterion(model(images), masks)   # model(images) is the plain mask logits, in train and eval mode
>>> plain = model.export()                   # the original smp model, nothing added

Files follow the paper's figure: blocks (``saca``, ``convglu``, ``laplacian``), the ``head``, the ``targets``,
the loss terms (``functional``) and their module (``loss``), the ``presets`` that configure them, and the
``hooks`` and ``wrapper`` that attach and remove them.
"""

from typing import Any

from . import constants, functional, modes, presets, targets
from ._handover import UnclaimedHeadOutputWarning
from .collate import ADSTTargetCollate
from .convglu import ConvGLU
from .head import ADSTHead, ADSTOutput, FusionMap, HeadMaps, MainMap, renamed_attribute
from .hooks import FeatureTap
from .laplacian import LaplacianEdge, edge_map, laplacian_pyramid
from .loss import ADSTLoss, DiceBCELoss, DiceCELoss
from .presets import DEFAULT_PRESET, PRESETS, ADSTConfig, get_config
from .saca import CRU, SACA, SRU
from .targets import adst_targets, border_map, boundary_map, core_map
from .wrapper import ADSTModel, wrap_with_adst

__version__ = "0.2.0"

__all__ = [
    "CRU",
    "DEFAULT_PRESET",
    "PRESETS",
    "SACA",
    "SRU",
    "ADSTConfig",
    "ADSTHead",
    "ADSTLoss",
    "ADSTModel",
    "ADSTOutput",
    "ADSTTargetCollate",
    "ConvGLU",
    "DiceBCELoss",
    "DiceCELoss",
    "FeatureTap",
    "FusionMap",
    "HeadMaps",
    "LaplacianEdge",
    "MainMap",
    "UnclaimedHeadOutputWarning",
    "__version__",
    "adst_targets",
    "border_map",
    "boundary_map",
    "constants",
    "core_map",
    "edge_map",
    "functional",
    "get_config",
    "laplacian_pyramid",
    "modes",
    "presets",
    "targets",
    "wrap_with_adst",
]


def __getattr__(name: str) -> Any:
    return renamed_attribute(__name__, name)  # former names (head.RENAMED), with a DeprecationWarning
