"""Inference: a conv's weight with its eval-mode BatchNorm folded in, computed once and reused.

Folding per call costs several small kernels per unit (rsqrt of the running variance, the
scaled weight, the autocast cast, a layout change for channels_last) that the fused kernel
then has to wait for; on an H100 they made fused ResNet-50 inference twice as slow as the same
cuDNN kernels on weights folded ahead of time. The cache holds, per conv module, the folded
weight in the compute dtype and memory format, and the folded bias in float32, and is keyed by
everything the fold reads: the version counters and storage of the conv's and BN's parameters
and running statistics (an optimizer step or load_state_dict bumps them), eps, dtype, device
and layout. It is used only where no gradient can flow (no_grad / inference_mode), never while
torch.compile traces (the compiled graph folds on its own), and never for float64.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..backends.reference import memory_format_of
from ..ops import functional
from .batchnorm import running_affine

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applies(h: Tensor) -> bool:
    """Whether the fold may be cached for a call on input h."""
    return (not torch.is_grad_enabled() and h.dtype != torch.float64
            and h.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling())


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ops.conv_unit will run the weight in (autocast casts float32 only)."""
    dt = functional._autocast_dtype(h)
    return dt if dt is not None and weight.dtype == torch.float32 else weight.dtype


def _state(t: Tensor | None) -> tuple:
    return (None,) if t is None else (t.data_ptr(), t._version, t.dtype)


def _cacheable(*tensors: Tensor | None) -> bool:
    """Parameters created under inference_mode have no version counter to key on."""
    return not any(t is not None and t.is_inference() for t in tensors)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, h: Tensor, dtype: torch.dtype,
          fmt: torch.memory_format) -> tuple[Tensor, Tensor]:
    scale, shift = running_affine(bn, h).folded()
    w = (conv.weight.detach().float() * scale.view(-1, 1, 1, 1)).to(dtype)
    b = shift if conv.bias is None else shift + conv.bias.detach().float() * scale
    return w.contiguous(memory_format=fmt), b.detach().float().contiguous()


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, h: Tensor) -> tuple[Tensor, Tensor]:
    """(W', b') with conv(h, W') + b' == bn(conv(h)) for eval-mode bn. W' (C_out, C_in, KH,
    KW) in the dtype the conv computes in (the autocast dtype under autocast), in h's memory
    format; b' (C_out,) float32."""
    dtype = _compute_dtype(h, conv.weight)
    fmt = memory_format_of(h)
    if not _cacheable(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                      bn.running_var):
        return _fold(conv, bn, h, dtype, fmt)
    key = (dtype, h.device, fmt, bn.eps, *_state(conv.weight), *_state(conv.bias),
           *_state(bn.weight), *_state(bn.bias), *_state(bn.running_mean),
           *_state(bn.running_var))
    hit = _CACHE.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    # Computed as ordinary tensors even under inference_mode: an inference tensor has no
    # version counter, so the caches downstream (the Triton weight matrix, the cuDNN bias
    # cast) could not key on it, and raised reading it.
    # (inference_mode(False) also turns grad mode back on: no_grad keeps the fold a leaf.)
    with torch.inference_mode(False), torch.no_grad():
        w, b = _fold(conv, bn, h, dtype, fmt)
    _CACHE[conv] = (key, w, b)
    return w, b
