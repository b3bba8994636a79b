"""The `cudnn` backend: aten's cuDNN fused ops for the eval-mode conv unit.

    y = relu(conv(x, W') + b')                 aten::cudnn_convolution_relu
    y = relu(conv(x, W') + b' + λ * r)         aten::cudnn_convolution_add_relu

W', b' fold the unit's out_scale / out_shift (an eval BatchNorm) into the conv, so the unit
is one cuDNN call. The fast path takes units without a prologue, without a per-sample
branch_scale, with act_mid "none" and act_out "relu", on CUDA tensors in fp32/fp16/bf16 with
a non-empty batch; every other call (and every backward, and the statistics / epilogue ops)
runs the reference implementation, which computes the same function.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .base import BackendStatus
from .reference import ReferenceBackend, _fold, memory_format_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = WeakIdKeyDictionary()


def cast_cached(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), reused while t is unchanged (same storage and version counter). For
    tensors no gradient flows through: the eval fold keeps its bias in float32 and hands the
    same tensor to every call, and casting it per call was one more launch per unit."""
    if t.dtype == dtype:
        return t
    state = (t.data_ptr(), t._version, dtype)
    hit = _CASTS.get(t)
    if hit is not None and hit[0] == state:
        return hit[1]
    out = t.detach().to(dtype)
    _CASTS[t] = (state, out)
    return out


class CudnnBackend(ReferenceBackend):
    name = "cudnn"

    def status(self) -> BackendStatus:
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
        if not torch.backends.cudnn.is_available():
            return BackendStatus(False, "cuDNN is not available in this torch build")
        missing = [op for op in ("cudnn_convolution_relu", "cudnn_convolution_add_relu")
                   if not hasattr(torch.ops.aten, op)]
        if missing:
            return BackendStatus(False, f"this torch lacks aten::{', aten::'.join(missing)}")
        return BackendStatus(True, "")

    def unsupported_reason(self, x, weight, groups, dilation):
        if x.device.type != "cuda":
            return f"tensors on {x.device.type} (cuDNN runs on CUDA devices)"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} (cuDNN's fused ops take float32, float16, bfloat16)"
        return None

    @staticmethod
    def fast_path_applies(x, in_center, in_scale, in_shift, act_in, act_mid, branch_scale,
                          act_out) -> bool:
        """Whether conv_unit_forward runs as one cuDNN fused call."""
        return (x.is_cuda and x.dtype in _DTYPES and x.shape[0] > 0 and in_center is None
                and in_scale is None and in_shift is None and act_in == "none"
                and act_mid == "none" and branch_scale is None and act_out == "relu"
                and torch.backends.cudnn.enabled)

    def conv_unit_forward(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out):
        if not self.fast_path_applies(x, in_center, in_scale, in_shift, act_in, act_mid,
                                      branch_scale, act_out):
            return super().conv_unit_forward(x, weight, bias, stride, padding, dilation, groups,
                                             in_center, in_scale, in_shift, act_in, out_scale,
                                             out_shift, act_mid, residual, res_scale,
                                             branch_scale, act_out)
        fmt = memory_format_of(x)
        if (bias is None and out_scale is None and out_shift is not None
                and not torch.is_grad_enabled()):
            w, b = weight, cast_cached(out_shift, weight.dtype)  # inference on a folded weight
        else:
            w, b = _fold(weight, bias, out_scale, out_shift)
        w = w.contiguous(memory_format=fmt)
        args = (list(stride), list(padding), list(dilation), groups)
        if residual is None:
            y = torch.ops.aten.cudnn_convolution_relu(x, w, b, *args)
        else:
            r = residual.to(x.dtype).contiguous(memory_format=fmt)
            y = torch.ops.aten.cudnn_convolution_add_relu(x, w, r, float(res_scale), b, *args)
        # u (the pre-act_mid conv output) is only read back when act_mid == "relu", which the
        # fast path excludes; the op returns an empty tensor in its place.
        return y.contiguous(memory_format=fmt), y
