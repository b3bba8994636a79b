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

import warnings

import torch
from torch import Tensor, nn

from ..ops import prepare_backend
from .hooks import has_hooks, share_hooks
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
                     relu_inplace: bool, backend: str | None, parent: nn.Module | None = None,
                     act: nn.Module | None = None) -> FusedStemConv:
        """names: the parent's attribute names of the BatchNorm and the ReLU (for revert);
        parent: the module whose conv1 this becomes, act the placeholder it holds for the
        ReLU (for the check that they are still in place: FusedStemConv.changed)."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        # Not registered children: bn stays where the model keeps it (its keys, its place in
        # .train() / .to()), and deepcopy maps these references to the same copies.
        new.__dict__["_norm"] = bn
        new.__dict__["_stem"] = (names, relu_inplace)
        new.__dict__["_parent"] = parent
        new.__dict__["_act"] = act
        new.backend = prepare_backend(backend)
        return new

    def changed(self) -> str | None:
        """What changed since the stem was fused, or None: the parent's BatchNorm or ReLU
        replaced (SyncBatchNorm.convert_sync_batchnorm, an assignment), or hooks added to the
        conv, the BatchNorm or the ReLU, which the fused stem would not run as modules."""
        d = self.__dict__
        parent, norm, act = d.get("_parent"), d["_norm"], d.get("_act")
        if parent is None:  # (made without its parent: nothing to compare with)
            return None
        (bn_name, act_name), _ = d["_stem"]
        if parent._modules.get(bn_name) is not norm:
            return f"{bn_name} was replaced"
        if act is not None and parent._modules.get(act_name) is not act:
            return f"{act_name} was replaced"
        for name, m in (("conv1", self), (bn_name, norm), (act_name, act)):
            if m is not None and has_hooks(m):
                return f"{name} has hooks"
        return None

    def forward(self, x: Tensor) -> Tensor:
        reason = self.changed()
        if reason is not None:
            return self._unfuse_in_place(reason, x)
        y, _ = run_unit(x, None, self, self.__dict__["_norm"], "relu", self.backend)
        return y

    def _unfuse_in_place(self, reason: str, x: Tensor) -> Tensor:
        """Put the plain conv, BatchNorm and ReLU back into the parent and return the conv of
        x: the parent's forward goes on to call its (new or restored) BatchNorm and ReLU."""
        if torch.compiler.is_compiling():
            raise RuntimeError(f"fused_res: the stem changed after convert() ({reason}); run "
                               "the model once outside torch.compile, or revert() and "
                               "convert() it again")
        warnings.warn(f"fused_res: the fused stem's {reason} after convert(); conv1, bn1 "
                      "and the ReLU run as plain modules again", stacklevel=3)
        conv = unfuse_stem(self.__dict__["_parent"], self)
        return conv.forward(x)

    def as_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d over the same parameters, with this module's hooks (revert)."""
        conv = nn.Conv2d.__new__(nn.Conv2d)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("_norm", "_stem", "_parent", "_act", "backend")})
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", fused with its BatchNorm and ReLU, backend={self.backend!r}")


def unfuse_stem(parent: nn.Module, fused: FusedStemConv) -> nn.Conv2d:
    """Put a plain conv, BatchNorm and ReLU back in parent in place of the fused stem (revert,
    or the stem itself when it changed); a BatchNorm or ReLU the user has put there since is
    kept. Hooks registered on the fused modules stay registered on the plain ones. Returns
    the plain conv."""
    (bn_name, act_name), inplace = fused.__dict__["_stem"]
    bn = parent._modules.get(bn_name)
    if isinstance(bn, AppliedBatchNorm2d):
        parent._modules[bn_name] = bn.as_batchnorm()
    act, placeholder = parent._modules.get(act_name), fused.__dict__.get("_act")
    # (a stem fused before the placeholder was recorded: any Identity there is ours)
    ours = act is placeholder if placeholder is not None else type(act) is nn.Identity
    if ours:
        relu = nn.ReLU(inplace=inplace)
        share_hooks(act, relu)
        parent._modules[act_name] = relu
    conv = fused.as_conv()
    parent._modules["conv1"] = conv
    return conv
