"""fused_res: fused residual paths (conv + BatchNorm + ReLU + add) for ResNets in PyTorch.

Importing this package is light: no CUDA initialisation, no compilation, no device queries.
"""

from . import models
from ._version import __version__
from .models import lesion, residual_blocks

__all__ = ["__version__", "lesion", "models", "residual_blocks"]
