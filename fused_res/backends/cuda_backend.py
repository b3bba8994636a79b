"""The `cuda` backend: aten convolutions (cuDNN on the GPU) with the fused BatchNorm / ReLU /
add kernels of the C++ extension (`fused_res._C`, ops `torch.ops.fused_res_C.*`).

- channel_stats: one two-level reduction pass (shifted sums in fp32).
- epilogue: one pass for affine, act_mid, residual add (λ or per-sample scale), act_out; its
  backward one pass that writes dL/dz, dL/dr and reduces Σ dL/du and Σ dL/du·(z - center).
- conv_unit (eval): BatchNorm folded into the conv weight and bias, aten conv, then the whole
  tail in one fused pass (no pass at all when there is no tail). On CUDA, the units that
  cuDNN fuses itself (conv + bias [+ λ·residual] + ReLU, see cudnn_backend.py) go to
  aten's cudnn_convolution_[add_]relu instead; FUSED_RES_CUDA_CUDNN_FUSED=0 turns that off.
- conv_bn_stats (train): aten conv, then the statistics pass; backward: the statistics
  gradient pass, aten's convolution_backward. A training unit as one node (ops/train_unit.py)
  finalizes its BatchNorm in the statistics pass's last launch (channel_stats_bn) and takes
  the gradient of the BatchNorm's scale in the apply backward's (bn_epilogue_backward).
- Prologues (a pending BN + ReLU of the conv input) run through the same apply kernel.

The extension has CPU kernels too, so this backend runs (and is tested) on CPU tensors; it
declines float64 (the kernels are fp32/fp16/bf16) and unknown devices. Conv data and weight
gradients stay with aten (cuDNN) until a faster kernel is proven (DESIGN.md §2).
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from .. import _ext
from . import registry
from .base import BackendStatus, in_place_reason, runs_own
from .cudnn_backend import CudnnBackend
from .reference import (
    ReferenceBackend,
    _conv_backward,
    _fold,
    affine_apart,
    fold_backward,
    memory_format_of,
    needs_pre_act,
)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA kernels are built for sm_80 and sm_90 with sm_90 PTX (setup.py): older GPUs have
# no image to run, and CUDA would only say so at the first launch, mid-model.
MIN_CAPABILITY = (8, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return cap


def _ops():
    ops = _ext.load()
    if ops is None:  # status() said available, so this is a bug, not a user error
        raise RuntimeError(f"fused_res: the extension is not loaded ({_ext.reason()})")
    return ops


_CUDNN = CudnnBackend()
_cudnn_ok: list[bool] = []


def _cudnn_fused(x, in_center, in_scale, in_shift, act_in, act_mid, residual, branch_scale,
                 act_out) -> bool:
    """Whether this eval unit goes to cuDNN's own fused conv + bias (+ add) + ReLU."""
    if not x.is_cuda or os.environ.get("FUSED_RES_CUDA_CUDNN_FUSED", "1") == "0":
        return False
    if not _cudnn_ok:
        _cudnn_ok.append(_CUDNN.status().available)
    return _cudnn_ok[0] and _CUDNN.fast_path_applies(x, in_center, in_scale, in_shift, act_in,
                                                     act_mid, residual, branch_scale, act_out)


def _relu(act: str) -> bool:
    return act == "relu"


