"""A training conv unit whose BatchNorm normalizes with batch statistics, as one autograd node in
plain eager mode: the three ops it is otherwise made of (conv_bn_stats; bn_scale with the
running-statistics update; epilogue) run as the same backend calls in the same order, behind
one set of argument checks, one backend resolution and one autograd.Function instead of three
of each. Values, gradients and running statistics are those of the three ops, bit for bit
(tests/test_train_unit.py: the Triton kernels in the interpreter, the cuda backend's CPU
kernels). The Triton and cuda backends merge two pairs of those calls (their overrides of
ReferenceBackend.conv_bn_train_forward and bn_epilogue_backward), one launch fewer each, with
the same float32 expressions; on a GPU, where a compiler may contract them differently,
tests/test_triton_gpu.py and tests/test_cuda_merged_ops.py check them against the pairs.

Why: without CUDA graphs a training step is host-bound. On H100 run 7 the ResNet-50 train
step at batch 128 took 55.6 ms launched against 27.9 ms as a graph replay with the Triton
backend (31.0 against 25.7 with the cuda backend; eager 34.4), and every conv unit paid the
three ops' layers forward and three autograd nodes backward
(benchmarks/results/2026-11-27-h100-run7; `python benchmarks/host_overhead.py --mode train
--narrow 16` times this host path on any machine, FUSED_RES_TRAIN_UNIT on and off).

conv_bn_act returns None where the call is not one it covers; the caller then composes the
ops, which check, resolve, warn or raise as they always do:
- not plain eager (torch.compile, a trace, a dispatch or function mode, a tensor subclass, a
  torch.func transform, forward AD) or grad mode off;
- backend 'auto', a backend that does not declare `fused_train_unit` (whose choice for the
  statistics and epilogue could differ from its choice for the conv), or one that does not
  take this conv (it falls back);
- float64 inputs (the reference's), a BatchNorm without running statistics to update, or
  anything the ops would refuse or treat specially (vectors of another length or device, a
  count of 1, an unusual momentum or eps).
FUSED_RES_TRAIN_UNIT=0 (read at import; ENABLED at run time) turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._eager import plain_eager, transformed
from ..backends import current_backend, get_backend_object, resolve
from . import functional, library

ENABLED = os.environ.get("FUSED_RES_TRAIN_UNIT", "1") != "0"

_STATS_NEEDS = ("x", "weight", "bias", "in_center", "in_scale", "in_shift")


def _bn_ok(c: int, device, bn_weight, bn_bias, running_mean, running_var,
           num_batches_tracked, momentum, eps, count) -> bool:
    """Whether the BatchNorm's tensors and settings are ones ops.bn_scale takes without a
    question (else the ops run, and raise or warn as they do)."""
    for v in (bn_weight, bn_bias, running_mean, running_var):
        if v is not None and (v.dim() != 1 or v.shape[0] != c or v.device != device
                              or not v.is_floating_point() or (c > 1 and v.stride(0) == 0)):
            return False
    nbt = num_batches_tracked
    if nbt is not None and (nbt.dim() != 0 or nbt.dtype != torch.long or nbt.device != device):
        return False
    return (count != 1 and type(eps) in (float, int) and eps > 0
            and (momentum is None or type(momentum) in (float, int)))


def conv_bn_act(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride, padding, dilation,
                groups: int, in_center: Tensor | None = None, in_scale: Tensor | None = None,
                in_shift: Tensor | None = None, act_in: str = "none",
                bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor,
                running_var: Tensor, num_batches_tracked: Tensor | None,
                momentum: float | None, eps: float, act_mid: str = "none",
                residual: Tensor | None = None, res_scale: float = 1.0,
                branch_scale: Tensor | None = None, act_out: str = "none",
                backend: str | None = None) -> Tensor | None:
    """y = act_out(branch_scale * act_mid(bn(z)) + res_scale * residual) for z =
    conv2d(act_in((x - in_center) * in_scale + in_shift), weight, bias), bn a train-mode
    BatchNorm (weight bn_weight, bias bn_bias, eps) normalizing z with its batch statistics
    and updating running_mean, running_var and num_batches_tracked in place exactly as
    nn.BatchNorm2d does; or None where the call is not one this covers (see the module
    docstring: the caller then runs ops.conv_bn_stats, ops.bn_scale and ops.epilogue).

    x (N, C_in, H, W) float32/float16/bfloat16 (or autocast's), weight (C_out, C_in, KH, KW);
    the BatchNorm's vectors (C_out,); residual (N, C_out, OH, OW); branch_scale (N,), which
    takes no gradient. Returns y (N, C_out, OH, OW) in x's dtype and memory format,
    differentiable in x, weight, bias, the prologue's vectors, bn_weight, bn_bias and
    residual."""
    if not ENABLED or not torch.is_grad_enabled() or running_mean is None or running_var is None:
        return None
    name = backend if backend is not None else current_backend()
    if (name == "auto" or not getattr(get_backend_object(name), "fused_train_unit", False)
            or transformed()
            or not plain_eager((x, weight, bias, in_center, in_scale, in_shift, bn_weight,
                                bn_bias, running_mean, running_var, num_batches_tracked,
                                residual, branch_scale))):
        return None
    x, weight, bias, stride, padding, dilation = functional._prepare_conv(
        x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
        act_in)
    if x.dtype == torch.float64 or resolve(name, x, weight, groups, tuple(dilation)) != name:
        return None
    c_out = weight.shape[0]
    oh, ow = library.conv_out_hw(x, weight, stride, padding, dilation)
    count = x.shape[0] * oh * ow
    if not _bn_ok(c_out, x.device, bn_weight, bn_bias, running_mean, running_var,
                  num_batches_tracked, momentum, eps, count):
        return None
    residual, res_scale = functional._prepare_tail(
        (x.shape[0], c_out, oh, ow), x.shape[0], x.device, x.dtype, residual, res_scale,
        branch_scale, act_mid, act_out)
    # BatchNorm's bias as the epilogue's float32 shift (a cast autograd sees, as the ops'
    # path makes it: batchnorm.batch_affine).
    shift = bn_bias if bn_bias is None or bn_bias.dtype == torch.float32 else \
        bn_bias.to(torch.float32)
    meta = (name, stride, padding, dilation, groups, act_in, act_mid, res_scale, act_out,
            float(eps), (running_mean, running_var, num_batches_tracked),
            None if momentum is None else float(momentum), count,
            residual.dtype if residual is not None else None)
    return _TrainUnit.apply(x, weight, bias, in_center, in_scale, in_shift, bn_weight, shift,
                            residual, branch_scale, meta)


class _TrainUnit(torch.autograd.Function):
    """The three ops' implementations forward, their three backwards in reverse order
    backward; what each saves, saved once (no more than the three ops keep)."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_center, in_scale, in_shift, bn_weight, shift, residual,
                branch_scale, meta):
        (name, stride, padding, dilation, groups, act_in, act_mid, res_scale, act_out, eps,
         buffers, momentum, count, _) = meta
        be = get_backend_object(name)
        z, mean, var, scale = be.conv_bn_train_forward(
            x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
            act_in, bn_weight, eps, *buffers, momentum, count)
        library._bump(*buffers)
        y = be.epilogue_forward(z, mean, scale, shift, act_mid, residual, res_scale,
                                branch_scale, act_out)
        ctx.save_for_backward(x, weight, bias, in_center, in_scale, in_shift, z, mean, var,
                              bn_weight, scale, shift, branch_scale,
                              y if act_out == "relu" else None)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, gy):
        (x, weight, bias, in_center, in_scale, in_shift, z, mean, var, bn_weight, scale, shift,
         branch_scale, y) = ctx.saved_tensors
        (name, stride, padding, dilation, groups, act_in, act_mid, res_scale, act_out, eps,
         _, _, _, residual_dtype) = ctx.meta
        needs = ctx.needs_input_grad
        conv_needs = any(needs[:6])  # z, the mean and the variance then need gradients
        need_bn_w, need_shift, need_res = needs[6], needs[7], needs[8]
        need_scale = conv_needs or need_bn_w
        if torch.is_grad_enabled():
            # create_graph=True: z, the statistics and the scale were made inside this node,
            # out of autograd's sight, so the three ops' backwards would miss their second-
            # order terms; the reference's forward, recomputed from the saved inputs, has them.
            library._backward_backend(name)  # (the ops' one warning that the reference runs)
            return _differentiable_backward(ctx, gy)
        be = get_backend_object(name)
        # epilogue: y from (z, center = mean, scale, shift, residual); bn_scale: scale from
        # (var, bn_weight)
        g, g_var, g_bn_w = be.bn_epilogue_backward(
            gy, {"z": z, "center": mean, "scale": scale, "shift": shift,
                 "branch_scale": branch_scale, "y": y, "act_mid": act_mid,
                 "res_scale": res_scale, "act_out": act_out, "backend": name,
                 "residual_dtype": residual_dtype},
            {"z": conv_needs, "center": conv_needs, "scale": need_scale, "shift": need_shift,
             "residual": need_res, "branch_scale": False, "act_mid": False, "res_scale": False,
             "act_out": False, "backend": False},
            var, bn_weight, eps, conv_needs, need_bn_w)
        grads = {}
        if conv_needs:  # conv_bn_stats: (z, mean, var) from x and the conv's tensors
            saved = {"x": x, "weight": weight, "bias": bias, "in_center": in_center,
                     "in_scale": in_scale, "in_shift": in_shift, "z": z, "mean": mean,
                     "stride": stride, "padding": padding, "dilation": dilation,
                     "groups": groups, "act_in": act_in, "backend": name}
            grads = be.conv_bn_stats_backward(
                g.get("z"), g.get("center"), g_var, saved,
                {k: bool(n) for k, n in zip(_STATS_NEEDS, needs[:6], strict=True)}
                | {"stride": False, "padding": False, "dilation": False, "groups": False,
                   "act_in": False, "backend": False})
        return (*(grads.get(k) if n else None for k, n in zip(_STATS_NEEDS, needs[:6],
                                                                strict=True)),
                g_bn_w if need_bn_w else None, g.get("shift") if need_shift else None,
                g.get("residual") if need_res else None, None, None)


