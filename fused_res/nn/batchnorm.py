"""BatchNorm semantics for the fused modules: per-channel coefficients from batch or running
statistics, and the running-statistics update, exactly as nn.BatchNorm2d does them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..backends.reference import update_running_stats
from .plan import is_frozen


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d normalizes with batch statistics in training, or always when it keeps
    no running statistics; a frozen one (plan.is_frozen) never."""
    if bn.training:
        return not is_frozen(bn)
    return bn.running_mean is None or bn.running_var is None


def num_channels(bn: nn.Module) -> int:
    """The channels bn normalizes (torchvision's FrozenBatchNorm2d has no num_features)."""
    n = getattr(bn, "num_features", None)
    return n if n is not None else bn.running_mean.shape[0]


def frozen_promoted(y: Tensor, bn: nn.Module | None) -> Tensor:
    """y, the fused value of a unit or block whose output a frozen BatchNorm (plan.is_frozen)
    makes, in the dtype the original returns: under autocast the frozen one's float32
    buffers promote the conv's output to float32 (a plain BatchNorm keeps its input's dtype).
    Rounded to the autocast dtype first: within that dtype's tolerance of the original."""
    if (y.dtype in (torch.float16, torch.bfloat16) and bn is not None and is_frozen(bn)
            and ops.functional._autocast_dtype(y) is not None):
        return y.float()
    return y


def _acc(bn: nn.BatchNorm2d, like: Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; no call when it already is (several per BatchNorm per step)."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass
class ChannelAffine:
    """value = (t - center) * scale + shift per channel (float32, or float64 for float64)."""

    center: Tensor | None
    scale: Tensor | None
    shift: Tensor | None

    def folded(self) -> tuple[Tensor | None, Tensor | None]:
        """(scale, shift') with t * scale + shift' == the same value (for folding into a conv).
        """
        if self.center is None:
            return self.scale, self.shift
        shift = -self.center * self.scale
        return self.scale, shift if self.shift is None else shift + self.shift


def check_norm(bn: nn.Module) -> None:
    """Fused blocks compute BatchNorm statistics locally; a SyncBatchNorm (or any other norm)
    put into one after conversion would be silently wrong, so refuse it."""
    if isinstance(bn, nn.SyncBatchNorm) or not (isinstance(bn, nn.BatchNorm2d)
                                                or is_frozen(bn)):
        raise TypeError(f"a fused block holds {type(bn).__name__}; accepted: nn.BatchNorm2d "
                        "or a frozen one (torchvision's, timm's) (revert() the model and "
                        "convert() it again: SyncBatchNorm blocks are left unfused)")


def affine_from_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> ChannelAffine:
    """bn(z) as (z - mean) * scale + shift for per-channel mean and biased var.
    Differentiable in mean, var, weight and bias."""
    check_norm(bn)
    acc = _acc(bn, mean)
    scale = torch.rsqrt(_as(var, acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * _as(bn.weight, acc)
    shift = _as(bn.bias, acc) if bn.bias is not None else None
    return ChannelAffine(_as(mean, acc), scale, shift)


def running_affine(bn: nn.BatchNorm2d, like: Tensor) -> ChannelAffine:
    """bn in eval mode: its running statistics with its affine. Recomputed from the live
    buffers and parameters each call, so a fold into the conv is never stale."""
    acc = _acc(bn, like)
    return affine_from_stats(bn, _as(bn.running_mean, acc), _as(bn.running_var, acc))


def check_batch_size(bn: nn.BatchNorm2d, count: int, shape) -> None:
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(shape)} (BatchNorm {bn.num_features} channels)")


def batch_affine(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, shape,
                 backend: str | None) -> ChannelAffine:
    """bn with the batch statistics of a tensor of `shape`, updating bn's running statistics
    as nn.BatchNorm2d does (fused_res.ops.bn_scale: the coefficient and the update in one
    op, where the composite took about a dozen C-sized launches per BatchNorm per step)."""
    check_norm(bn)
    count = shape[0] * shape[2] * shape[3]
    check_batch_size(bn, count, shape)
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    acc = _acc(bn, mean)
    mean, var = _as(mean, acc), _as(var, acc)
    # torch.jit.trace records sizes as tensors. Through the op the count would be a constant
    # of the trace (the unbiased variance wrong at any other batch size): under a trace the
    # update is aten ops, which it records with the count as a tensor.
    traced = isinstance(count, Tensor)
    through_op = update and not traced
    scale = ops.bn_scale(
        mean, var, bn.weight,
        running_mean=bn.running_mean if through_op else None,
        running_var=bn.running_var if through_op else None,
        num_batches_tracked=bn.num_batches_tracked if through_op else None,
        momentum=bn.momentum, eps=bn.eps, count=0 if traced else count, backend=backend)
    if update and traced:
        update_running_stats(mean, var, bn.running_mean, bn.running_var,
                             bn.num_batches_tracked, bn.momentum, count)
    shift = _as(bn.bias, acc) if bn.bias is not None else None
    return ChannelAffine(mean, scale, shift)


def input_affine(bn: nn.BatchNorm2d, x: Tensor, backend: str | None) -> ChannelAffine:
    """bn applied to x itself (a pre-activation BN of a block input)."""
    if uses_batch_stats(bn):
        mean, var = ops.channel_stats(x, backend=backend)
        return batch_affine(bn, mean, var, x.shape, backend)
    return running_affine(bn, x)
