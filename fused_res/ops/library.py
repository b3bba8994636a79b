"""The conv-unit ops as torch.library custom ops: schema, fake (meta) and autograd, in one place.

    fused_res::conv_unit      y = act_out(d * act_mid(conv(act_in((x-c_in)*a_in+b_in)) * a_out
                                                  + b_out) + λ * r)   (eval: BN folded; one pass)
    fused_res::conv_bn_stats  z = conv(act_in((x-c_in)*a_in+b_in)), mean and biased var of z
    fused_res::channel_stats  mean and biased var of x per channel
    fused_res::epilogue       y = act_out(d * act_mid((z-c)*a+b) + λ * r)
    fused_res::bn_scale       a = weight * rsqrt(var + eps) (a train-mode BatchNorm's scale)
    fused_res::bn_update_running  nn.BatchNorm2d's running-statistics update, in place

A BatchNorm in training passes its batch mean as the center c (rather than folding it into
b): the gradient of a is then Σ g·(z - c), which does not cancel when |mean| >> std.

Each op takes the name of a concrete backend and runs that backend's implementation; the
backward, written here once, calls the same backend's backward. Callers go through
fused_res.ops.functional, which validates arguments and resolves the backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._eager import plain_eager, transformed
from ..backends import get_backend_object
from ..backends.reference import acc_dtype, memory_format_of, needs_pre_act
from ..backends.registry import warn_once

Vec = Tensor | None


def conv_out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    """Output (H, W) of a conv of x with weight."""
    return tuple(
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
        // stride[i] + 1 for i in range(2))


def _conv_out_like(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    h, w = conv_out_hw(x, weight, stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _vec(x: Tensor, c: int) -> Tensor:
    return torch.empty((c,), dtype=acc_dtype(x.dtype), device=x.device)


def _backward_backend(name: str):
    """The backend whose backward runs. A backward taken with create_graph=True (grad mode on
    inside it) must itself be differentiable: the fast backends' backward kernels have no
    derivative of their own, so that backward is the reference's composite of aten ops, which
    computes the same gradients and differentiates them correctly."""
    if name != "reference" and torch.is_grad_enabled():
        warn_once(f"a backward with create_graph=True (double backward) through backend "
                  f"{name!r}, whose backward kernels have no derivative")
        name = "reference"
    return get_backend_object(name)


# ---- conv_unit --------------------------------------------------------------------------

def _conv_unit_impl(x: Tensor, weight: Tensor, bias: Vec, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, in_center: Vec, in_scale: Vec, in_shift: Vec,
                    act_in: str, out_scale: Vec, out_shift: Vec, act_mid: str, residual: Vec,
                    res_scale: float, branch_scale: Vec, act_out: str,
                    backend: str) -> tuple[Tensor, Tensor]:
    """Returns (y, u); u (the conv output before act_mid) is empty unless the backward needs it
    (needs_pre_act)."""
    y, u = get_backend_object(backend).conv_unit_forward(
        x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
        act_in, out_scale, out_shift, act_mid, residual, res_scale, branch_scale, act_out)
    if not needs_pre_act(act_mid, residual, branch_scale, act_out):
        return y, x.new_empty((0,))
    return y, u.contiguous(memory_format=memory_format_of(x))


conv_unit = torch.library.custom_op("fused_res::conv_unit", _conv_unit_impl, mutates_args=())


@conv_unit.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift, act_in,
      out_scale, out_shift, act_mid, residual, res_scale, branch_scale, act_out, backend):
    y = _conv_out_like(x, weight, stride, padding, dilation)
    u = (torch.empty_like(y) if needs_pre_act(act_mid, residual, branch_scale, act_out)
         else x.new_empty((0,)))
    return y, u


_UNIT_ARGS = ("x", "weight", "bias", "stride", "padding", "dilation", "groups", "in_center",
              "in_scale", "in_shift", "act_in", "out_scale", "out_shift", "act_mid", "residual",
              "res_scale", "branch_scale", "act_out", "backend")
_UNIT_TENSORS = ("x", "weight", "bias", "in_center", "in_scale", "in_shift", "out_scale",
                 "out_shift", "branch_scale")


def _unit_setup(ctx, inputs, output):
    args = dict(zip(_UNIT_ARGS, inputs, strict=True))
    y, u = output
    relu_mid = args["act_mid"] == "relu"
    if relu_mid and not needs_pre_act(args["act_mid"], args["residual"], args["branch_scale"],
                                      args["act_out"]):
        u = y  # y = relu(u): the backward reads only the sign of u
    ctx.save_for_backward(*(args[k] for k in _UNIT_TENSORS), u if relu_mid else None,
                          y if args["act_out"] == "relu" else None)
    ctx.meta = {k: args[k] for k in ("stride", "padding", "dilation", "groups", "act_in",
                                     "act_mid", "res_scale", "act_out", "backend")}
    r = args["residual"]
    ctx.meta["residual_dtype"] = r.dtype if r is not None else None


def _unit_backward(ctx, gy, _gu):
    saved = dict(zip(_UNIT_TENSORS + ("u", "y"), ctx.saved_tensors, strict=True))
    saved.update(ctx.meta)
    needs = dict(zip(_UNIT_ARGS, ctx.needs_input_grad, strict=True))
    grads = _backward_backend(ctx.meta["backend"]).conv_unit_backward(gy, saved, needs)
    return tuple(grads.get(k) if needs[k] else None for k in _UNIT_ARGS)


conv_unit.register_autograd(_unit_backward, setup_context=_unit_setup)


# ---- conv_bn_stats ----------------------------------------------------------------------

def _conv_bn_stats_impl(x: Tensor, weight: Tensor, bias: Vec, stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, in_center: Vec, in_scale: Vec,
                        in_shift: Vec, act_in: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    z, mean, var = get_backend_object(backend).conv_bn_stats_forward(
        x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift,
        act_in)
    return z, mean, var


conv_bn_stats = torch.library.custom_op("fused_res::conv_bn_stats", _conv_bn_stats_impl,
                                        mutates_args=())


@conv_bn_stats.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, in_center, in_scale, in_shift, act_in,
      backend):
    z = _conv_out_like(x, weight, stride, padding, dilation)
    return z, _vec(x, weight.shape[0]), _vec(x, weight.shape[0])


_STATS_ARGS = ("x", "weight", "bias", "stride", "padding", "dilation", "groups", "in_center",
               "in_scale", "in_shift", "act_in", "backend")
_STATS_TENSORS = ("x", "weight", "bias", "in_center", "in_scale", "in_shift")


def _stats_setup(ctx, inputs, output):
    args = dict(zip(_STATS_ARGS, inputs, strict=True))
    z, mean, _ = output
    ctx.save_for_backward(*(args[k] for k in _STATS_TENSORS), z, mean)
    ctx.meta = {k: args[k] for k in ("stride", "padding", "dilation", "groups", "act_in",
                                     "backend")}


def _stats_backward(ctx, gz, gmean, gvar):
    saved = dict(zip(_STATS_TENSORS + ("z", "mean"), ctx.saved_tensors, strict=True))
    saved.update(ctx.meta)
    needs = dict(zip(_STATS_ARGS, ctx.needs_input_grad, strict=True))
    grads = _backward_backend(ctx.meta["backend"]).conv_bn_stats_backward(
        gz, gmean, gvar, saved, needs)
    return tuple(grads.get(k) if needs[k] else None for k in _STATS_ARGS)


conv_bn_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


# ---- channel_stats ----------------------------------------------------------------------

def _channel_stats_impl(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    mean, var = get_backend_object(backend).channel_stats_forward(x)
    return mean, var


channel_stats = torch.library.custom_op("fused_res::channel_stats", _channel_stats_impl,
                                        mutates_args=())


@channel_stats.register_fake
def _(x, backend):
    return _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _channel_stats_setup(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x, output[0])
    ctx.backend = backend


def _channel_stats_backward(ctx, gmean, gvar):
    x, mean = ctx.saved_tensors
    gx = _backward_backend(ctx.backend).channel_stats_backward(gmean, gvar, x, mean)
    return gx, None


channel_stats.register_autograd(_channel_stats_backward, setup_context=_channel_stats_setup)


# ---- epilogue ---------------------------------------------------------------------------

def _epilogue_impl(z: Tensor, center: Vec, scale: Vec, shift: Vec, act_mid: str, residual: Vec,
                   res_scale: float, branch_scale: Vec, act_out: str, backend: str) -> Tensor:
    return get_backend_object(backend).epilogue_forward(
        z, center, scale, shift, act_mid, residual, res_scale, branch_scale, act_out)


epilogue = torch.library.custom_op("fused_res::epilogue", _epilogue_impl, mutates_args=())


@epilogue.register_fake
def _(z, center, scale, shift, act_mid, residual, res_scale, branch_scale, act_out, backend):
    return torch.empty_like(z, memory_format=memory_format_of(z))


_EPI_ARGS = ("z", "center", "scale", "shift", "act_mid", "residual", "res_scale", "branch_scale",
             "act_out", "backend")


def _epilogue_setup(ctx, inputs, output):
    args = dict(zip(_EPI_ARGS, inputs, strict=True))
    z = args["z"]
    if (args["act_mid"] == "relu" and all(args[k] is None for k in ("center", "scale", "shift"))
            and not needs_pre_act(args["act_mid"], args["residual"], args["branch_scale"],
                                  args["act_out"])):
        # y = relu(z) alone: the backward reads only z's sign, which y has (as torch.relu's
        # backward does); z itself may then be freed (a ReLU-only pre-activation's input).
        z = output
    ctx.save_for_backward(z, args["center"], args["scale"], args["shift"],
                          args["branch_scale"],
                          output if args["act_out"] == "relu" else None)
    r = args["residual"]
    ctx.meta = {k: args[k] for k in ("act_mid", "res_scale", "act_out", "backend")}
    ctx.meta["residual_dtype"] = r.dtype if r is not None else None


def _epilogue_backward(ctx, gy):
    saved = dict(zip(("z", "center", "scale", "shift", "branch_scale", "y"), ctx.saved_tensors,
                     strict=True))
    saved.update(ctx.meta)
    needs = dict(zip(_EPI_ARGS, ctx.needs_input_grad, strict=True))
    grads = _backward_backend(ctx.meta["backend"]).epilogue_backward(gy, saved, needs)
    return tuple(grads.get(k) if needs[k] else None for k in _EPI_ARGS)


epilogue.register_autograd(_epilogue_backward, setup_context=_epilogue_setup)


# ---- bn_scale, bn_update_running --------------------------------------------------------
# Two ops, because an op that mutates its arguments cannot have an autograd formula.

def _bn_scale_impl(var: Tensor, weight: Vec, eps: float, backend: str) -> Tensor:
    return get_backend_object(backend).bn_scale_forward(var, weight, eps)


bn_scale = torch.library.custom_op("fused_res::bn_scale", _bn_scale_impl, mutates_args=())


@bn_scale.register_fake
def _(var, weight, eps, backend):
    return torch.empty_like(var)


def _bn_scale_setup(ctx, inputs, output):
    var, weight, eps, backend = inputs
    ctx.save_for_backward(var, weight)
    ctx.meta = {"eps": eps, "backend": backend}


def _bn_scale_backward(ctx, g):
    var, weight = ctx.saved_tensors
    need_var, need_weight = ctx.needs_input_grad[:2]
    gv, gw = _backward_backend(ctx.meta["backend"]).bn_scale_backward(
        g, var, weight, ctx.meta["eps"], need_var, need_weight)
    return (gv if need_var else None), (gw if need_weight else None), None, None


bn_scale.register_autograd(_bn_scale_backward, setup_context=_bn_scale_setup)


def _bn_update_running_impl(mean: Tensor, var: Tensor, running_mean: Tensor,
                            running_var: Tensor, num_batches_tracked: Vec,
                            momentum: float | None, count: int, backend: str) -> None:
    get_backend_object(backend).bn_update_running(
        mean, var, running_mean, running_var, num_batches_tracked, momentum, count)


bn_update_running = torch.library.custom_op(
    "fused_res::bn_update_running", _bn_update_running_impl,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@bn_update_running.register_fake
def _(mean, var, running_mean, running_var, num_batches_tracked, momentum, count, backend):
    return None


def _bump(*tensors: Tensor | None) -> None:
    """Tell autograd's version counters that a kernel wrote these in place. The eager paths
    call the backends' kernels directly, which write through pointers; the custom op's
    dispatch bumps its mutated arguments itself. Caches key on the counters (the eval fold:
    without this, an eval after a train step that updated the running statistics but no
    parameter reused the fold of the old statistics)."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def _bn_update_running_eager(mean, var, running_mean, running_var, num_batches_tracked,
                             momentum, count, backend) -> None:
    _bn_update_running_impl(mean, var, running_mean, running_var, num_batches_tracked,
                            momentum, count, backend)
    _bump(running_mean, running_var, num_batches_tracked)


