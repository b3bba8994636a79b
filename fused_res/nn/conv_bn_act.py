"""ConvBNAct2d: conv -> BatchNorm -> activation as one fused unit."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import ACTS, prepare_backend
from .unit import run_unit


class ConvBNAct2d(nn.Module):
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
        if act not in ACTS:
            raise ValueError(f"act={act!r}; accepted: {', '.join(map(repr, ACTS))}")
        padding = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias=bias)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels)
        self.act, self.backend = act, prepare_backend(backend)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu",
                     backend: str | None = None) -> ConvBNAct2d:
        """Wrap existing modules (their parameters are shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv, new.bn, new.act = conv, bn, act
        new.backend = prepare_backend(backend)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y, _ = run_unit(x, None, self.conv, self.bn, self.act, self.backend)
        return y

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"
