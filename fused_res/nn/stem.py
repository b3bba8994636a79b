"""A ResNet stem (conv -> BatchNorm -> ReLU, then the model's own max-pool) fused in place,
without touching the model's forward or its state_dict keys.

The model still calls conv1, bn1 and relu in turn. After fusion conv1 is a `FusedStemConv`
that computes relu(bn1(conv1(x))) through the conv-unit ops (eval: BN folded into the conv,
one pass; train: the statistics in the conv's pass, BN + ReLU in one more), bn1 is an
`AppliedBatchNorm2d` (the same parameters and buffers under the same names; it passes its
input through, being already applied) and relu an nn.Identity. The stem's BatchNorm +
ReLU were two or three eager passes over the network's largest activation.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import prepare_backend
from .unit import run_unit


class AppliedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose normalization the preceding FusedStemConv applies: its forward is
    the identity. Parameters, buffers, train/eval state and state_dict keys are the original
    module's."""

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> AppliedBatchNorm2d:
        new = cls.__new__(cls)
        # The same parameter and buffer dicts: one set of tensors, updated in place.
        new.__dict__.update(bn.__dict__)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return x

    def as_batchnorm(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d over the same parameters and buffers (revert)."""
        bn = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        bn.__dict__.update(self.__dict__)
        return bn


class FusedStemConv(nn.Conv2d):
    """conv -> BatchNorm (the AppliedBatchNorm2d it is given) -> ReLU through the conv-unit
    ops. Same parameters and state_dict keys as the nn.Conv2d it replaces. Input
    (N, C_in, H, W) -> (N, C_out, H', W') after the ReLU."""

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: AppliedBatchNorm2d, names: tuple[str, str],
                     relu_inplace: bool, backend: str | None) -> FusedStemConv:
        """names: the parent's attribute names of the BatchNorm and the ReLU (for revert)."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        # Not a registered child: bn stays where the model keeps it (its keys, its place in
        # .train() / .to()), and deepcopy maps this reference to the same copy.
        new.__dict__["_norm"] = bn
        new.__dict__["_stem"] = (names, relu_inplace)
        new.backend = prepare_backend(backend)
        return new

    def forward(self, x: Tensor) -> Tensor:
        y, _ = run_unit(x, None, self, self.__dict__["_norm"], "relu", self.backend)
        return y

    def as_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d over the same parameters (revert)."""
        conv = nn.Conv2d.__new__(nn.Conv2d)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("_norm", "_stem", "backend")})
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", fused with its BatchNorm and ReLU, backend={self.backend!r}")
