"""Counting before timing (DESIGN.md §6): FLOPs and fewest bytes from the shapes, and the
device's matmul rate and copy bandwidth measured in the same run.

Fewest bytes, the approximation: every conv (and linear) reads its input and its weights once
and writes its output once, and every residual block reads its shortcut once (output-sized).
BatchNorm, ReLU, the add and pooling are assumed fused into those passes (that is the point of
fused_res): a pooling layer's output replaces the write of what it pools. A 1x1 conv with
stride s reads only the pixels it uses (1/s² of its input, channels_last).
Train: forward bytes x 3 (forward; data-gradient pass reads dy and W and writes dx;
weight-gradient pass reads the saved x and dy and writes dW) plus the SGD-momentum step (reads
parameter, gradient and momentum, writes parameter and momentum, fp32: 20 bytes/parameter).
Train FLOPs: forward x 3 (data and weight gradients each cost one forward). This train floor
is low: batch statistics keep each BatchNorm from folding, so at least the pass that applies
it (and the block's add) and backward's read of z come on top (about +30% at ResNet-50 b128);
the percentages of floor in train read low by as much.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs (2 per multiply-add) of every conv and linear layer for one
    (1, 3, image_size, image_size) image, from a shape trace."""
    return trace_costs(model, (3, image_size, image_size)).flops


@dataclass(frozen=True)
class Costs:
    """Per-sample forward FLOPs and element counts (activations per sample, weights once)."""

    flops: int
    activation_elems: int
    weight_elems: int
    param_count: int


def conv_activation_elems(c_in: int, h: int, w: int, c_out: int, oh: int, ow: int,
                          kernel_size: tuple[int, int], padding: tuple[int, int]) -> int:
    """Elements of one sample a conv must read and write: its input once (a 1x1 conv without
    padding only the OH x OW pixels its taps use: with stride s the others are never loaded,
    channels_last) and its output once."""
    one_by_one = tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0)
    return (c_in * oh * ow if one_by_one else c_in * h * w) + c_out * oh * ow


def conv_work(n: int, c_in: int, c_out: int, hw: int, k: int, stride: int,
              element_bytes: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one square k x k conv (padding k // 2, one group) on an
    (n, c_in, hw, hw) input, counted as trace_costs counts a conv: the floor of the
    conv-alone tables (benchmarks/ops_bandwidth.py, conv_configs.py)."""
    pad = k // 2
    o = (hw + 2 * pad - k) // stride + 1
    flops = 2 * n * o * o * c_out * c_in * k * k
    elems = n * conv_activation_elems(c_in, hw, hw, c_out, o, o, (k, k), (pad, pad))
    return float(flops), float((elems + c_out * c_in * k * k) * element_bytes)


def trace_costs(module: nn.Module, sample_shape: tuple[int, ...]) -> Costs:
    """Run one eval forward on a zero sample of `sample_shape` (C, H, W) and count, per sample,
    conv/linear FLOPs and the elements the fused data flow must move (module docstring)."""
    from ..models import residual_blocks

    flops = acts = weights = 0

    def conv_hook(m, inp, out):
        nonlocal flops, acts, weights
        flops += 2 * out[0].numel() * m.weight[0].numel()  # C_in/groups * KH * KW per output
        x, y = inp[0][0], out[0]
        acts += conv_activation_elems(*x.shape, *y.shape, m.kernel_size, m.padding)
        weights += m.weight.numel()

    def pool_hook(m, inp, out):
        nonlocal acts
        acts -= inp[0][0].numel() - out[0].numel()  # written pooled, never read back

    def fc_hook(m, inp, out):
        nonlocal flops, acts, weights
        flops += 2 * m.in_features * m.out_features
        acts += inp[0][0].numel() + out[0].numel()
        weights += m.weight.numel()

    def block_hook(m, inp, out):
        nonlocal acts
        acts += out[0].numel()

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else fc_hook)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [b.register_forward_hook(block_hook) for b in residual_blocks(module)]
    hooks += [m.register_forward_hook(pool_hook) for m in module.modules()
              if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                nn.AdaptiveMaxPool2d))]
    param = next(module.parameters())
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *sample_shape, device=param.device, dtype=param.dtype))
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return Costs(flops, acts, weights, sum(p.numel() for p in module.parameters()))


def work(costs: Costs, batch: int, mode: str, element_bytes: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one timed step at `batch` in `mode` (module docstring)."""
    fwd_flops = costs.flops * batch
    fwd_bytes = (costs.activation_elems * batch + costs.weight_elems) * element_bytes
    if mode == "eval":
        return float(fwd_flops), float(fwd_bytes)
    return float(3 * fwd_flops), float(3 * fwd_bytes + 20 * costs.param_count)


@dataclass(frozen=True)
class Peaks:
    """Measured rates: matmul FLOP/s in `matmul_dtype` and device copy bytes/s."""

    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_n: int
    copy_bytes_per_s: float
    copy_bytes: int

    def floor_s(self, flops: float, nbytes: float) -> float:
        return max(flops / self.matmul_flops_per_s, nbytes / self.copy_bytes_per_s)

    def to_dict(self) -> dict:
        return {"matmul_flops_per_s": self.matmul_flops_per_s, "matmul_dtype": self.matmul_dtype,
                "matmul_n": self.matmul_n, "copy_bytes_per_s": self.copy_bytes_per_s,
                "copy_bytes": self.copy_bytes}


def _best_time(fn, device: str, repeats: int) -> float:
    """Fastest of `repeats` runs (peak rates are a best case by definition)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: str, dtype: str, quick: bool = False) -> Peaks:
    """Time a square matmul in the run's precision and a large copy on `device`.

    CUDA: n=8192 matmul (4096 quick), 1 GiB copy (256 MiB quick); CPU: n=2048 (1024 quick),
    256 MiB copy (64 MiB quick). Copy bandwidth counts the read and the write. These are
    best-of-N rates; a CPU's vendor conv kernels can beat its own matmul at some shapes, so a
    "% of floor" above 100 on a CPU means the floor is approximate there.
    """
    from .config import TORCH_DTYPE

    cuda = device == "cuda"
    n = (4096 if quick else 8192) if cuda else (1024 if quick else 2048)
    tdtype = TORCH_DTYPE[dtype]
    old = (torch.backends.cuda.matmul.allow_tf32,)
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        a = torch.randn(n, n, device=device).to(tdtype)
        b = torch.randn(n, n, device=device).to(tdtype)
        t = _best_time(lambda: torch.mm(a, b), device, 3 if quick else 5 if not cuda else 10)
    finally:
        (torch.backends.cuda.matmul.allow_tf32,) = old
    nbytes = ((256 if quick else 1024) if cuda else (64 if quick else 256)) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    tc = _best_time(lambda: dst.copy_(src), device, 5 if quick else 10)
    return Peaks(2 * n**3 / t, dtype, n, 2 * nbytes / tc, nbytes)
