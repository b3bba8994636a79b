"""The public functional API of the conv unit: argument checks, autocast, backend choice.

Every function here validates its arguments (clear ValueError/TypeError naming the argument,
its value and what is accepted), casts to the autocast dtype the way the unfused modules
would, resolves the backend and calls the op in fused_res.ops.library (its custom op, or in plain
eager mode the op's eager twin: same implementation and autograd, without the dispatcher).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends import auto, current_backend, get_backend_object, resolve
from ..backends import prepare as prepare_backend  # noqa: F401  (re-exported by ops)
from . import library

ACTS = ("none", "relu")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(name: str, value, minimum: int) -> list[int]:
    if type(value) in (list, tuple) and len(value) == 2:  # the modules' own (one per call)
        a, b = value
        if type(a) is int and type(b) is int and a >= minimum and b >= minimum:
            return [a, b]
    vals = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    ok = (isinstance(vals, Sequence) and len(vals) == 2 and
          all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in vals))
    if not ok:
        raise ValueError(f"{name}={value!r}; accepted: an int >= {minimum} or a pair of them")
    return [int(v) for v in vals]


def _check_act(name: str, act: str) -> str:
    if act not in ACTS:
        raise ValueError(f"{name}={act!r}; accepted: {', '.join(map(repr, ACTS))}")
    return act


def _check_feature_map(name: str, t, what: str = "(N, C, H, W)") -> Tensor:
    if not isinstance(t, Tensor):
        if isinstance(t, torch.fx.Proxy):
            raise TypeError(f"{name} is a torch.fx Proxy: torch.fx symbolic tracing (as "
                            "torchvision's create_feature_extractor does) cannot trace the "
                            "fused ops' argument checks; accepted: torch.export or "
                            "torch.compile of the fused model, or symbolic tracing of "
                            "fused_res.revert(model)")
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: a 4-D tensor {what}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: float32, float16, bfloat16, "
                        "float64")
    return t


def _check_same_device(x: Tensor, x_name: str = "x", **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; "
                             "accepted: all tensors on one device")


def _check_vector(name: str, v, length: int, what: str) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(v).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {v.dtype}; accepted: a floating-point tensor")
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} has shape {tuple(v.shape)}; accepted: ({length},), one value "
                         f"per {what}")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if device_type not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """Cast like autocast does: only float32 tensors (float64 stays as it is)."""
    if t is None or dtype is None or t.dtype != torch.float32:
        return t
    return t.to(dtype)


def _choose(op: str, backend: str | None, x: Tensor, weight: Tensor | None, groups: int,
            dilation, tensors: dict, settings: tuple, run) -> str:
    """The concrete backend for this call. 'auto' uses the winner recorded for this call's
    signature by fused_res.autotune() (measuring it now when tuning), else the reference."""
    name = backend if backend is not None else current_backend()
    if name != "auto":
        return resolve(name, x, weight, groups, tuple(dilation))
    key = auto.signature(op, tensors, settings)
    auto.record_use(key)
    if auto.tuning() and key not in auto.cached():
        candidates = auto.candidates_for(x, weight, groups, tuple(dilation))
        if candidates != ["reference"]:
            return auto.tune_call(key, x, candidates, run)
    return resolve(auto.lookup(key), x, weight, groups, tuple(dilation))


def _prepare_conv(x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                  in_shift, act_in, names=("x", "weight", "stride", "padding")):
    xn, wn, sn, pn = names  # what the caller calls them, for the messages
    _check_feature_map(xn, x)
    _check_feature_map(wn, weight, "(C_out, C_in / groups, KH, KW)")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups={groups!r}; accepted: a positive int")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in == 0 or c_out == 0:
        raise ValueError(f"{xn} has {c_in} channels and {wn} {c_out} output channels; "
                         "accepted: at least 1 of each")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"{xn} has {c_in} channels but {wn} has shape "
                         f"{tuple(weight.shape)} with groups={groups}; accepted: "
                         f"{wn}.shape[1] * groups == {xn}.shape[1]")
    if c_out % groups:
        raise ValueError(f"{wn} has {c_out} output channels, not divisible by "
                         f"groups={groups}")
    if 0 in weight.shape[2:]:
        raise ValueError(f"{wn} has shape {tuple(weight.shape)}; accepted: a kernel of at least "
                         "1x1")
    if 0 in x.shape[2:]:
        # (aten refuses it too; the Triton kernel returned the bias over the padded grid)
        raise ValueError(f"{xn} has shape {tuple(x.shape)}; accepted: H >= 1 and W >= 1")
    stride, padding = _pair(sn, stride, 1), _pair(pn, padding, 0)
    dilation = _pair("dilation", dilation, 1)
    _check_act("act_in", act_in)
    _check_vector("bias", bias, c_out, "output channel")
    _check_vector("in_center", in_center, c_in, "input channel")
    _check_vector("in_scale", in_scale, c_in, "input channel")
    _check_vector("in_shift", in_shift, c_in, "input channel")
    _check_same_device(x, **{wn: weight}, bias=bias, in_center=in_center, in_scale=in_scale,
                       in_shift=in_shift, x_name=xn)
    for i, k in enumerate(("H", "W")):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise ValueError(f"{xn} has {k}={x.shape[2 + i]}, smaller than the kernel span "
                             f"{span} with {pn}={padding[i]}; accepted: {k} + 2*{pn} >= span")
    dt = _autocast_dtype(x)
    x, weight, bias = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
    if weight.dtype != x.dtype:
        raise TypeError(f"{wn} has dtype {weight.dtype} but {xn} has {x.dtype}; accepted: "
                        "the same dtype (or run under torch.autocast)")
    if bias is not None:
        bias = bias.to(x.dtype)
    return x, weight, bias, stride, padding, dilation


def _prepare_tail(out_shape, n, device, dtype, residual, res_scale, branch_scale, act_mid,
                  act_out, x_name: str = "x"):
    _check_act("act_mid", act_mid)
    _check_act("act_out", act_out)
    if isinstance(res_scale, bool) or not isinstance(res_scale, (int, float)):
        raise TypeError(f"res_scale={res_scale!r}; accepted: a Python float (λ)")
    if residual is not None:
        _check_feature_map("residual", residual)
        if tuple(residual.shape) != tuple(out_shape):
            raise ValueError(f"residual has shape {tuple(residual.shape)}; accepted: the "
                             f"output shape {tuple(out_shape)}")
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device} but {x_name} is on {device}; "
                             "accepted: all tensors on one device")
        if residual.dtype != dtype:
            residual = residual.to(dtype)
    if branch_scale is not None:
        _check_vector("branch_scale", branch_scale, n, "sample")
        if branch_scale.device != device:
            raise ValueError(f"branch_scale is on {branch_scale.device} but {x_name} is on "
                             f"{device}; accepted: all tensors on one device")
        if branch_scale.requires_grad and torch.is_grad_enabled():
            # The ops give it no gradient: a silent None would freeze what the caller trains.
            raise ValueError("branch_scale requires grad; accepted: a tensor that needs no "
                             "gradient (a per-sample drop-path mask; .detach() it)")
    return residual, float(res_scale)


def conv_unit(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1, padding=0,
              dilation=1, groups: int = 1, in_center: Tensor | None = None,
              in_scale: Tensor | None = None, in_shift: Tensor | None = None,
              act_in: str = "none", out_scale: Tensor | None = None,
              out_shift: Tensor | None = None,
              act_mid: str = "none", residual: Tensor | None = None, res_scale: float = 1.0,
              branch_scale: Tensor | None = None, act_out: str = "none",
              backend: str | None = None) -> Tensor:
    """The whole conv unit in one op (DESIGN.md §2):

        p = act_in((x - in_center) * in_scale + in_shift)     per input channel (C_in,)
        u = conv2d(p, weight, bias) * out_scale + out_shift   per output channel (C_out,)
        y = act_out(branch_scale * act_mid(u) + res_scale * residual)

    x (N, C_in, H, W) float32/float16/bfloat16/float64, NCHW or channels_last; weight
    (C_out, C_in/groups, KH, KW) of x's dtype; residual (N, C_out, OH, OW); branch_scale (N,).
    Returns y (N, C_out, OH, OW) in x's dtype and memory format. Differentiable in every
    tensor argument but branch_scale.
    """
    args = conv_unit_args(x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out)
    return run_conv_unit(args, backend)


def conv_unit_args(x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                   in_shift, act_in, out_scale, out_shift, act_mid, residual, res_scale,
                   branch_scale, act_out) -> tuple:
    """conv_unit's arguments checked and cast (autocast), in the op's order (backend aside).
    """
    x, weight, bias, stride, padding, dilation = _prepare_conv(
        x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
        act_in)
    c_out = weight.shape[0]
    _check_vector("out_scale", out_scale, c_out, "output channel")
    _check_vector("out_shift", out_shift, c_out, "output channel")
    _check_same_device(x, out_scale=out_scale, out_shift=out_shift)
    oh, ow = library.conv_out_hw(x, weight, stride, padding, dilation)
    residual, res_scale = _prepare_tail((x.shape[0], c_out, oh, ow), x.shape[0], x.device,
                                        x.dtype, residual, res_scale, branch_scale, act_mid,
                                        act_out)
    return (x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
            act_in, out_scale, out_shift, act_mid, residual, res_scale, branch_scale, act_out)


def run_conv_unit(args: tuple, backend: str | None) -> Tensor:
    """The conv_unit op on conv_unit_args' output, on the backend chosen for it."""
    def run(name):
        return library.call("conv_unit", *args, name)

    (x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift, act_in,
     out_scale, out_shift, act_mid, residual, res_scale, branch_scale, act_out) = args
    tensors = {"x": x, "weight": weight, "bias": bias, "in_center": in_center,
               "in_scale": in_scale, "in_shift": in_shift, "out_scale": out_scale,
               "out_shift": out_shift, "residual": residual, "branch_scale": branch_scale}
    settings = (stride, padding, dilation, groups, act_in, act_mid, res_scale, act_out)
    name = _choose("conv_unit", backend, x, weight, groups, dilation, tensors, settings, run)
    return run(name)[0]


