"""Reference ResNets in pure PyTorch: the correctness oracle and the speed baseline.

Nothing here knows about fusion; fused_res.nn and fused_res.convert build on these.
"""

from .cifar import (
    BLOCKS,
    SHORTCUTS,
    VARIANTS,
    CifarBlock,
    CifarResNet,
    PadShortcut,
    blocks_per_stage,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet164,
    resnet1001,
    resnet1202,
)
from .imagenet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from .lesion import lesion, residual_blocks

IMAGENET_MODELS = {f.__name__: f for f in (resnet18, resnet34, resnet50, resnet101, resnet152,
                                          wide_resnet50_2, resnext50_32x4d)}
CIFAR_MODELS = {f.__name__: f for f in (resnet20, resnet32, resnet44, resnet56, resnet110,
                                       resnet1202, resnet164, resnet1001)}
MODELS = {**IMAGENET_MODELS, **CIFAR_MODELS}


def get_model(name: str, **kwargs):
    """Build a reference model by name (see MODELS)."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model={name!r}; accepted: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


__all__ = [
    "BLOCKS", "SHORTCUTS", "VARIANTS", "BasicBlock", "Bottleneck", "CifarBlock", "CifarResNet",
    "PadShortcut", "ResNet", "blocks_per_stage", "cifar_resnet", "get_model", "lesion",
    "residual_blocks", "MODELS", "IMAGENET_MODELS", "CIFAR_MODELS", "resnet18", "resnet20",
    "resnet32", "resnet34", "resnet44", "resnet50", "resnet56", "resnet101", "resnet110",
    "resnet152", "resnet164", "resnet1001", "resnet1202", "resnext50_32x4d", "wide_resnet50_2",
]
