"""Drop-in fused modules. They own plain nn.Conv2d / nn.BatchNorm2d children named as
torchvision names them, so state_dicts and checkpoints are unchanged."""

from .blocks import (
    BasicBlock,
    Bottleneck,
    DropPath,
    FusedResidualBlock,
    PreActBasicBlock,
    PreActBottleneck,
)
from .conv_bn_act import ConvBNAct2d
from .plan import BlockPlan, ShortcutPlan

__all__ = ["BasicBlock", "BlockPlan", "Bottleneck", "ConvBNAct2d", "DropPath",
           "FusedResidualBlock", "PreActBasicBlock", "PreActBottleneck", "ShortcutPlan"]