def conv_bn_stats(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1,
                  padding=0, dilation=1, groups: int = 1, in_center: Tensor | None = None,
                  in_scale: Tensor | None = None, in_shift: Tensor | None = None,
                  act_in: str = "none",
                  backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """z = conv2d(act_in((x - in_center) * in_scale + in_shift), weight, bias) and the batch
    statistics of z:
    returns (z, mean, var) with z (N, C_out, OH, OW) in x's dtype and memory format, mean and
    biased var (C_out,) in float32 (float64 for float64 input; zeros for an empty batch).
    Gradients flow through all three outputs, so BatchNorm's backward follows by autograd."""
    x, weight, bias, stride, padding, dilation = _prepare_conv(
        x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
        act_in)
    def run(name):
        return library.call("conv_bn_stats", x, weight, bias, stride, padding, dilation,
                            groups, in_center, in_scale, in_shift, act_in, name)

    tensors = {"x": x, "weight": weight, "bias": bias, "in_center": in_center,
               "in_scale": in_scale, "in_shift": in_shift}
    settings = (stride, padding, dilation, groups, act_in)
    return run(_choose("conv_bn_stats", backend, x, weight, groups, dilation, tensors,
                       settings, run))


def fuses_train_prologue(backend: str | None = None) -> bool:
    """Whether a training BatchNorm (batch statistics) + ReLU should wait for the next conv's
    prologue (True) or be applied in its own epilogue pass first (False), as backend
    `backend` (None: the one in force) prefers on this thread (Backend.fuses_train_prologue;
    its fuse_train_prologue says why it may not). 'auto' chooses a backend per op call; it
    applies the BN apart, as every backend it would choose for speed does by default (the
    reference, its fallback, computes the same values either way)."""
    name = backend if backend is not None else current_backend()
    if name == "auto":
        return False
    return get_backend_object(name).fuses_train_prologue()


def fuses_shortcut_conv(backend: str | None = None) -> bool:
    """Whether backend `backend` (None: the one in force) runs a block's last conv and its 1x1
    projection shortcut as one op in inference (conv_shortcut_pair; Backend.
    fuses_shortcut_conv). 'auto' does not: it measures the ops a block runs otherwise."""
    name = backend if backend is not None else current_backend()
    return name != "auto" and get_backend_object(name).fuses_shortcut_conv()


def conv_shortcut_pair(x: Tensor, weight: Tensor, bias: Tensor | None, x2: Tensor,
                       weight2: Tensor, bias2: Tensor | None, *, stride=1, padding=0,
                       stride2=1, act_out: str = "none", backend: str | None = None) -> Tensor:
    """y = act_out(conv2d(x, weight, stride, padding) + bias + conv2d(x2, weight2, stride2)
    + bias2): a block's last conv and its 1x1 projection shortcut, BatchNorms folded into
    (weight, bias) and (weight2, bias2), in one op where the backend has one kernel for it.

    x (N, C_in, H, W), weight (C_out, C_in, KH, KW), x2 (N, C2, H2, W2), weight2 (C_out, C2,
    1, 1), one float dtype (or autocast's); bias, bias2 (C_out,) any float dtype or None; the
    shortcut's output grid must be the conv's. Returns (N, C_out, OH, OW) in x's dtype and
    memory format. Inference only (no autograd, no torch.compile): the blocks call it under
    no_grad, and use two conv_unit calls otherwise."""
    args = conv_shortcut_pair_args(x, weight, bias, x2, weight2, bias2, stride, padding,
                                   stride2, act_out)
    name = resolve(backend, args[0], args[1])
    return get_backend_object(name).conv_pair_forward(*args)


def conv_shortcut_pair_args(x, weight, bias, x2, weight2, bias2, stride, padding, stride2,
                            act_out) -> tuple:
    """conv_shortcut_pair's arguments checked and cast (autocast), in the order of
    Backend.conv_pair_forward."""
    if torch.compiler.is_compiling():
        raise RuntimeError("conv_shortcut_pair runs eagerly only; under torch.compile use "
                           "conv_unit for the shortcut and pass it as the residual")
    x, weight, _, stride, padding, _ = _prepare_conv(x, weight, None, stride, padding, 1, 1,
                                                     None, None, None, "none")
    _check_feature_map("weight2", weight2, "(C_out, C2, 1, 1)")
    if tuple(weight2.shape[2:]) != (1, 1):
        raise ValueError(f"weight2 has shape {tuple(weight2.shape)}; accepted: a 1x1 "
                         "projection (C_out, C2, 1, 1)")
    # (A 1x1 kernel with no padding fits any input: the span check cannot name padding2.)
    x2, weight2, _, stride2, padding2, _ = _prepare_conv(
        x2, weight2, None, stride2, 0, 1, 1, None, None, None, "none",
        names=("x2", "weight2", "stride2", "padding2"))
    _check_act("act_out", act_out)
    c_out = weight.shape[0]
    if weight2.shape[0] != c_out:
        raise ValueError(f"weight2 has {weight2.shape[0]} output channels, weight {c_out}; "
                         "accepted: the same")
    _check_vector("bias", bias, c_out, "output channel")
    _check_vector("bias2", bias2, c_out, "output channel")
    _check_same_device(x, x2=x2, weight2=weight2, bias=bias, bias2=bias2)
    if x2.dtype != x.dtype:
        raise TypeError(f"x2 has dtype {x2.dtype} but x has {x.dtype}; accepted: the same "
                        "dtype (or run under torch.autocast)")
    out = (x.shape[0], c_out, *library.conv_out_hw(x, weight, stride, padding, [1, 1]))
    out2 = (x2.shape[0], c_out, *library.conv_out_hw(x2, weight2, stride2, padding2, [1, 1]))
    if out2 != out:
        raise ValueError(f"the shortcut conv of x2 {tuple(x2.shape)} with stride {stride2} "
                         f"gives {out2}, the conv {out}; accepted: the same output shape")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                       (x, weight, bias, x2, weight2, bias2)):
        raise RuntimeError("conv_shortcut_pair has no backward; accepted: inputs that need no "
                           "gradient, or torch.no_grad() / torch.inference_mode()")
    return x, weight, bias, stride, padding, x2, weight2, bias2, stride2, act_out


