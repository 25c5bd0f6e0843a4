"""adst-plugin: AdSTNet's adaptive scale thresholding as a training-time plugin for smp models.

>>> model = wrap_with_adst(smp.Unet("resnet34", encoder_weights=None, classes=1))
>>> loss = ADSTLoss()(model(images), masks)
>>> plain = model.export()  # the original smp model, nothing added
"""

from . import constants, targets
from .convglu import ConvGLU
from .head import ADSTHead, DBFusion, FusionMap, HeadMaps, MainThresholdMap
from .hooks import FeatureTap
from .laplacian import LaplacianEdge, edge_map, laplacian_pyramid
from .loss import ADSTLoss, DiceBCELoss
from .saca import CRU, SACA, SRU
from .targets import adst_targets, border_map, boundary_map, core_map
from .wrapper import ADSTModel, ADSTOutput, wrap_with_adst

__version__ = "0.1.0"

__all__ = [
    "CRU",
    "SACA",
    "SRU",
    "ADSTHead",
    "ADSTLoss",
    "ADSTModel",
    "ADSTOutput",
    "ConvGLU",
    "DBFusion",
    "DiceBCELoss",
    "FeatureTap",
    "FusionMap",
    "HeadMaps",
    "LaplacianEdge",
    "MainThresholdMap",
    "__version__",
    "adst_targets",
    "border_map",
    "boundary_map",
    "constants",
    "core_map",
    "edge_map",
    "laplacian_pyramid",
    "targets",
    "wrap_with_adst",
]
