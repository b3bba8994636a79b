"""BatchNorm semantics for the fused modules: per-channel coefficients from batch or running
statistics, and the running-statistics update, exactly as nn.BatchNorm2d does them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d normalizes with batch statistics in training, or always when it keeps
    no running statistics."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _acc(bn: nn.BatchNorm2d, like: Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def affine_from_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) with bn(z) == z * scale + shift for per-channel mean and biased var.
    Differentiable in mean, var, weight and bias."""
    acc = _acc(bn, mean)
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def running_affine(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) of bn in eval mode: its running statistics folded with its affine.
    Recomputed from the live buffers and parameters each call, so never stale."""
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
    bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype) * factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype) * factor)


def batch_affine(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, shape) -> tuple[Tensor, Tensor]:
    """(scale, shift) from batch statistics of a tensor of `shape`, updating bn's running
    statistics as nn.BatchNorm2d does."""
    count = shape[0] * shape[2] * shape[3]
    check_batch_size(bn, count, shape)
    update_running_stats(bn, mean, var, count)
    return affine_from_stats(bn, mean, var)


def input_affine(bn: nn.BatchNorm2d, x: Tensor, backend: str | None) -> tuple[Tensor, Tensor]:
    """(scale, shift) of bn applied to x itself (a pre-activation BN of a block input)."""
    if uses_batch_stats(bn):
        mean, var = ops.channel_stats(x, backend=backend)
        return batch_affine(bn, mean, var, x.shape)
    return running_affine(bn, x)
