"""The conv-unit ops (DESIGN.md §2) as torch.library custom ops with fake and autograd
registrations. Use the functions here; fused_res.ops.library holds the raw ops."""

from . import library, plans, train_unit
from .functional import (
    ACTS,
    bn_scale,
    channel_stats,
    conv_bn_stats,
    conv_shortcut_pair,
    conv_unit,
    epilogue,
    fuses_shortcut_conv,
    fuses_train_prologue,
    prepare_backend,
)
from .plans import ConvPairPlan, ConvUnitPlan, conv_shortcut_pair_planned, conv_unit_planned

__all__ = ["ACTS", "ConvPairPlan", "ConvUnitPlan", "bn_scale", "channel_stats",
           "conv_bn_stats", "conv_shortcut_pair", "conv_shortcut_pair_planned", "conv_unit",
           "conv_unit_planned", "epilogue",
           "fuses_shortcut_conv", "fuses_train_prologue", "library", "plans", "prepare_backend",
           "train_unit"]
