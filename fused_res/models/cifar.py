"""CIFAR ResNets of He et al. 2015 §4.2 and He et al. 2016 ("Identity Mappings"), pure PyTorch.

One constructor covers the whole family of the source notes:

- depth 6n+2 with basic blocks (two 3x3 convs) or 9n+2 with bottleneck blocks (1x1, 3x3, 1x1);
- the five activation placements of He et al. 2016 Fig. 4 plus the plain (no-shortcut) net of
  the degradation experiment;
- shortcut options A (parameter-free: stride-2 subsampling + zero channel padding),
  B (1x1-conv projection only where the shape changes), C (projection everywhere);
- a constant shortcut scale λ (He et al. 2016 §3.1, "constant scaling").

Pre-activation nets follow the paper's boundary rules (§4.1): the stem is a bare conv (full
pre-activation) or conv+BN (ReLU-only pre-activation); the first unit's activation comes
"right after conv1 and before splitting into two paths", so its shortcut reads the
pre-activated input whatever its kind (`shares_preact`); elsewhere a projection shortcut reads
the pre-activated input (as timm's resnetv2 does) and an identity or option-A one the unit's
input; an extra BN+ReLU (or ReLU) follows the last unit, before pooling.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .imagenet import positive_int

VARIANTS = ("original", "plain", "bn_after_add", "relu_before_add", "relu_only_preact",
            "full_preact")
SHORTCUTS = ("A", "B", "C")
BLOCKS = ("basic", "bottleneck")
PREACT_VARIANTS = ("relu_only_preact", "full_preact")


class PadShortcut(nn.Module):
    """Option A shortcut: x[:, :, ::stride, ::stride] followed by zero channels. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut: out_channels={out_channels} < in_channels="
                             f"{in_channels}; option A can only add channels")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


def _check_choice(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r}; accepted: {', '.join(map(repr, accepted))}")