def channel_stats(x: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W) over (N, H, W), float32
    (float64 for float64 input); zeros for an empty batch. Differentiable."""
    _check_feature_map("x", x)
    dt = _autocast_dtype(x)
    x = _cast(x, dt)
    def run(name):
        return library.call("channel_stats", x, name)

    return run(_choose("channel_stats", backend, x, None, 1, (1, 1), {"x": x}, (), run))


def epilogue(z: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, *,
             center: Tensor | None = None, act_mid: str = "none",
             residual: Tensor | None = None, res_scale: float = 1.0,
             branch_scale: Tensor | None = None, act_out: str = "none",
             backend: str | None = None) -> Tensor:
    """y = act_out(branch_scale * act_mid((z - center) * scale + shift) + res_scale * residual):
    the
    apply step of a unit (BatchNorm affine, activation, residual add, activation) in one pass.
    z (N, C, H, W); scale, shift (C,); residual like z; branch_scale (N,), which takes no
    gradient. Returns y like z."""
    _check_feature_map("z", z)
    c = z.shape[1]
    _check_vector("center", center, c, "channel")
    _check_vector("scale", scale, c, "channel")
    _check_vector("shift", shift, c, "channel")
    _check_same_device(z, "z", center=center, scale=scale, shift=shift)
    dt = _autocast_dtype(z)
    z = _cast(z, dt)
    residual, res_scale = _prepare_tail(z.shape, z.shape[0], z.device, z.dtype, residual,
                                        res_scale, branch_scale, act_mid, act_out, "z")
    def run(name):
        return library.call("epilogue", z, center, scale, shift, act_mid, residual,
                            res_scale, branch_scale, act_out, name)

    tensors = {"z": z, "center": center, "scale": scale, "shift": shift, "residual": residual,
               "branch_scale": branch_scale}
    settings = (act_mid, res_scale, act_out)
    return run(_choose("epilogue", backend, z, None, 1, (1, 1), tensors, settings, run))


def bn_scale(mean: Tensor, var: Tensor, weight: Tensor | None = None, *,
             running_mean: Tensor | None = None, running_var: Tensor | None = None,
             num_batches_tracked: Tensor | None = None, momentum: float | None = 0.1,
             eps: float = 1e-5, count: int, backend: str | None = None) -> Tensor:
    """A train-mode BatchNorm's per-channel scale from batch statistics, and its running-
    statistics update, in one op:

        scale = weight * rsqrt(var + eps)                              (C,), var's dtype
        running_mean, running_var, num_batches_tracked updated in place exactly as
        nn.BatchNorm2d does in training (when running_mean and running_var are given)

    mean, var (C,) float32/float64: the batch mean and biased variance of `count` values per
    channel; weight (C,) or None; momentum None without num_batches_tracked leaves the
    statistics as they are, as nn.BatchNorm2d does. Differentiable in var and weight (the
    normalized value is (z - mean) * scale + bias, with mean passed on as the center). Under
    'auto' the update is measured on copies of the running statistics, so that tuning updates
    them once.
    """
    for name, v in (("mean", mean), ("var", var)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(v).__name__}")
        if v.dim() != 1 or v.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} has shape {tuple(v.shape)} and dtype {v.dtype}; accepted: "
                             "a float32 or float64 vector (C,)")
    c = mean.shape[0]
    if var.shape != mean.shape or var.dtype != mean.dtype:
        raise ValueError(f"var has shape {tuple(var.shape)} and dtype {var.dtype}; accepted: "
                         f"mean's ({c},) and {mean.dtype}")
    _check_vector("weight", weight, c, "channel")
    _check_vector("running_mean", running_mean, c, "channel")
    _check_vector("running_var", running_var, c, "channel")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if buf is not None and c > 1 and buf.stride(0) == 0:
            raise ValueError(f"{name} is an expanded view (stride 0); accepted: a tensor the "
                             "update can write in place, one element per channel")
    if num_batches_tracked is not None and not (
            isinstance(num_batches_tracked, Tensor) and num_batches_tracked.dim() == 0
            and num_batches_tracked.dtype == torch.long):
        got = (f"shape {tuple(num_batches_tracked.shape)} and dtype {num_batches_tracked.dtype}"
               if isinstance(num_batches_tracked, Tensor) else type(num_batches_tracked).__name__)
        raise TypeError(f"num_batches_tracked is {got}; accepted: a 0-dim int64 tensor (as "
                        "nn.BatchNorm2d's), or None")
    _check_same_device(mean, "mean", var=var, weight=weight, running_mean=running_mean,
                       running_var=running_var, num_batches_tracked=num_batches_tracked)
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)) or count < 0:
        raise ValueError(f"count={count!r}; accepted: an int >= 0 (values per channel)")
    if running_mean is not None and count == 1:
        raise ValueError(f"count=1: expected more than 1 value per channel when training "
                         f"(BatchNorm of {c} channels)")
    if momentum is not None and (isinstance(momentum, bool)
                                 or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum={momentum!r}; accepted: a float or None (cumulative average)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:  # NaN
        # (nn.BatchNorm2d refuses it too: a channel of equal values would divide by zero)
        raise ValueError(f"eps={eps!r}; accepted: a float > 0 (a BatchNorm normalizing with "
                         "batch statistics)")
    momentum = None if momentum is None else float(momentum)

    def run(name):
        return library.call("bn_scale", var, weight, float(eps), name)

    if running_mean is None:
        return run(_choose("bn_scale", backend, var, None, 1, (1, 1),
                           {"var": var, "weight": weight}, (), run))
    batch = (mean.detach(), var.detach())

    def update(name, buffers=(running_mean, running_var, num_batches_tracked)):
        library.call("bn_update_running", *batch, *buffers, momentum, count, name)
        return buffers[0]

    def probe(name):  # what 'auto' measures: the update of copies
        return update(name, tuple(None if b is None else b.clone() for b in
                                  (running_mean, running_var, num_batches_tracked)))

    updater = _choose("bn_update_running", backend, var, None, 1, (1, 1),
                      {"running_mean": running_mean, "num_batches_tracked":
                       num_batches_tracked}, (momentum is None,), probe)
    name = _choose("bn_scale", backend, var, None, 1, (1, 1), {"var": var, "weight": weight},
                   (), run)
    if updater == name and library.runs_eagerly(var, weight, batch[0], running_mean,
                                                running_var, num_batches_tracked):
        # One backend for both: one call, and one launch where it has a kernel for both.
        return library.bn_scale_and_update(var, weight, float(eps), name, batch[0],
                                           running_mean, running_var, num_batches_tracked,
                                           momentum, count)
    update(updater)
    return run(name)