def _differentiable_backward(ctx, gy):
    """_TrainUnit.backward under create_graph=True: the reference's composite forward (the
    running statistics left alone) recomputed from the saved inputs and differentiated, with
    a graph. The residual enters y linearly, behind act_out's mask (read from the saved y, as
    relu's own backward reads its output), so its value is not needed."""
    (x, weight, bias, in_center, in_scale, in_shift, _, _, _, bn_weight, _, shift,
     branch_scale, y) = ctx.saved_tensors
    (_, stride, padding, dilation, groups, act_in, act_mid, res_scale, act_out, eps,
     _, _, _, residual_dtype) = ctx.meta
    needs = ctx.needs_input_grad
    ref = get_backend_object("reference")
    z, mean, var = ref.conv_bn_stats_forward(x, weight, bias, stride, padding, dilation, groups,
                                             in_center, in_scale, in_shift, act_in)
    scale = ref.bn_scale_forward(var, bn_weight, eps)
    u = ref.epilogue_forward(z, mean, scale, shift, act_mid, None, 1.0, branch_scale, "none")
    gv = torch.where(y > 0, gy, 0) if act_out == "relu" else gy
    inputs = (x, weight, bias, in_center, in_scale, in_shift, bn_weight, shift)
    wanted = [t for t, n in zip(inputs, needs[:8], strict=True) if n]
    got = iter(torch.autograd.grad(u, wanted, gv.to(u.dtype), create_graph=True,
                                   allow_unused=True) if wanted else ())
    grads = [next(got) if n else None for n in needs[:8]]
    g_res = (gv * res_scale).to(residual_dtype) if needs[8] else None
    return (*grads, g_res, None, None)
