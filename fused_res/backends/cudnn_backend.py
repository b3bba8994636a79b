"""The `cudnn` backend: aten's cuDNN fused ops for the eval-mode conv unit.

    y = relu(conv(x, W') + b')                 aten::cudnn_convolution_relu
    y = relu(conv(x, W') + b' + λ * r)         aten::cudnn_convolution_add_relu

W', b' fold the unit's out_scale / out_shift (an eval BatchNorm) into the conv, so the unit
is one cuDNN call. The fast path takes units of those two forms (fused_form: no prologue, no
per-sample branch_scale; a ReLU after the conv, or act_out "relu" after the residual add), on
CUDA tensors in fp32/fp16/bf16 with a non-empty batch; every other call (and every backward,
and the statistics / epilogue ops) runs the reference implementation, which computes the same
function.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .base import BackendStatus
from .constants import is_constant
from .reference import ReferenceBackend, _fold, affine_apart, memory_format_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = WeakIdKeyDictionary()


def cast_cached(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), reused while t is unchanged (same storage and version counter). For
    tensors no gradient flows through and nobody writes (backends.constants): the eval fold
    keeps its bias in float32 and hands the same tensor to every call, and casting it per call
    was one more launch per unit; a caller's own tensor is cast per call."""
    if t.dtype == dtype:
        return t
    if t.is_inference() or not is_constant(t):  # (inference: no version counter to key on)
        return t.detach().to(dtype)
    state = (t.data_ptr(), t._version, dtype)
    hit = _CASTS.get(t)
    if hit is not None and hit[0] == state:
        return hit[1]
    out = t.detach().to(dtype)
    _CASTS[t] = (state, out)
    return out


class CudnnBackend(ReferenceBackend):
    name = "cudnn"
    # In training it is the reference's composite, whose prologue is an apply pass before
    # the conv anyway: run as its own op, the backward reuses it (as for the cuda backend).
    fuse_train_prologue = False

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
    def fused_form(in_center, in_scale, in_shift, act_in, act_mid, residual, branch_scale,
                   act_out) -> bool:
        """Whether the unit is relu(conv + b) or relu(conv + b + λ r), the two functions of
        cuDNN's fused calls: no prologue and no branch scale; without a residual, a ReLU in
        either place (act_out(act_mid(u)) is relu(u) then: the inner units of a block, the
        stem); with one, act_mid "none" and act_out "relu" (a block's last unit)."""
        if (in_center is not None or in_scale is not None or in_shift is not None
                or act_in != "none" or branch_scale is not None):
            return False
        if residual is None:
            return "relu" in (act_mid, act_out)
        return act_mid == "none" and act_out == "relu"

    @classmethod
    def fast_path_applies(cls, x, in_center, in_scale, in_shift, act_in, act_mid, residual,
                          branch_scale, act_out) -> bool:
        """Whether conv_unit_forward runs as one cuDNN fused call."""
        return (x.is_cuda and x.dtype in _DTYPES and x.shape[0] > 0
                and torch.backends.cudnn.enabled
                and cls.fused_form(in_center, in_scale, in_shift, act_in, act_mid, residual,
                                   branch_scale, act_out))

    @staticmethod
    def folds(x, bias, out_scale, out_shift) -> bool:
        """Whether the fast path may fold the unit's affine into cuDNN's weight and bias: in
        float16 (reference.affine_apart) only an eval fold's bias (fused_res's constant,
        whose range nn/eval_fold.py checked when it made it) on a weight that holds the
        scale already, without gradients."""
        if not affine_apart(x.dtype, out_scale, out_shift):
            return True
        return (bias is None and out_scale is None and is_constant(out_shift)
                and not torch.is_grad_enabled())

    def conv_unit_forward(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out):
        if not (self.fast_path_applies(x, in_center, in_scale, in_shift, act_in, act_mid,
                                       residual, branch_scale, act_out)
                and self.folds(x, bias, out_scale, out_shift)):
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
        # u, the pre-act_mid conv output, is read back only for act_mid == "relu", and then only
        # its sign, which y = relu(u) has (the fast path takes act_mid "relu" without a
        # residual or branch scale only).
        return y.contiguous(memory_format=fmt), y