# ---- eager twins ------------------------------------------------------------------------
# In plain eager mode the custom ops' dispatch and generated autograd wrapper cost tens of
# microseconds per call (schema handling, default filling, redispatch), paid for every conv
# unit twice per training step. The twins are the same impl, setup_context and backward in a
# plain autograd.Function, what torch.library generates minus the dispatcher; _eager.py says
# when a call may use them.

def _eager_twin(name: str, impl, setup, backward) -> type[torch.autograd.Function]:
    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup(ctx, inputs, out)
        return out
    return type(f"Eager_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward),
                 "impl": staticmethod(impl)})


_OPS = {
    "conv_unit": (conv_unit, _eager_twin("conv_unit", _conv_unit_impl, _unit_setup,
                                         _unit_backward)),
    "conv_bn_stats": (conv_bn_stats, _eager_twin("conv_bn_stats", _conv_bn_stats_impl,
                                                 _stats_setup, _stats_backward)),
    "channel_stats": (channel_stats, _eager_twin("channel_stats", _channel_stats_impl,
                                                 _channel_stats_setup,
                                                 _channel_stats_backward)),
    "epilogue": (epilogue, _eager_twin("epilogue", _epilogue_impl, _epilogue_setup,
                                       _epilogue_backward)),
    "bn_scale": (bn_scale, _eager_twin("bn_scale", _bn_scale_impl, _bn_scale_setup,
                                       _bn_scale_backward)),
    # No autograd: the implementation (with the version bump) is the twin.
    "bn_update_running": (bn_update_running,
                          type("Eager_bn_update_running", (),
                               {"apply": staticmethod(_bn_update_running_eager),
                                "impl": staticmethod(_bn_update_running_eager)})),
}


