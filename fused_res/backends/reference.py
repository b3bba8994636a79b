"""The reference backend: the conv unit of DESIGN.md §2 in composite aten ops.

It runs on every device and dtype torch supports (float64 included), forward and backward,
and is the semantics every other backend must reproduce. Per-channel math (affines, sums)
runs in float32 (float64 for float64 inputs); tensors flow in the input dtype, as eager
BatchNorm does under autocast.

Shapes: x (N, C_in, H, W); weight (C_out, C_in/groups, KH, KW); per-channel vectors (C,);
residual like the output; branch_scale (N,). Acts are "none" or "relu".
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import Backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-channel math runs in for tensors of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_is_batched = getattr(torch._C._functorch, "is_batchedtensor", lambda x: False)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out NHWC (and not also NCHW), else contiguous. Inside
    vmap, contiguous: a batched tensor cannot say whether it is channels_last (torch raises),
    and its layout is vmap's own."""
    if x.dim() == 4 and not x.is_contiguous() and not _is_batched(x) and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _ch(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _act(t: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu(t) if act == "relu" else t


def _act_grad(g: torch.Tensor, out: torch.Tensor | None, act: str) -> torch.Tensor:
    """Gradient through `act` given its output, or its input (for relu the same test)."""
    return _relu_grad(g, out) if act == "relu" else g


def _relu_grad(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch.relu's backward (threshold_backward): 0 where out <= 0, else g. Not g * (out > 0):
    that keeps a NaN gradient where the unit was off and drops the gradient where out is NaN,
    both unlike eager."""
    return g.masked_fill(out <= 0, 0)


def _affine(t, center, scale, shift):
    """(t - center) * scale + shift per channel, in the acc dtype. Centering first keeps the
    gradient of scale, Σ g·(t - center), free of the cancellation Σ g·t - center·Σ g."""
    acc = acc_dtype(t.dtype)
    u = t.to(acc)
    if center is not None:
        u = u - _ch(center.to(acc))
    if scale is not None:
        u = u * _ch(scale.to(acc))
    if shift is not None:
        u = u + _ch(shift.to(acc))
    return u


def _affine_backward(gu, t, center, scale, shift, needs_t, needs_center, needs_scale,
                     needs_shift):
    """Gradients of _affine w.r.t. t, center, scale, shift given dL/du (in the acc dtype)."""
    acc = gu.dtype
    gt = gc = gs = gb = None
    g_centered = gu * _ch(scale.to(acc)) if scale is not None else gu
    if needs_t:
        gt = g_centered.to(t.dtype)
    if needs_center and center is not None:
        gc = (-g_centered.sum((0, 2, 3))).to(center.dtype)
    if needs_scale and scale is not None:
        centered = t.to(acc) - _ch(center.to(acc)) if center is not None else t.to(acc)
        gs = (gu * centered).sum((0, 2, 3)).to(scale.dtype)
    if needs_shift and shift is not None:
        gb = gu.sum((0, 2, 3)).to(shift.dtype)
    return gt, gc, gs, gb


def prologue(x, in_center, in_scale, in_shift, act_in):
    """p = act_in((x - in_center) * in_scale + in_shift), in x's dtype."""
    if in_center is None and in_scale is None and in_shift is None:
        return _act(x, act_in)
    return _act(_affine(x, in_center, in_scale, in_shift), act_in).to(x.dtype)


def _prologue_backward(gp, x, in_center, in_scale, in_shift, act_in, needs):
    """Gradients of prologue() w.r.t. (x, in_center, in_scale, in_shift) given dL/dp."""
    if in_center is None and in_scale is None and in_shift is None:
        return (_act_grad(gp, x, act_in) if needs["x"] else None), None, None, None
    q = _affine(x, in_center, in_scale, in_shift)
    gq = _act_grad(gp.to(q.dtype), q, act_in)
    return _affine_backward(gq, x, in_center, in_scale, in_shift, needs["x"],
                            needs["in_center"], needs["in_scale"], needs["in_shift"])


def _tail(u, act_mid, residual, res_scale, branch_scale, act_out):
    """y = act_out(branch_scale * act_mid(u) + res_scale * residual), u in the acc dtype."""
    w = _act(u, act_mid)
    if branch_scale is not None:
        w = w * branch_scale.to(w.dtype).view(-1, 1, 1, 1)
    if residual is not None:
        r = residual.to(w.dtype)
        w = w + (r if res_scale == 1.0 else res_scale * r)
    return _act(w, act_out)


def needs_pre_act(act_mid: str, residual, branch_scale, act_out: str) -> bool:
    """Whether a conv unit's backward needs u, the value before act_mid, saved. When y is
    act_mid(u) alone (conv-BN-ReLU: no residual, branch scale or act_out), y > 0 exactly where
    u > 0, so y stands in for u and u is never written (inference writes y only)."""
    return act_mid == "relu" and (residual is not None or branch_scale is not None
                                  or act_out == "relu")


def _tail_backward(gy, acc, u, y, act_mid, res_scale, branch_scale, act_out, residual_dtype,
                   needs_residual):
    """dL/du (in `acc`) and dL/dresidual (in residual_dtype) of _tail. u is only read for
    act_mid == "relu" (only its sign: y where needs_pre_act is False), y only for
    act_out == "relu"."""
    gw = _act_grad(gy.to(acc), y, act_out)
    gr = None
    if needs_residual:
        gr = (gw if res_scale == 1.0 else gw * res_scale).to(residual_dtype)
    gv = gw * branch_scale.to(gw.dtype).view(-1, 1, 1, 1) if branch_scale is not None else gw
    if act_mid == "relu":
        gv = _relu_grad(gv, u)
    return gv, gr


def _conv(p, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(p, weight, bias, stride, padding, dilation, groups)


def _conv_backward(gz, p, weight, has_bias, stride, padding, dilation, groups, needs_p,
                   needs_w):
    gp, gw, gb = torch.ops.aten.convolution_backward(
        gz, p, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, [needs_p, needs_w, has_bias])
    return gp, gw, gb


def fold_backward(gw_eff, gb_eff, weight, bias, out_scale, out_shift, needs) -> dict:
    """Gradients of weight, bias, out_scale, out_shift from those of the folded conv
    (W' = W * out_scale, b' = bias * out_scale + out_shift): dL/dW' and dL/db' (C_out,)."""
    grads = {}
    acc = acc_dtype(weight.dtype)
    a = out_scale.to(acc) if out_scale is not None else None
    if needs["weight"]:
        gw = gw_eff.to(acc)
        grads["weight"] = (gw * a.view(-1, 1, 1, 1) if a is not None else gw).to(weight.dtype)
    if needs["out_scale"] and out_scale is not None:
        # Σ_{c_in,k} dL/dW'·W = Σ dL/du·z: exact for the folded form (an eval-mode BN folds
        # its running mean into out_shift, so z here is not centered).
        ga = (gw_eff.to(acc) * weight.to(acc)).sum((1, 2, 3))
        if bias is not None:
            ga = ga + gb_eff.to(acc) * bias.to(acc)
        grads["out_scale"] = ga.to(out_scale.dtype)
    if needs["out_shift"] and out_shift is not None:
        grads["out_shift"] = gb_eff.to(out_shift.dtype)
    if needs["bias"] and bias is not None:
        gb = gb_eff.to(acc)
        grads["bias"] = (gb * a if a is not None else gb).to(bias.dtype)
    return grads


def affine_apart(dtype: torch.dtype, out_scale, out_shift) -> bool:
    """Whether a conv unit in `dtype` applies its output affine (out_scale, out_shift) after
    the conv in float32 instead of folding it into the conv's weight and bias (_fold): in
    float16, whose range ends at 65504. A folded BatchNorm's bias -mean * scale and the
    conv's scaled output can pass that where eager's conv output and BatchNorm output do not
    (a channel whose mean is large against its spread: mean 100, std 10, weight 1e4 folds to
    a bias of -1e5), and would turn the unit's output into inf or 0. Backends whose kernels
    add the affine in float32 to a float32 accumulator (Triton's) fold safely."""
    return dtype == torch.float16 and (out_scale is not None or out_shift is not None)


def _fold(weight, bias, out_scale, out_shift):
    """(W', b') with conv(p, W') + b' == (conv(p, W) + bias) * out_scale + out_shift."""
    if out_scale is None:
        if out_shift is None:
            return weight, bias
        shift = out_shift if bias is None else bias.to(out_shift.dtype) + out_shift
        return weight, shift.to(weight.dtype)
    acc = acc_dtype(weight.dtype)
    a = out_scale.to(acc)
    w = (weight.to(acc) * a.view(-1, 1, 1, 1)).to(weight.dtype)
    b = None if bias is None else bias.to(acc) * a
    if out_shift is not None:
        b = out_shift.to(acc) if b is None else b + out_shift.to(acc)
    return w, (None if b is None else b.to(weight.dtype))


class ReferenceBackend(Backend):
    """Composite aten implementation of every op; the oracle for the other backends.

    Backward methods take `saved` (the forward's tensors and settings by name) and `needs`
    (argument name -> whether its gradient is wanted) and return gradients by name."""

    name = "reference"

    # ---- primitives the composite methods below are built from; a faster backend overrides
    # these and inherits the composition (conv gradients stay with aten) ---------------------
    def _prologue_apply(self, x, center, scale, shift, act):
        """p = act((x - center) * scale + shift) in x's dtype and memory format."""
        return prologue(x, center, scale, shift, act)

    def _prologue_grads(self, gp, x, center, scale, shift, act, needs):
        """(dx, dcenter, dscale, dshift) of _prologue_apply given dL/dp; needs by in_* names."""
        return _prologue_backward(gp, x, center, scale, shift, act, needs)

    def _stats_grad(self, gz, gmean, gvar, z, mean):
        """dL/dz (z's dtype) given dL/dz direct, dL/dmean and dL/dvar (biased) per channel."""
        return _stats_backward_into(gz, gmean, gvar, z, mean).to(z.dtype)

    # ---- conv_unit: y = tail(fold(conv(prologue(x)))) -------------------------------------
    def conv_unit_forward(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out):
        """Returns (y, u): u is the conv output before act_mid (x.dtype), for the backward.
        A backend may return None for u where the backward cannot read it (not
        needs_pre_act)."""
        fmt = memory_format_of(x)
        p = prologue(x, in_center, in_scale, in_shift, act_in)
        if affine_apart(x.dtype, out_scale, out_shift):
            u = _affine(_conv(p, weight, bias, stride, padding, dilation, groups), None,
                        out_scale, out_shift)
            y = _tail(u, act_mid, residual, res_scale, branch_scale, act_out)
            return y.to(x.dtype).contiguous(memory_format=fmt), u.to(x.dtype)
        w, b = _fold(weight, bias, out_scale, out_shift)
        u = _conv(p, w, b, stride, padding, dilation, groups)
        y = _tail(u.to(acc_dtype(x.dtype)), act_mid, residual, res_scale, branch_scale, act_out)
        return y.to(x.dtype).contiguous(memory_format=fmt), u

    def conv_pair_forward(self, x, weight, bias, stride, padding, x2, weight2, bias2, stride2,
                          act_out):
        """y = act_out(conv(x, weight) + bias + conv(x2, weight2, stride2) + bias2): a block's
        last conv and its 1x1 projection shortcut with their BatchNorms folded (inference).
        Here the two units the block would run otherwise; bias, bias2 (C_out,) or None."""
        r, _ = self.conv_unit_forward(x2, weight2, None, stride2, [0, 0], [1, 1], 1, None, None,
                                      None, "none", None, bias2, "none", None, 1.0, None,
                                      "none")
        y, _ = self.conv_unit_forward(x, weight, None, stride, padding, [1, 1], 1, None, None,
                                      None, "none", None, bias, "none", r, 1.0, None, act_out)
        return y

    def conv_unit_backward(self, gy, saved, needs):
        s = saved
        x, weight, bias = s["x"], s["weight"], s["bias"]
        acc = acc_dtype(x.dtype)
        gu, gr = _tail_backward(gy, acc, s["u"], s["y"], s["act_mid"], s["res_scale"],
                                s["branch_scale"], s["act_out"], s["residual_dtype"],
                                needs["residual"])
        out_scale, out_shift = s["out_scale"], s["out_shift"]
        w_eff, _ = _fold(weight, bias, out_scale, out_shift)
        p = self._prologue_apply(x, s["in_center"], s["in_scale"], s["in_shift"], s["act_in"])
        need_p = any(needs[k] for k in ("x", "in_center", "in_scale", "in_shift"))
        need_w = needs["weight"] or needs["out_scale"]
        gp, gw_eff, _ = _conv_backward(gu.to(x.dtype), p, w_eff, False, s["stride"],
                                       s["padding"], s["dilation"], s["groups"], need_p, need_w)
        gb_eff = gu.sum((0, 2, 3))  # dL/db' in acc
        grads = {"residual": gr, **fold_backward(gw_eff, gb_eff, weight, bias, out_scale,
                                                 out_shift, needs)}
        if need_p:
            (grads["x"], grads["in_center"], grads["in_scale"],
             grads["in_shift"]) = self._prologue_grads(gp, x, s["in_center"], s["in_scale"],
                                                       s["in_shift"], s["act_in"], needs)
        return grads

    # ---- conv_bn_stats: z = conv(prologue(x)), with the batch statistics of z -------------
    def conv_bn_stats_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in):
        """Returns (z, mean, var): z in x.dtype and x's memory format; mean and biased var
        per output channel in the acc dtype (zeros for an empty batch)."""
        fmt = memory_format_of(x)
        p = prologue(x, in_center, in_scale, in_shift, act_in)
        z = _conv(p, weight, bias, stride, padding, dilation, groups).contiguous(
            memory_format=fmt)
        mean, var = self.channel_stats_forward(z)
        return z, mean, var

    def conv_bn_stats_backward(self, gz, gmean, gvar, saved, needs):
        s = saved
        x, weight, bias = s["x"], s["weight"], s["bias"]
        gz_total = self._stats_grad(gz, gmean, gvar, s["z"], s["mean"])
        p = self._prologue_apply(x, s["in_center"], s["in_scale"], s["in_shift"], s["act_in"])
        need_p = any(needs[k] for k in ("x", "in_center", "in_scale", "in_shift"))
        gp, gw, gb = _conv_backward(gz_total, p, weight, bias is not None,
                                    s["stride"], s["padding"], s["dilation"], s["groups"],
                                    need_p, needs["weight"])
        grads = {"weight": gw if needs["weight"] else None,
                 "bias": gb.to(bias.dtype) if (needs["bias"] and bias is not None) else None}
        if need_p:
            (grads["x"], grads["in_center"], grads["in_scale"],
             grads["in_shift"]) = self._prologue_grads(gp, x, s["in_center"], s["in_scale"],
                                                       s["in_shift"], s["act_in"], needs)
        return grads

    def conv_bn_train_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in, bn_weight, eps,
                              running_mean, running_var, num_batches_tracked, momentum, count):
        """conv_bn_stats_forward, then bn_scale_and_update on its statistics: returns (z, mean,
        var, scale) with the running statistics updated (what ops.train_unit's node runs; a
        backend may do the second part in the launch that ends the first)."""
        z, mean, var = self.conv_bn_stats_forward(x, weight, bias, stride, padding, dilation,
                                                  groups, in_center, in_scale, in_shift, act_in)
        scale = self.bn_scale_and_update(var, bn_weight, eps, mean, running_mean, running_var,
                                         num_batches_tracked, momentum, count)
        return z, mean, var, scale

    # ---- channel_stats: per-channel mean and biased variance ------------------------------
    def channel_stats_forward(self, x):
        acc = acc_dtype(x.dtype)
        c = x.shape[1]
        if x.numel() == 0:
            zeros = x.new_zeros(c, dtype=acc)
            return zeros, zeros.clone()
        var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
        return mean, var

    def channel_stats_backward(self, gmean, gvar, x, mean):
        return _stats_backward_into(None, gmean, gvar, x, mean).to(x.dtype)

    # ---- a train-mode BatchNorm's per-channel scale, and its running statistics ------------
    def bn_scale_forward(self, var, weight, eps):
        """scale = weight * rsqrt(var + eps) (C,) in var's dtype (weight may be None)."""
        scale = torch.rsqrt(var + eps)
        return scale * weight.to(scale.dtype) if weight is not None else scale

    def bn_scale_backward(self, g, var, weight, eps, need_var, need_weight):
        """(dL/dvar, dL/dweight) of bn_scale_forward given dL/dscale (None where unwanted)."""
        rstd = torch.rsqrt(var + eps)
        gw = (g * rstd).to(weight.dtype) if need_weight and weight is not None else None
        gv = None
        if need_var:
            gs = g * weight.to(g.dtype) if weight is not None else g
            gv = (gs * rstd.pow(3) * -0.5).to(var.dtype)
        return gv, gw

    def bn_update_running(self, mean, var, running_mean, running_var, num_batches_tracked,
                          momentum, count):
        """nn.BatchNorm2d's running-statistics update, in place (update_running_stats)."""
        update_running_stats(mean, var, running_mean, running_var, num_batches_tracked,
                             momentum, count)

    def bn_scale_and_update(self, var, weight, eps, mean, running_mean, running_var,
                            num_batches_tracked, momentum, count):
        """bn_update_running, then returns bn_scale_forward: what the eager path of
        ops.bn_scale asks for when both run here, so that a backend may do both in one
        launch."""
        self.bn_update_running(mean, var, running_mean, running_var, num_batches_tracked,
                               momentum, count)
        return self.bn_scale_forward(var, weight, eps)

    def bn_epilogue_backward(self, gy, saved, needs, var, bn_weight, eps, need_var,
                             need_weight):
        """epilogue_backward where the scale is bn_scale_forward(var, bn_weight, eps), then
        bn_scale_backward on its gradient: returns (epilogue_backward's grads, dL/dvar or
        None, dL/dbn_weight or None). ops.train_unit's backward; a backend may do the second
        part in the pass of the first."""
        g = self.epilogue_backward(gy, saved, needs)
        gv = gw = None
        if needs["scale"]:
            gv, gw = self.bn_scale_backward(g.get("scale"), var, bn_weight, eps, need_var,
                                            need_weight)
        return g, gv, gw

    # ---- epilogue: y = tail((z - center) * scale + shift) ---------------------------------
    def epilogue_forward(self, z, center, scale, shift, act_mid, residual, res_scale,
                         branch_scale, act_out):
        fmt = memory_format_of(z)
        u = _affine(z, center, scale, shift)
        y = _tail(u, act_mid, residual, res_scale, branch_scale, act_out)
        y = y.to(z.dtype).contiguous(memory_format=fmt)
        # An epilogue with nothing to do must still return a new tensor: an op's output may
        # not alias its input (the custom op refuses it; the eager twin would return a view).
        return y.clone(memory_format=fmt) if y is z else y

    def epilogue_backward(self, gy, saved, needs):
        s = saved
        z, center, scale, shift = s["z"], s["center"], s["scale"], s["shift"]
        acc = acc_dtype(z.dtype)
        u = _affine(z, center, scale, shift) if s["act_mid"] == "relu" else None
        gu, gr = _tail_backward(gy, acc, u, s["y"], s["act_mid"], s["res_scale"],
                                s["branch_scale"], s["act_out"], s["residual_dtype"],
                                needs["residual"])
        grads = {"residual": gr}
        grads["z"], grads["center"], grads["scale"], grads["shift"] = _affine_backward(
            gu, z, center, scale, shift, needs["z"], needs["center"], needs["scale"],
            needs["shift"])
        return grads


@torch.no_grad()
def update_running_stats(mean, var, running_mean, running_var, num_batches_tracked, momentum,
                         count: int | torch.Tensor) -> None:
    """nn.BatchNorm2d's running-statistics update in training, for batch statistics of `count`
    values per channel: num_batches_tracked += 1; running = (1 - f) * running + f * batch,
    f = momentum, or 1 / num_batches_tracked when momentum is None (0 without a count, as nn
    does); the running variance is the unbiased one. Nothing without running statistics; an
    empty batch only counts. Buffers narrower than float32 are updated in float32 and rounded
    once, as nn's kernels do."""
    if running_mean is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if count == 0:
        return
    running = [running_mean, running_var]
    narrow = running_mean.dtype in (torch.float16, torch.bfloat16)
    acc = [r.float() for r in running] if narrow else running
    if momentum is not None:
        factor = momentum
    elif num_batches_tracked is not None:
        # In the buffers' own precision, as nn's 1.0 / float(num_batches_tracked) is once
        # rounded to them: a float32 quotient put float64 buffers 3e-8 off, and float64
        # does not exist on every device (MPS).
        factor = 1.0 / num_batches_tracked.to(acc[0].dtype)
    else:
        factor = 0.0
    if isinstance(count, torch.Tensor):  # (a size recorded by torch.jit.trace)
        count = count.double()
    batch = [mean.detach().to(acc[0].dtype),
             var.detach().to(acc[1].dtype) * (count / (count - 1))]
    if torch._C._functorch.maybe_current_level() is not None:
        # vmap has no rule for the foreach ops: one tensor at a time, which it batches where
        # the buffers are batched too (an ensemble's stacked buffers, as nn.BatchNorm2d
        # allows); computed out of place first, so that a refused write changes nothing.
        try:
            for a, b in zip(acc, batch, strict=True):
                f = factor.to(a.dtype) if isinstance(factor, torch.Tensor) else factor
                a.copy_(a * (1 - f) + b * f)
        except RuntimeError as e:
            if "vmap" not in str(e) and "atch" not in str(e):
                raise
            # A per-sample statistic cannot go into one unbatched buffer (nn refuses it too).
            raise RuntimeError(
                "a train-mode BatchNorm under vmap got batched statistics, but its "
                "running_mean and running_var, which it updates in place, are not batched; "
                "accepted: eval mode, track_running_stats=False, "
                "torch.func.replace_all_batch_norm_modules_, or buffers batched as the "
                "statistics are (as for nn.BatchNorm2d)") from e
    # Two multi-tensor launches for both buffers rather than six elementwise ones.
    elif isinstance(factor, torch.Tensor):
        torch._foreach_mul_(acc, 1 - factor.to(acc[0].dtype))
        torch._foreach_add_(acc, torch._foreach_mul(batch, factor.to(acc[0].dtype)))
    else:
        torch._foreach_mul_(acc, 1 - factor)
        torch._foreach_add_(acc, batch, alpha=factor)
    if narrow:  # (one tensor at a time: vmap has no rule for _foreach_copy_ either)
        for r, a in zip(running, acc, strict=True):
            r.copy_(a)


def _stats_backward_into(gz, gmean, gvar, z, mean):
    """dL/dz given dL/dz (direct use), dL/dmean and dL/dvar (biased) over (N, H, W)."""
    acc = acc_dtype(z.dtype)
    m = z.numel() // max(z.shape[1], 1)
    g = gz.to(acc) if gz is not None else torch.zeros_like(z, dtype=acc)
    if m == 0:
        return g
    # Divide tensors by the integer count: a Python float derived from a symbolic size trips
    # torch.compile's scalar tensorification under dynamic shapes.
    if gmean is not None:
        g = g + _ch(gmean.to(acc)) / m
    if gvar is not None:
        g = g + (_ch(gvar.to(acc)) * 2) * (z.to(acc) - _ch(mean.to(acc))) / m
    return g