class CudaBackend(ReferenceBackend):
    """aten conv + the fused_res_C apply / statistics kernels (CPU and CUDA)."""

    name = "cuda"
    # Its prologue is an apply pass before cuDNN's conv either way; run as its own op in
    # training, the backward reuses that pass's output instead of running it again.
    fuse_train_prologue = False
    fused_train_unit = True  # (base.Backend.fused_train_unit)

    def status(self) -> BackendStatus:
        if not _ext.loaded() and registry.tracing():
            # dynamo cannot trace the loader (a lock, maybe a build); falling back would
            # compile the reference path into the graph without a word.
            raise RuntimeError(
                "fused_res: torch.compile is tracing the first use of backend='cuda' (named, "
                "or the winner 'auto' recorded), before its C++/CUDA extension has loaded; "
                "load it first, in eager code: convert(model, backend=...) with the backend "
                "the model runs, or fused_res.backends.prepare('cuda')")
        if _ext.load() is None:
            return BackendStatus(False, f"the C++/CUDA extension is not loaded: {_ext.reason()}")
        return BackendStatus(True, "")

    def unsupported_reason(self, x, weight, groups, dilation):
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
        if x.device.type not in ("cpu", "cuda"):
            return f"device {x.device.type!r} (the extension has CPU and CUDA kernels)"
        if x.device.type == "cuda":
            if not _ext.has_cuda_kernels():
                return "CUDA tensors (the extension was built without its CUDA kernels)"
            cap = _capability(x.device)
            if cap < MIN_CAPABILITY:
                return (f"a GPU of compute capability {cap[0]}.{cap[1]} (the CUDA kernels are "
                        f"built for sm_80 and newer)")
        return None

    # ---- a train-mode BatchNorm's scale and running statistics: one kernel each -----------
    def bn_scale_forward(self, var, weight, eps):
        if self.unsupported_reason(var, None, 1, (1, 1)) is not None:
            return super().bn_scale_forward(var, weight, eps)
        return _ops().bn_scale(var, weight, eps)

    def bn_scale_backward(self, g, var, weight, eps, need_var, need_weight):
        if self.unsupported_reason(var, None, 1, (1, 1)) is not None:
            return super().bn_scale_backward(g, var, weight, eps, need_var, need_weight)
        gv, gw = _ops().bn_scale_backward(g, var, weight, eps, need_var, need_weight)
        return (gv if need_var else None), (gw if need_weight and weight is not None else None)

    def _finalizes(self, var, running_mean, running_var, momentum, num_batches_tracked):
        if (self.unsupported_reason(var, None, 1, (1, 1)) is not None
                or (momentum is None and num_batches_tracked is None)):
            return False  # (the op's resolution warned, or there is nothing to update)
        reason = in_place_reason(var, running_mean, running_var, float32_only=True)
        if reason is not None:
            registry.warn_once(f"the cuda backend's running-statistics update: {reason}")
            return False
        return True

    def bn_update_running(self, mean, var, running_mean, running_var, num_batches_tracked,
                          momentum, count):
        if not self._finalizes(var, running_mean, running_var, momentum, num_batches_tracked):
            return super().bn_update_running(mean, var, running_mean, running_var,
                                             num_batches_tracked, momentum, count)
        # (its scale and shift outputs are not used here)
        _ops().bn_finalize(mean, var, None, None, running_mean, running_var,
                           num_batches_tracked, momentum, 1.0, count)

    def bn_scale_and_update(self, var, weight, eps, mean, running_mean, running_var,
                            num_batches_tracked, momentum, count):
        if not self._finalizes(var, running_mean, running_var, momentum, num_batches_tracked):
            return super().bn_scale_and_update(var, weight, eps, mean, running_mean,
                                               running_var, num_batches_tracked, momentum,
                                               count)
        # The finalize computes bn_scale's scale as bn_scale does (a correctly rounded
        # 1 / sqrt(var + eps), times the weight) in the launch that updates the statistics.
        scale, _ = _ops().bn_finalize(mean, var, weight, None, running_mean, running_var,
                                      num_batches_tracked, momentum, float(eps), count)
        return scale

    # ---- the prologue p = act_in((x - c) * a + b) and its backward ---------------------------
    def _prologue(self, x, in_center, in_scale, in_shift, act_in):
        if in_center is None and in_scale is None and in_shift is None:
            return torch.relu(x) if _relu(act_in) else x
        return _ops().epilogue(x, in_center, in_scale, in_shift, _relu(act_in), None, 1.0, None,
                               False)

    def _prologue_backward(self, gp, x, in_center, in_scale, in_shift, act_in, needs, grads):
        affine = not (in_center is None and in_scale is None and in_shift is None)
        if not affine and not _relu(act_in):
            if needs["x"]:
                grads["x"] = gp
            return
        n_center = needs["in_center"] and in_center is not None
        n_scale = needs["in_scale"] and in_scale is not None
        n_shift = needs["in_shift"] and in_shift is not None
        sums = n_center or n_scale or n_shift
        gx, _, s1, s2, gc = _ops().epilogue_backward(
            gp, x, None, in_center, in_scale, in_shift, _relu(act_in), 1.0, None, False,
            needs["x"], False, sums, n_center)
        if needs["x"]:
            grads["x"] = gx
        _affine_grads(grads, ("in_center", "in_scale", "in_shift"), center=in_center,
                      scale=in_scale, shift=in_shift, n_center=n_center, n_scale=n_scale,
                      n_shift=n_shift, sum_gu=s1, sum_gu_centered=s2, grad_center=gc)

    # ---- the reference's primitives on the extension (conv_bn_stats_backward is inherited) --
    def _prologue_apply(self, x, center, scale, shift, act):
        return self._prologue(x, center, scale, shift, act)

    def _prologue_grads(self, gp, x, center, scale, shift, act, needs):
        grads: dict = {}
        self._prologue_backward(gp, x, center, scale, shift, act, needs, grads)
        return tuple(grads.get(k) for k in ("x", "in_center", "in_scale", "in_shift"))

    def _stats_grad(self, gz, gmean, gvar, z, mean):
        return _ops().stats_backward(gz, gmean, gvar, z, mean)

    # ---- conv_unit ----------------------------------------------------------------------------
    def conv_unit_forward(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out):
        if (_cudnn_fused(x, in_center, in_scale, in_shift, act_in, act_mid, residual,
                         branch_scale, act_out)
                and _CUDNN.folds(x, bias, out_scale, out_shift)):
            return _CUDNN.conv_unit_forward(x, weight, bias, stride, padding, dilation, groups,
                                            in_center, in_scale, in_shift, act_in, out_scale,
                                            out_shift, act_mid, residual, res_scale,
                                            branch_scale, act_out)
        fmt = memory_format_of(x)
        p = self._prologue(x, in_center, in_scale, in_shift, act_in)
        if affine_apart(x.dtype, out_scale, out_shift):
            # float16: the affine in float32 in the epilogue pass, after the unfolded conv
            z = F.conv2d(p, weight, bias, stride, padding, dilation, groups)
            if not needs_pre_act(act_mid, residual, branch_scale, act_out):
                y = _ops().epilogue(z, None, out_scale, out_shift, _relu(act_mid), residual,
                                    float(res_scale), branch_scale, _relu(act_out))
                return y.contiguous(memory_format=fmt), y  # (u unread: library.py)
            u = _ops().epilogue(z, None, out_scale, out_shift, False, None, 1.0, None, False)
            y = _ops().epilogue(u, None, None, None, True, residual, float(res_scale),
                                branch_scale, _relu(act_out))
            return y.contiguous(memory_format=fmt), u
        w, b = _fold(weight, bias, out_scale, out_shift)
        u = F.conv2d(p, w, b, stride, padding, dilation, groups)
        if not (_relu(act_mid) or residual is not None or branch_scale is not None
                or _relu(act_out)):
            return u.contiguous(memory_format=fmt), u
        y = _ops().epilogue(u, None, None, None, _relu(act_mid), residual, float(res_scale),
                            branch_scale, _relu(act_out))
        return y.contiguous(memory_format=fmt), u

    def conv_unit_backward(self, gy, saved, needs):
        s = saved
        x, weight, bias = s["x"], s["weight"], s["bias"]
        relu_mid, relu_out = _relu(s["act_mid"]), _relu(s["act_out"])
        gu, gr, gb_eff, _, _ = _ops().epilogue_backward(
            gy.to(x.dtype), s["u"] if relu_mid else None, s["y"] if relu_out else None, None,
            None, None, relu_mid, float(s["res_scale"]), s["branch_scale"], relu_out, True,
            bool(needs["residual"]), True)
        out_scale, out_shift = s["out_scale"], s["out_shift"]
        w_eff, _ = _fold(weight, bias, out_scale, out_shift)
        p = self._prologue(x, s["in_center"], s["in_scale"], s["in_shift"], s["act_in"])
        need_p = any(needs[k] for k in ("x", "in_center", "in_scale", "in_shift"))
        need_w = needs["weight"] or needs["out_scale"]
        gp, gw_eff, _ = _conv_backward(gu, p, w_eff, False, s["stride"], s["padding"],
                                       s["dilation"], s["groups"], need_p, need_w)
        grads = {"residual": gr.to(s["residual_dtype"]) if needs["residual"] else None}
        grads.update(fold_backward(gw_eff, gb_eff, weight, bias, out_scale, out_shift, needs))
        if need_p:
            self._prologue_backward(gp, x, s["in_center"], s["in_scale"], s["in_shift"],
                                    s["act_in"], needs, grads)
        return grads

    # ---- conv_bn_stats ------------------------------------------------------------------------
    def _stats_conv(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                    in_scale, in_shift, act_in):
        """z = conv2d(prologue(x)) in x's memory format, for the statistics pass."""
        p = self._prologue(x, in_center, in_scale, in_shift, act_in)
        return F.conv2d(p, weight, bias, stride, padding, dilation, groups).contiguous(
            memory_format=memory_format_of(x))

    def conv_bn_stats_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in):
        z = self._stats_conv(x, weight, bias, stride, padding, dilation, groups, in_center,
                             in_scale, in_shift, act_in)
        mean, var = _ops().channel_stats(z)
        return z, mean, var

    # ---- a training unit (ops.train_unit): each pair in one kernel launch on the GPU ------
    def conv_bn_train_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in, bn_weight, eps,
                              running_mean, running_var, num_batches_tracked, momentum, count):
        # The BatchNorm's finalize in the statistics pass's last launch (channel_stats_bn),
        # where it has a momentum (without one the finalize reads the count, bumped by a launch
        # of its own first) and can update the buffers in place; else the two steps, as where a
        # subclass overrides either (the merged op would skip the override).
        if (momentum is None
                or not runs_own(self, CudaBackend, "conv_bn_stats_forward",
                                "bn_scale_and_update")
                or not self._finalizes(x, running_mean, running_var, momentum,
                                       num_batches_tracked)):
            return super().conv_bn_train_forward(
                x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                in_shift, act_in, bn_weight, eps, running_mean, running_var,
                num_batches_tracked, momentum, count)
        z = self._stats_conv(x, weight, bias, stride, padding, dilation, groups, in_center,
                             in_scale, in_shift, act_in)
        mean, var, scale = _ops().channel_stats_bn(z, bn_weight, running_mean, running_var,
                                                   num_batches_tracked, float(momentum),
                                                   float(eps))
        return z, mean, var, scale

    def bn_epilogue_backward(self, gy, saved, needs, var, bn_weight, eps, need_var,
                             need_weight):
        s = saved
        z, center, scale, shift = s["z"], s["center"], s["scale"], s["shift"]
        # The BatchNorm's scale gradient in the apply backward's finalize
        # (bn_epilogue_backward), where the pass reduces the centered sum it comes from.
        if (not needs["scale"] or scale is None or center is None
                or self.unsupported_reason(z, None, 1, (1, 1)) is not None
                or not runs_own(self, CudaBackend, "epilogue_backward", "bn_scale_backward")):
            return super().bn_epilogue_backward(gy, saved, needs, var, bn_weight, eps,
                                                need_var, need_weight)
        relu_mid, relu_out = _relu(s["act_mid"]), _relu(s["act_out"])
        n_center = bool(needs["center"])
        n_shift = needs["shift"] and shift is not None
        gz, gr, s1, gc, gv, gw = _ops().bn_epilogue_backward(
            gy.to(z.dtype), z, s["y"] if relu_out else None, center, scale, shift, relu_mid,
            float(s["res_scale"]), s["branch_scale"], relu_out, bool(needs["z"]),
            bool(needs["residual"]), n_center, var, bn_weight, float(eps), bool(need_var),
            bool(need_weight))
        grads = {"residual": gr.to(s["residual_dtype"]) if needs["residual"] else None,
                 "z": gz if needs["z"] else None}
        _affine_grads(grads, ("center", "scale", "shift"), center=center, scale=scale,
                      shift=shift, n_center=n_center, n_scale=False, n_shift=n_shift,
                      sum_gu=s1, sum_gu_centered=None, grad_center=gc)
        return (grads, gv if need_var else None,
                gw if need_weight and bn_weight is not None else None)

    # ---- channel_stats ------------------------------------------------------------------------
    def channel_stats_forward(self, x):
        mean, var = _ops().channel_stats(x)
        return mean, var

    def channel_stats_backward(self, gmean, gvar, x, mean):
        return _ops().stats_backward(None, gmean, gvar, x, mean)

    # ---- epilogue -----------------------------------------------------------------------------
    def epilogue_forward(self, z, center, scale, shift, act_mid, residual, res_scale,
                         branch_scale, act_out):
        return _ops().epilogue(z, center, scale, shift, _relu(act_mid), residual,
                               float(res_scale), branch_scale, _relu(act_out))

    def epilogue_backward(self, gy, saved, needs):
        s = saved
        z, center, scale, shift = s["z"], s["center"], s["scale"], s["shift"]
        relu_mid, relu_out = _relu(s["act_mid"]), _relu(s["act_out"])
        n_center = needs["center"] and center is not None
        n_scale = needs["scale"] and scale is not None
        n_shift = needs["shift"] and shift is not None
        sums = n_center or n_scale or n_shift
        gz, gr, s1, s2, gc = _ops().epilogue_backward(
            gy.to(z.dtype), z if (relu_mid or n_scale) else None, s["y"] if relu_out else None,
            center, scale, shift, relu_mid, float(s["res_scale"]), s["branch_scale"], relu_out,
            bool(needs["z"]), bool(needs["residual"]), sums, n_center)
        grads = {"residual": gr.to(s["residual_dtype"]) if needs["residual"] else None,
                 "z": gz if needs["z"] else None}
        _affine_grads(grads, ("center", "scale", "shift"), center=center, scale=scale,
                      shift=shift, n_center=n_center, n_scale=n_scale, n_shift=n_shift,
                      sum_gu=s1, sum_gu_centered=s2, grad_center=gc)
        return grads


def _affine_grads(grads, names, *, center, scale, shift, n_center, n_scale, n_shift, sum_gu,
                  sum_gu_centered, grad_center):
    """Gradients of (t - center) * scale + shift from Σ dL/du, Σ dL/du·(t - center) and the
    kernel's -scale·Σ dL/du."""
    k_center, k_scale, k_shift = names
    if n_center:
        grads[k_center] = grad_center.to(center.dtype)
    if n_scale:
        grads[k_scale] = sum_gu_centered.to(scale.dtype)
    if n_shift:
        grads[k_shift] = sum_gu.to(shift.dtype)
