"""The cuDNN contender: BatchNorm folded into each conv, and aten's cuDNN fused ops
(cudnn_convolution_relu, cudnn_convolution_add_relu: conv + bias [+ residual] + ReLU in one
call) for every conv unit of the "original" residual blocks and the stem. Inference only.

The ops are injectable so that the folding can be checked on the CPU against an emulation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import models


@dataclass(frozen=True)
class FusedOps:
    """conv_relu(x, w, b, stride, padding, dilation, groups) and
    conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups), aten's signatures."""

    conv_relu: object
    conv_add_relu: object


def emulated_ops() -> FusedOps:
    """Plain-aten equivalents of the cuDNN fused ops (any device; for tests)."""
    def conv_relu(x, w, b, stride, padding, dilation, groups):
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)

    return FusedOps(conv_relu, conv_add_relu)


def cudnn_ops() -> FusedOps:
    return FusedOps(torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu)


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with conv(x, W') + b' == bn(conv(x)) in eval mode, computed in float64."""
    w = conv.weight.detach().double()
    b = (conv.bias.detach().double() if conv.bias is not None
         else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
    if bn is None:
        return w, b
    scale = (bn.weight.detach().double() if bn.affine else 1.0) / torch.sqrt(
        bn.running_var.double() + bn.eps)
    shift = (bn.bias.detach().double() if bn.affine else 0.0) - bn.running_mean.double() * scale
    return w * scale.reshape(-1, 1, 1, 1), b * scale + shift


class FoldedConv(nn.Module):
    """conv + folded BN, then ReLU (fused op), add + ReLU (fused op, when z is given) or
    nothing. Weights live in the compute dtype and memory format."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, ops: FusedOps,
                 dtype: torch.dtype, memory_format: torch.memory_format) -> None:
        super().__init__()
        w, b = fold(conv, bn)
        self.register_buffer("weight", w.to(dtype).contiguous(memory_format=memory_format))
        self.register_buffer("bias", b.to(dtype))
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.relu, self.ops = relu, ops

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if z is not None:
            return self.ops.conv_add_relu(x, self.weight, z.to(x.dtype), 1.0, self.bias,
                                          *self.args)
        if self.relu:
            return self.ops.conv_relu(x, self.weight, self.bias, *self.args)
        return F.conv2d(x, self.weight, self.bias, *self.args)


class FoldedBlock(nn.Module):
    """An "original" residual block: units[:-1] conv+ReLU, the last conv + add + ReLU."""

    def __init__(self, units: list[FoldedConv], shortcut: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for u in self.units[:-1]:
            h = u(h)
        r = x if self.shortcut is None else self.shortcut(x)
        return self.units[-1](h, z=r)


def _block_convs(block: nn.Module) -> int | None:
    """Number of convs of an "original" post-activation block with λ = 1, else None."""
    if isinstance(block, models.CifarBlock):
        ok = block.variant == "original" and block.shortcut_scale == 1.0
        return block.num_convs if ok else None
    names = {type(block).__name__}
    if names & {"BasicBlock", "Bottleneck"} and hasattr(block, "conv2") and hasattr(block, "bn2"):
        if getattr(block, "se", None) is not None or getattr(block, "drop_path", None):
            return None
        return 3 if hasattr(block, "conv3") else 2
    return None


def _shortcut(ds: nn.Module | None, mk) -> nn.Module | None:
    if ds is None:
        return None
    if isinstance(ds, nn.Sequential) and isinstance(ds[0], nn.Conv2d) and len(ds) <= 2:
        bn = ds[1] if len(ds) == 2 and isinstance(ds[1], nn.BatchNorm2d) else None
        if len(ds) == 1 or bn is not None:
            return mk(ds[0], bn, False)
    return ds  # e.g. option-A zero padding: runs as it is


def cudnn_fuse(module: nn.Module, ops: FusedOps, dtype: torch.dtype,
               memory_format: torch.memory_format) -> tuple[nn.Module, int, int]:
    """A deep copy of eval-mode `module` with every supported block (and the stem of our
    ResNets, and a bare conv unit) folded and fused. Returns (module, fused, residual blocks)."""
    from .workloads import ConvUnit

    module = copy.deepcopy(module).eval()

    def mk(conv, bn, relu):
        return FoldedConv(conv, bn, relu, ops, dtype, memory_format)

    if isinstance(module, ConvUnit):
        return mk(module.conv, module.bn, True), 0, 0

    def fuse_block(block: nn.Module) -> nn.Module | None:
        n = _block_convs(block)
        if n is None:
            return None
        units = [mk(getattr(block, f"conv{k}"), getattr(block, f"bn{k}"), k < n)
                 for k in range(1, n + 1)]
        return FoldedBlock(units, _shortcut(getattr(block, "downsample", None), mk))

    blocks = models.residual_blocks(module)
    fused = 0
    root = fuse_block(module)
    if root is not None:
        return root, 1, 1
    for name, child in list(module.named_modules()):
        new = fuse_block(child) if child in blocks else None
        if new is None:
            continue
        parent_name, _, leaf = name.rpartition(".")
        (module.get_submodule(parent_name) if parent_name else module)._modules[leaf] = new
        fused += 1
    stem_ok = isinstance(module, models.ResNet) or (
        isinstance(module, models.CifarResNet) and module.variant == "original")
    if stem_ok and isinstance(module.bn1, nn.BatchNorm2d):
        module.conv1 = mk(module.conv1, module.bn1, True)
        module.bn1, module.relu = nn.Identity(), nn.Identity()
    return module, fused, len(blocks)
