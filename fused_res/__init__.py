"""fused_res: fused residual paths (conv + BatchNorm + ReLU + add) for ResNets in PyTorch.

Importing this package is light: no CUDA initialisation, no compilation, no device queries.
"""

from . import models, nn, ops
from ._version import __version__
from .backends import available_backends, current_backend, set_backend, use_backend
from .backends.auto import autotune
from .convert import convert, format_report, recognize, report, revert
from .models import lesion, residual_blocks

__all__ = ["__version__", "autotune", "available_backends", "convert", "current_backend",
           "format_report", "lesion", "models", "nn", "ops", "recognize", "report",
           "residual_blocks", "revert", "set_backend", "use_backend"]
