"""BatchNorm semantics for the fused modules: per-channel coefficients from batch or running
statistics, and the running-statistics update, exactly as nn.BatchNorm2d does them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d normalizes with batch statistics in training, or always when it keeps
    no running statistics."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _acc(bn: nn.BatchNorm2d, like: Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


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
    if isinstance(bn, nn.SyncBatchNorm) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"a fused block holds {type(bn).__name__}; accepted: nn.BatchNorm2d "
                        "(revert() the model and convert() it again: SyncBatchNorm blocks are "
                        "left unfused)")


def affine_from_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> ChannelAffine:
    """bn(z) as (z - mean) * scale + shift for per-channel mean and biased var.
    Differentiable in mean, var, weight and bias."""
    check_norm(bn)
    acc = _acc(bn, mean)
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = bn.bias.to(acc) if bn.bias is not None else None
    return ChannelAffine(mean.to(acc), scale, shift)


def running_affine(bn: nn.BatchNorm2d, like: Tensor) -> ChannelAffine:
    """bn in eval mode: its running statistics with its affine. Recomputed from the live
    buffers and parameters each call, so a fold into the conv is never stale."""
    acc = _acc(bn, like)
    return affine_from_stats(bn, bn.running_mean.to(acc), bn.running_var.to(acc))


def check_batch_size(bn: nn.BatchNorm2d, count: int, shape) -> None:
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(shape)} (BatchNorm {bn.num_features} channels)")


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update of nn.BatchNorm2d in training: num_batches_tracked += 1;
    running = (1 - f) * running + f * batch, f = momentum, or 1 / num_batches_tracked when
    momentum is None; the running variance is the unbiased one. An empty batch only counts."""
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if count == 0:
        return
    if bn.momentum is None:
        factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
    else:
        factor = bn.momentum
    unbiased = var.detach() * (count / (count - 1))
    running = [bn.running_mean, bn.running_var]
    batch = [mean.detach().to(bn.running_mean.dtype), unbiased.to(bn.running_var.dtype)]
    # Two multi-tensor launches for both buffers rather than six elementwise ones: a training
    # step runs this for every BatchNorm.
    if isinstance(factor, Tensor):
        torch._foreach_mul_(running, 1 - factor)
        torch._foreach_add_(running, torch._foreach_mul(batch, factor))
    else:
        torch._foreach_mul_(running, 1 - factor)
        torch._foreach_add_(running, batch, alpha=factor)


def batch_affine(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, shape) -> ChannelAffine:
    """bn with the batch statistics of a tensor of `shape`, updating bn's running statistics
    as nn.BatchNorm2d does."""
    count = shape[0] * shape[2] * shape[3]
    check_batch_size(bn, count, shape)
    update_running_stats(bn, mean, var, count)
    return affine_from_stats(bn, mean, var)


def input_affine(bn: nn.BatchNorm2d, x: Tensor, backend: str | None) -> ChannelAffine:
    """bn applied to x itself (a pre-activation BN of a block input)."""
    if uses_batch_stats(bn):
        mean, var = ops.channel_stats(x, backend=backend)
        return batch_affine(bn, mean, var, x.shape)
    return running_affine(bn, x)
