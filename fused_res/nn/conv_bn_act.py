"""ConvBNAct2d: conv -> BatchNorm -> activation as one fused unit."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from ..ops import ACTS, prepare_backend
from .hooks import calls_more, warn_once
from .plan import built_conv_reason, built_norm_reason
from .scripting import NotScriptable
from .unit import run_unit


def _same_padding(kernel_size, dilation) -> tuple[int, int]:
    """nn.Conv2d's padding="same" as the symmetric padding the fused ops take (odd spans
    only: an even one pads one side more, which they cannot)."""
    pads = []
    for k, d in zip(_pair(kernel_size), _pair(dilation), strict=True):
        if d * (k - 1) % 2:
            raise ValueError(f"padding='same' with kernel_size={kernel_size!r} and "
                             f"dilation={dilation!r} pads one side more than the other; "
                             "accepted: an odd dilation * (kernel_size - 1) + 1 span, or "
                             "explicit int padding")
        pads.append(d * (k - 1) // 2)
    return pads[0], pads[1]


def _check_modules(conv, bn, act: str) -> None:
    """What ConvBNAct2d can compute exactly: a zero-padded nn.Conv2d, then a BatchNorm2d,
    then act. A subclass overriding either's forward would have its override skipped, a
    reflect-padded conv would run zero-padded: both silently wrong."""
    if act not in ACTS:
        raise ValueError(f"act={act!r}; accepted: {', '.join(map(repr, ACTS))}")
    why = built_conv_reason(conv)
    if why is not None:
        raise ValueError(f"conv: {why}; accepted: an nn.Conv2d with padding_mode='zeros' "
                         "and int padding")
    why = built_norm_reason(bn)
    if why is not None:
        raise ValueError(f"bn (norm_layer's module): {why}; accepted: an nn.BatchNorm2d")


class ConvBNAct2d(NotScriptable, nn.Module):
    """conv2d -> BatchNorm2d -> act ("relu" or "none") through the conv-unit ops.

    Children `conv` (nn.Conv2d) and `bn` (nn.BatchNorm2d). Eval folds BN into the conv (one
    pass); train computes batch statistics in the conv's pass and applies BN + act in a second.
    Input (N, in_channels, H, W) -> (N, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, dilation: int = 1,
                 groups: int = 1, bias: bool = False, act: str = "relu",
                 norm_layer=None, backend: str | None = None) -> None:
        super().__init__()
        if padding is None:
            padding = tuple(d * (k // 2) for k, d in zip(_pair(kernel_size), _pair(dilation),
                                                         strict=True))
        elif padding == "same":
            if _pair(stride) != (1, 1):
                raise ValueError(f"padding='same' with stride={stride!r}; accepted: stride 1 "
                                 "(as nn.Conv2d: 'same' is not defined for strided convs)")
            padding = _same_padding(kernel_size, dilation)
        elif padding == "valid":
            padding = 0
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias=bias)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels)
        _check_modules(self.conv, self.bn, act)
        self.act, self.backend = act, prepare_backend(backend)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu",
                     backend: str | None = None) -> ConvBNAct2d:
        """Wrap existing modules (their parameters are shared, not copied): a zero-padded
        nn.Conv2d and a BatchNorm2d, each computing nn's own forward (a subclass that
        overrides it, or another padding mode, raises ValueError)."""
        _check_modules(conv, bn, act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv, new.bn, new.act = conv, bn, act
        new.backend = prepare_backend(backend)
        return new

    def _unfused(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.act == "relu" else y

    def _misfit(self, conv: nn.Module, bn: nn.Module) -> str | None:
        """None where the conv and BatchNorm held now are the ones checked last (or pass the
        constructor's checks: then they are the ones checked); else why they cannot run
        fused (a child replaced since by a reflect-padded conv or a subclass with its own
        forward ran as a plain conv, silently)."""
        d = self.__dict__
        # (The padding too: set in place since to padding_mode 'reflect', it was computed
        # as zeros.)
        key = (conv, bn, getattr(conv, "padding_mode", None), getattr(conv, "padding", None))
        if d.get("_checked") == key:
            return None
        try:
            _check_modules(conv, bn, self.act)
        except ValueError as e:
            return str(e)
        d["_checked"] = key
        return None

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        why = self._misfit(conv, bn)
        if why is not None:
            warn_once(f"a ConvBNAct2d's child replaced since it was built: {why}; its conv, "
                      "BatchNorm and activation run unfused while it is there")
            return self._unfused(x)
        for name, child in (("conv", conv), ("bn", bn)):
            if calls_more(child):
                # A hook (torch.nn.utils.prune's weight recompute, a feature hook) fires only
                # when the child's own forward runs: the unit runs unfused while it is there.
                warn_once(f"hooks on the {name} (or an instance forward) of a ConvBNAct2d: "
                          "its conv, BatchNorm and activation run unfused while they are there")
                return self._unfused(x)
        y, _ = run_unit(x, None, conv, bn, self.act, self.backend)
        return y

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"