class CifarBlock(nn.Module):
    """One residual unit of a CIFAR ResNet in any of the activation placements.

    Children: conv1, bn1, conv2, bn2 (+ conv3, bn3 for bottlenecks) and `downsample` (None for
    an identity shortcut, PadShortcut for option A, Sequential(conv, [bn]) for a projection).
    In "full_preact" bn_k normalizes the input of conv_k; elsewhere its output, except that in
    "bn_after_add" the last BN normalizes the sum. shares_preact (pre-activation variants; the
    net's first unit): the shortcut reads the pre-activated input whatever its kind; without
    it, only a projection does.
    Input (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 variant: str = "original", shortcut: str = "A", block: str = "basic",
                 shortcut_scale: float = 1.0, norm_layer=None,
                 shares_preact: bool = False) -> None:
        super().__init__()
        _check_choice("variant", variant, VARIANTS)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("block", block, BLOCKS)
        if (isinstance(shortcut_scale, bool) or not isinstance(shortcut_scale, (int, float))
                or not math.isfinite(shortcut_scale)):
            raise ValueError(f"shortcut_scale={shortcut_scale!r}; accepted: a finite float "
                             "(the shortcut's constant scale λ)")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.variant, self.block, self.shortcut_scale = variant, block, float(shortcut_scale)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shares_preact = bool(shares_preact) and variant in PREACT_VARIANTS
        preact = variant == "full_preact"
        if block == "basic":
            chans = [in_channels, out_channels, out_channels]
            strides = [stride, 1]
            kernels = [3, 3]
        else:
            width = out_channels // 4
            chans = [in_channels, width, width, out_channels]
            strides = [1, stride, 1]
            kernels = [1, 3, 1]
        layers = zip(chans[:-1], chans[1:], strides, kernels, strict=True)
        for k, (cin, cout, s, ks) in enumerate(layers, 1):
            self.add_module(f"conv{k}", nn.Conv2d(cin, cout, ks, s, ks // 2, bias=False))
            self.add_module(f"bn{k}", norm_layer(cin if preact else cout))
        self.num_convs = len(kernels)

        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample: nn.Module | None = None
        if variant == "plain":
            pass
        elif shortcut == "C" or (shortcut == "B" and shape_changes):
            conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            # A pre-activation projection reads the already-normalized input, so it has no BN.
            layers = [conv] if variant in PREACT_VARIANTS else [conv, norm_layer(out_channels)]
            self.downsample = nn.Sequential(*layers)
        elif shape_changes:
            self.downsample = PadShortcut(in_channels, out_channels, stride)

    @property
    def is_residual(self) -> bool:
        return self.variant != "plain"

    def _convs(self):
        return [(getattr(self, f"conv{k}"), getattr(self, f"bn{k}"))
                for k in range(1, self.num_convs + 1)]

    def shortcut_reads_preact(self) -> bool:
        """Whether the shortcut takes the pre-activated input rather than the unit's input."""
        return self.variant in PREACT_VARIANTS and (
            self.shares_preact or isinstance(self.downsample, nn.Sequential))

    def _preact(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "full_preact":
            return F.relu(self.bn1(x))
        return F.relu(x)

    def _shortcut(self, x: torch.Tensor, preact: torch.Tensor | None) -> torch.Tensor:
        src = preact if self.shortcut_reads_preact() else x
        r = src if self.downsample is None else self.downsample(src)
        return r if self.shortcut_scale == 1.0 else r * self.shortcut_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variant
        convs = self._convs()
        if v in PREACT_VARIANTS:
            p = self._preact(x)
            out = p
            for k, (conv, bn) in enumerate(convs):
                if v == "full_preact":
                    out = conv(out if k == 0 else F.relu(bn(out)))
                else:
                    out = bn(conv(out if k == 0 else F.relu(out)))
            return out + self._shortcut(x, p)
        out = x
        for conv, bn in convs[:-1]:
            out = F.relu(bn(conv(out)))
        conv, bn = convs[-1]
        out = conv(out)
        if v == "plain":
            return F.relu(bn(out))
        if v == "original":
            return F.relu(bn(out) + self._shortcut(x, None))
        if v == "bn_after_add":
            return F.relu(bn(out + self._shortcut(x, None)))
        # relu_before_add
        return F.relu(bn(out)) + self._shortcut(x, None)

    def forward_shortcut_only(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch removed (Veit et al. 2016 lesion)."""
        v = self.variant
        if v == "plain":
            raise ValueError("a plain block has no shortcut to fall back to")
        if v in PREACT_VARIANTS:
            p = self._preact(x) if self.shortcut_reads_preact() else None
            r = self._shortcut(x, p)
        else:
            r = self._shortcut(x, None)
            if v == "original":
                return F.relu(r)
            if v == "bn_after_add":
                return F.relu(self._convs()[-1][1](r))
        # A new tensor, as the whole unit returns: the caller's x may be someone else's
        # output (a hook's capture) and the net's next in-place ReLU would write it.
        return r.clone() if r is x else r

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, block={self.block!r}, stride={self.stride}, "
                f"shortcut_scale={self.shortcut_scale}")


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages at 32/16/8 resolution, global pool, linear.
    Input (N, 3, H, W) float; output (N, num_classes) logits."""

    def __init__(self, depth: int, variant: str = "original", shortcut: str = "A",
                 num_classes: int = 10, block: str = "basic", shortcut_scale: float = 1.0,
                 widths: tuple[int, int, int] = (16, 32, 64), norm_layer=None) -> None:
        super().__init__()
        _check_choice("variant", variant, VARIANTS)
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("block", block, BLOCKS)
        n = blocks_per_stage(depth, block)
        if not positive_int(num_classes):
            raise ValueError(f"num_classes={num_classes!r}; accepted: a positive integer")
        if (not isinstance(widths, (list, tuple)) or len(widths) != 3
                or not all(positive_int(w) for w in widths)):
            raise ValueError(f"widths={widths!r}; accepted: three positive channel counts")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.depth, self.variant, self.block_type = depth, variant, block
        expansion = 4 if block == "bottleneck" else 1

        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = None if variant == "full_preact" else norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, w in enumerate(widths):
            out_ch = w * expansion
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                # (He et al. 2016 §4.1: the first unit's activation is shared by both paths)
                blocks.append(CifarBlock(in_ch, out_ch, stride, variant, shortcut, block,
                                         shortcut_scale, norm_layer,
                                         shares_preact=(i, j) == (0, 0)))
                in_ch = out_ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        # The extra activation after the last pre-activation unit (He et al. 2016 §4).
        self.final_bn = norm_layer(in_ch) if variant == "full_preact" else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        if self.variant != "relu_only_preact" and self.variant != "full_preact":
            x = self.relu(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.final_bn is not None:
            x = self.final_bn(x)
        if self.variant in PREACT_VARIANTS:
            x = self.relu(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def blocks_per_stage(depth: int, block: str = "basic") -> int:
    """n for depth = 6n+2 (basic) or 9n+2 (bottleneck); ValueError otherwise."""
    _check_choice("block", block, BLOCKS)
    per_block = 2 if block == "basic" else 3
    step = 3 * per_block
    if not isinstance(depth, int) or depth < step + 2 or (depth - 2) % step:
        form = "6n+2 (8, 14, 20, 32, 44, 56, 110, 1202, ...)" if block == "basic" else \
            "9n+2 (11, 20, 29, ..., 164, 1001)"
        raise ValueError(f"depth={depth!r} with block={block!r}; accepted: depth = {form} "
                         "with n >= 1")
    return (depth - 2) // step


def cifar_resnet(depth: int, variant: str = "original", shortcut: str = "A",
                 num_classes: int = 10, block: str = "basic", shortcut_scale: float = 1.0,
                 **kwargs) -> CifarResNet:
    """Build a CIFAR ResNet; see the module docstring for the choices. Input (N, 3, 32, 32)."""
    return CifarResNet(depth, variant=variant, shortcut=shortcut, num_classes=num_classes,
                       block=block, shortcut_scale=shortcut_scale, **kwargs)


def _basic(depth: int):
    def build(**kwargs) -> CifarResNet:
        return cifar_resnet(depth, **kwargs)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2015 §4.2); kwargs as cifar_resnet."
    return build


resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (
    _basic(d) for d in (20, 32, 44, 56, 110, 1202))


def resnet164(**kwargs) -> CifarResNet:
    """Pre-activation bottleneck ResNet-164 of He et al. 2016 (1.7M parameters)."""
    kwargs = {"variant": "full_preact", "shortcut": "B", "block": "bottleneck", **kwargs}
    return cifar_resnet(164, **kwargs)


def resnet1001(**kwargs) -> CifarResNet:
    """Pre-activation bottleneck ResNet-1001 of He et al. 2016 (10.2M parameters)."""
    kwargs = {"variant": "full_preact", "shortcut": "B", "block": "bottleneck", **kwargs}
    return cifar_resnet(1001, **kwargs)