def _scale_and_update(var, weight, eps, backend, mean, running_mean, running_var,
                      num_batches_tracked, momentum, count):
    scale = get_backend_object(backend).bn_scale_and_update(
        var, weight, eps, mean, running_mean, running_var, num_batches_tracked, momentum, count)
    _bump(running_mean, running_var, num_batches_tracked)
    return scale


class _EagerBnScaleAndUpdate(torch.autograd.Function):
    """bn_update_running then bn_scale as one backend call (one launch where the backend has
    a kernel for both); bn_scale's autograd. Its extra inputs (the batch mean, the running
    buffers, momentum, count) take no gradient."""

    @staticmethod
    def forward(ctx, var, weight, eps, backend, *update):
        scale = _scale_and_update(var, weight, eps, backend, *update)
        _bn_scale_setup(ctx, (var, weight, eps, backend), scale)
        return scale

    @staticmethod
    def backward(ctx, g):
        return _bn_scale_backward(ctx, g) + (None,) * 6


def runs_eagerly(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors may skip the dispatcher (what call() asks)."""
    return not transformed() and plain_eager(tensors)


def bn_scale_and_update(var: Tensor, weight: Vec, eps: float, backend: str, mean: Tensor,
                        running_mean: Tensor, running_var: Tensor, num_batches_tracked: Vec,
                        momentum: float | None, count: int) -> Tensor:
    """call("bn_update_running", mean, var, ...) then call("bn_scale", var, weight, eps) as
    one backend call, for ops.bn_scale where one backend runs both and runs_eagerly() holds.
    mean is the detached batch mean; var the batch variance the scale is differentiated in."""
    args = (var, weight, eps, backend, mean, running_mean, running_var, num_batches_tracked,
            momentum, count)
    if torch.is_grad_enabled():
        return _EagerBnScaleAndUpdate.apply(*args)
    return _scale_and_update(*args)


# The reference backend's forward methods are differentiable compositions of aten ops, which
# every autograd mode and torch.func transform supports; the backend argument is dropped.
_COMPOSITES = {
    "conv_unit": lambda ref, *a: ref.conv_unit_forward(*a),
    "conv_bn_stats": lambda ref, *a: ref.conv_bn_stats_forward(*a),
    "channel_stats": lambda ref, *a: ref.channel_stats_forward(*a),
    "epilogue": lambda ref, *a: ref.epilogue_forward(*a),
    "bn_scale": lambda ref, *a: ref.bn_scale_forward(*a),
    "bn_update_running": lambda ref, *a: ref.bn_update_running(*a),
}


def call(name: str, *args):
    """Run op `name` (conv_unit, conv_bn_stats, channel_stats, epilogue, bn_scale,
    bn_update_running) on positional args in its schema's order: through its eager twin where
    nothing needs the dispatcher, else the custom op. Same values and gradients either way.
    Under forward-mode AD or a torch.func transform, the reference composite runs instead (one
    warning): the ops have no jvp or batching rule of their own."""
    if transformed():  # dynamo traces this too: a compiled jvp needs the composite as much
        if args[-1] != "reference":
            warn_once("forward-mode AD or a torch.func transform (jvp, grad, vmap, ...) is "
                      f"active, for which backend {args[-1]!r} has no rule")
        return _COMPOSITES[name](get_backend_object("reference"), *args[:-1])
    op, twin = _OPS[name]
    if plain_eager(args):
        if not torch.is_grad_enabled():
            # Nothing to record: the twin's autograd.Function would only run setup_context
            # (saving tensors for a backward that cannot happen) around the same impl.
            return twin.impl(*args)
        return twin.apply(*args)
    return op(*args)
