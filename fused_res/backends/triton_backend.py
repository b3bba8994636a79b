"""The `triton` backend: the conv-unit ops on Triton kernels (fused_res/triton/).

In Triton:
- conv_unit forward: one implicit-GEMM kernel per unit (prologue affine + ReLU with zero
  padding after it; epilogue folded affine, act_mid, branch scale, λ residual, act_out);
- conv_bn_stats forward: the same kernel with a statistics epilogue (per-tile mean / M2 of z)
  and a finalize kernel (Chan's combine) for the mean and biased variance;
- channel_stats forward, epilogue forward: fused elementwise / reduction kernels;
- the backward's act / add / affine gradients (dL/du, dL/dresidual, Σ dL/du and
  Σ dL/du·(t - center) per channel), the statistics backward and the prologue recompute.
The conv's data and weight gradients stay with aten's convolution_backward (cuDNN on a GPU).

Triton runs CUDA tensors, and CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported (the interpreter, DESIGN.md §5 rung 2). triton is imported on first use, never by
`import fused_res`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch

from ..triton import configs
from .base import BackendStatus, in_place_reason, runs_own
from .constants import is_constant
from .reference import (
    ReferenceBackend,
    _conv_backward,
    _fold,
    fold_backward,
    memory_format_of,
    needs_pre_act,
)
from .registry import warn_once

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Whether bf16 CPU tensors may take the kernels under TRITON_INTERPRET=1, whose bf16 arithmetic
# is wrong: only for tools that replace every kernel by a stub that never computes
# (benchmarks/host_overhead.py times the host path of a bf16 autocast model that way).
INTERPRETER_BF16 = False


def _interpret_requested() -> bool:
    """Whether the kernels run in Triton's interpreter. Once they are imported that is fixed
    (triton decides it when a kernel is decorated), and asking the imported module spares an
    environment lookup on every call; before, the environment says what they will do."""
    conv = sys.modules.get("fused_res.triton.conv")
    if conv is not None:
        return conv._INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_MODULES: list = []  # [conv, elementwise, batchnorm] once imported


def _imported() -> list:
    # Asked several times per unit: the import statement's own lookup is not free.
    if not _MODULES:
        from ..triton import batchnorm, conv, elementwise
        _MODULES.extend((conv, elementwise, batchnorm))
    return _MODULES


def _kernels():
    """(conv, elementwise) kernel modules, imported on first use."""
    m = _imported()
    return m[0], m[1]


def _bn_kernels():
    """The BatchNorm per-channel kernel module, imported on first use."""
    return _imported()[2]


def _constants(*tensors) -> bool:
    """Whether each tensor is None or one of fused_res's constants (what plans are made on)."""
    return all(t is None or is_constant(t) for t in tensors)


class TritonBackend(ReferenceBackend):
    """Triton kernels for the conv unit; what is not overridden here is the reference."""

    name = "triton"
    prologue_in_conv = True
    # Measured, not assumed: on an H100 (bf16, ResNet-50 b128 train step with CUDA graphs,
    # benchmarks/results/2026-11-27-h100-run5) each training BN + ReLU in its own pass ran
    # the step in 27.9 ms against 31.3 ms with it in the next conv's prologue (1.19x against
    # 1.07x eager): the prologue conv took 8.97 ms of device time per step, the plain
    # statistics conv 5.73 ms, and the separate passes cost less than that difference.
    # The prologue stays one train_prologue(True) away (the bench's fused-triton-prologue).
    fuse_train_prologue = False
    fused_train_unit = True  # (base.Backend.fused_train_unit)

    def status(self) -> BackendStatus:
        # Asked on every call (twice per unit); the answer changes only with the interpreter
        # switch, so it is kept per value of that switch.
        key = _interpret_requested()
        cached = self.__dict__.setdefault("_status", {})
        if key not in cached:
            cached[key] = self._probe(key)
        return cached[key]

    @staticmethod
    def _probe(interpret: bool) -> BackendStatus:
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed")
        if torch.cuda.is_available() or interpret:
            return BackendStatus(True, "")
        return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run the "
                                    "kernels in Triton's CPU interpreter)")

    def unsupported_reason(self, x, weight, groups, dilation) -> str | None:
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype} (accepted: float32, float16, bfloat16)"
        if x.device.type == "cpu":
            if not _interpret_requested():
                return "CPU tensors without TRITON_INTERPRET=1"
            if x.dtype == torch.bfloat16 and not INTERPRETER_BF16:
                # (its bf16 arithmetic is wrong: relative errors of 1e9 on a plain conv)
                return "bfloat16 in Triton's CPU interpreter (accepted there: float32, float16)"
        elif x.device.type != "cuda":
            return f"device {x.device.type!r} (accepted: cuda, or cpu under TRITON_INTERPRET=1)"
        if groups != 1:
            return f"groups={groups} (accepted: 1)"
        if any(d != 1 for d in dilation):
            return f"dilation={tuple(dilation)} (accepted: 1)"
        if weight is not None and weight.dtype != x.dtype:
            return f"weight dtype {weight.dtype} != input dtype {x.dtype}"
        return None

    _unfused = False

    @contextlib.contextmanager
    def unfused(self) -> Iterator[None]:
        """Within the context, the forward runs the same kernels one job at a time (prologue
        pass, plain conv, affine pass, tail pass; statistics as their own pass): what fusion
        alone buys is the difference (bench's fused-triton-unfused)."""
        previous, self._unfused = self._unfused, True
        try:
            yield
        finally:
            self._unfused = previous

    _tma: bool | None = None  # None: FUSED_RES_TRITON_TMA decides

    @contextlib.contextmanager
    def tma_loads(self) -> Iterator[None]:
        """Within the context, on sm_90 and newer, operands come by TMA: both for 1x1 stride-1
        convs without a prologue (triton/conv_tma.py), the weight tiles for the others where
        the tile's BLOCK_K divides C_in. The bench's fused-triton-tma; not the default (H100
        run 7: ResNet-50 3% faster in eval at b256, 2% slower in training at b128)."""
        previous, self._tma = self._tma, True
        try:
            yield
        finally:
            self._tma = previous

    def _runs(self, x, weight=None, groups=1, dilation=(1, 1)) -> bool:
        """Whether the kernels take this call; a backward of a call the registry routed here
        always qualifies, this guards direct calls to the backend object."""
        # Asked by every method (about a dozen times per unit and training step); the answer
        # depends only on the key, so it is computed once per key.
        key = (x.dtype, x.device.type, weight.dtype if weight is not None else None, groups,
               *dilation, _interpret_requested())
        runs = self._runs_cache.get(key)
        if runs is None:
            runs = self._runs_cache[key] = self.status().available and (
                self.unsupported_reason(x, weight, groups, dilation) is None)
        return runs

    @property
    def _runs_cache(self) -> dict:
        return self.__dict__.setdefault("_runs_by_key", {})

    def fuses_shortcut_conv(self) -> bool:
        return not self._unfused

    # ---- a block's last conv and its projection shortcut (inference) ----------------------
    def _pair_runs(self, x, weight, x2, weight2) -> bool:
        """Whether the pair kernel takes this pair (fewer than 16 input channels: the conv
        kernel's flattened-K path, not here)."""
        return (not self._unfused and self._runs(x, weight) and self._runs(x2, weight2)
                and weight2.shape[2:] == (1, 1) and min(x.shape[1], x2.shape[1]) >= configs.DOT_MIN)

    def conv_pair_forward(self, x, weight, bias, stride, padding, x2, weight2, bias2, stride2,
                          act_out):
        if not self._pair_runs(x, weight, x2, weight2):
            return super().conv_pair_forward(x, weight, bias, stride, padding, x2, weight2,
                                              bias2, stride2, act_out)
        from ..triton.conv_pair import conv_pair_launch
        return conv_pair_launch(x, weight, bias, stride, padding, x2, weight2, bias2, stride2,
                                act_out, memory_format=memory_format_of(x),
                                cache_weights=is_constant(weight) and is_constant(weight2))

    def conv_pair_plan(self, x, weight, bias, stride, padding, x2, weight2, bias2, stride2,
                       act_out):
        # As conv_unit_plan: one launch on constants only (the eval fold's weights and shifts).
        if (not self._pair_runs(x, weight, x2, weight2)
                or not _constants(weight, bias, weight2, bias2)):
            return super().conv_pair_plan(x, weight, bias, stride, padding, x2, weight2, bias2,
                                          stride2, act_out)
        from ..triton.conv_pair import conv_pair_launch
        plans: list = []
        y = conv_pair_launch(x, weight, bias, stride, padding, x2, weight2, bias2, stride2,
                             act_out, memory_format=memory_format_of(x), cache_weights=True,
                             plan_out=plans)
        return y, (plans[0] if plans else None)

    # ---- conv_unit ------------------------------------------------------------------------
    def conv_unit_forward(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                          in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                          res_scale, branch_scale, act_out):
        if not self._runs(x, weight, groups, dilation):
            return super().conv_unit_forward(
                x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                in_shift, act_in, out_scale, out_shift, act_mid, residual, res_scale,
                branch_scale, act_out)
        conv, ew = _kernels()
        if self._unfused:
            fmt = memory_format_of(x)
            # Same kernels, one job each: prologue pass, plain conv, affine pass, tail pass.
            p = self._prologue(x, in_center, in_scale, in_shift, act_in, fmt)
            z, _ = conv.conv_launch(p, weight, bias, stride, padding, None, None, None, "none",
                                    memory_format=fmt)
            u = z if out_scale is None and out_shift is None else ew.epilogue_forward(
                z, None, out_scale, out_shift, "none", None, 1.0, None, "none", fmt)
            y = ew.epilogue_forward(u, None, None, None, act_mid, residual, res_scale,
                                    branch_scale, act_out, fmt)
            return y, (u if act_mid == "relu" else None)
        return self._fused_unit(x, weight, bias, stride, padding, in_center, in_scale,
                                in_shift, act_in, out_scale, out_shift, act_mid, residual,
                                res_scale, branch_scale, act_out)

    def _fused_unit(self, x, weight, bias, stride, padding, in_center, in_scale, in_shift,
                    act_in, out_scale, out_shift, act_mid, residual, res_scale, branch_scale,
                    act_out, plan_out=None):
        conv, _ = _kernels()
        # (A call being planned is an inference call: no backward reads u.)
        y, u = conv.conv_launch(
            x, weight, bias, stride, padding, in_center, in_scale, in_shift, act_in,
            out_scale=out_scale, out_shift=out_shift, act_mid=act_mid, residual=residual,
            res_scale=res_scale, branch_scale=branch_scale, act_out=act_out,
            store_u=plan_out is None and needs_pre_act(act_mid, residual, branch_scale,
                                                       act_out),
            memory_format=memory_format_of(x), tma=self._tma,
            cache_weight=is_constant(weight), plan_out=plan_out)
        # u is only read by a backward that needs_pre_act (it is stored then), else None.
        return y, u

    def plan_switches(self, dtype: torch.dtype) -> tuple:
        conv, _ = _kernels()
        return (self._unfused, self._tma, conv.tma_requested(), conv.autotune_enabled(),
                conv.dot_precision(dtype))

    def conv_unit_plan(self, x, weight, bias, stride, padding, dilation, groups, in_center,
                       in_scale, in_shift, act_in, out_scale, out_shift, act_mid, residual,
                       res_scale, branch_scale, act_out):
        # Plans for one fused launch whose tensors, the input and residual aside, are
        # fused_res's constants (the eval fold's): nobody writes them, so what the launch
        # derived from them (the weight matrix, contiguous vectors) stays right.
        if (self._unfused or branch_scale is not None
                or not self._runs(x, weight, groups, dilation)
                or not _constants(weight, bias, in_center, in_scale, in_shift, out_scale,
                                  out_shift)):
            return super().conv_unit_plan(
                x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                in_shift, act_in, out_scale, out_shift, act_mid, residual, res_scale,
                branch_scale, act_out)
        plans: list = []
        y, _ = self._fused_unit(x, weight, bias, stride, padding, in_center, in_scale,
                                in_shift, act_in, out_scale, out_shift, act_mid, residual,
                                res_scale, branch_scale, act_out, plans)
        return y, (plans[0] if plans else None)

    def conv_unit_backward(self, gy, saved, needs):
        s = saved
        x, weight, bias = s["x"], s["weight"], s["bias"]
        if not self._runs(x, weight, s["groups"], s["dilation"]):
            return super().conv_unit_backward(gy, saved, needs)
        _, ew = _kernels()
        fmt = memory_format_of(x)
        out_scale, out_shift = s["out_scale"], s["out_shift"]
        need_p = any(needs[k] for k in ("x", "in_center", "in_scale", "in_shift"))
        need_w = needs["weight"] or needs["out_scale"]
        need_gb = ((needs["out_shift"] and out_shift is not None)
                   or (needs["bias"] and bias is not None)
                   or (needs["out_scale"] and out_scale is not None and bias is not None))
        # One pass over gy: dL/du in x's dtype (what the conv backward consumes), dL/dr and
        # Σ dL/du per channel (the folded bias gradient).
        gu, gr, gb_eff, _, _ = ew.epilogue_backward(
            gy, s["u"], s["y"], None, None, None, s["branch_scale"], s["act_mid"],
            s["act_out"], s["res_scale"], s["residual_dtype"], need_gt=need_p or need_w,
            need_gr=needs["residual"], need_sum=need_gb, need_sum_t=False, fmt=fmt,
            gt_dtype=x.dtype)
        grads = {"residual": gr}
        gp = gw_eff = None
        if need_p or need_w:
            w_eff, _ = _fold(weight, bias, out_scale, out_shift)
            p = self._prologue(x, s["in_center"], s["in_scale"], s["in_shift"], s["act_in"],
                                fmt)
            gp, gw_eff, _ = _conv_backward(gu, p, w_eff, False, s["stride"], s["padding"],
                                           s["dilation"], s["groups"], need_p, need_w)
        grads.update(fold_backward(gw_eff, gb_eff, weight, bias, out_scale, out_shift, needs))
        if need_p:
            (grads["x"], grads["in_center"], grads["in_scale"],
             grads["in_shift"]) = self._prologue_backward(gp, x, s["in_center"], s["in_scale"],
                                                          s["in_shift"], s["act_in"], needs,
                                                          fmt)
        return grads

    # ---- conv_bn_stats --------------------------------------------------------------------
    def conv_bn_stats_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in):
        if not self._runs(x, weight, groups, dilation):
            return super().conv_bn_stats_forward(x, weight, bias, stride, padding, dilation,
                                                 groups, in_center, in_scale, in_shift, act_in)
        conv, ew = _kernels()
        if self._unfused:
            fmt = memory_format_of(x)
            p = self._prologue(x, in_center, in_scale, in_shift, act_in, fmt)
            z, _ = conv.conv_launch(p, weight, bias, stride, padding, None, None, None, "none",
                                    memory_format=fmt)
            mean, var = ew.channel_stats(z)
            return z, mean, var
        z, parts = self._stats_conv(x, weight, bias, stride, padding, in_center, in_scale,
                                    in_shift, act_in)
        mean, var = ew.stats_finalize(parts, weight.shape[0])
        return z, mean, var

    def _stats_conv(self, x, weight, bias, stride, padding, in_center, in_scale, in_shift,
                    act_in):
        """The fused conv with its statistics epilogue: (z, its per-tile partials)."""
        conv, _ = _kernels()
        return conv.conv_launch(x, weight, bias, stride, padding, in_center, in_scale, in_shift,
                                act_in, stats=True, memory_format=memory_format_of(x),
                                tma=self._tma)

    def conv_bn_train_forward(self, x, weight, bias, stride, padding, dilation, groups,
                              in_center, in_scale, in_shift, act_in, bn_weight, eps,
                              running_mean, running_var, num_batches_tracked, momentum, count):
        # The BatchNorm's scale and running update in the statistics' last launch, where that
        # launch exists (a fused conv of a non-empty batch) and its kernel takes the update (a
        # momentum, buffers it can write in place); else the two steps (also where a subclass
        # overrides either, whose override the merged launch would skip).
        if (self._unfused or momentum is None or count == 0
                or not runs_own(self, TritonBackend, "conv_bn_stats_forward",
                                 "bn_scale_and_update")
                or not self._runs(x, weight, groups, dilation)
                or in_place_reason(x, running_mean, running_var, float32_only=False)
                is not None):
            return super().conv_bn_train_forward(
                x, weight, bias, stride, padding, dilation, groups, in_center, in_scale,
                in_shift, act_in, bn_weight, eps, running_mean, running_var,
                num_batches_tracked, momentum, count)
        _, ew = _kernels()
        z, parts = self._stats_conv(x, weight, bias, stride, padding, in_center, in_scale,
                                    in_shift, act_in)
        mean, var, scale = ew.stats_finalize(
            parts, weight.shape[0], bn=(bn_weight, eps, running_mean, running_var,
                                        num_batches_tracked, momentum, count))
        return z, mean, var, scale

    # ---- channel_stats --------------------------------------------------------------------
    def channel_stats_forward(self, x):
        if not self._runs(x):
            return super().channel_stats_forward(x)
        _, ew = _kernels()
        return ew.channel_stats(x)

    def channel_stats_backward(self, gmean, gvar, x, mean):
        if not self._runs(x):
            return super().channel_stats_backward(gmean, gvar, x, mean)
        _, ew = _kernels()
        return ew.stats_backward(None, gmean, gvar, x, mean, x.dtype, memory_format_of(x))

    # ---- epilogue -------------------------------------------------------------------------
    def epilogue_forward(self, z, center, scale, shift, act_mid, residual, res_scale,
                         branch_scale, act_out):
        if not self._runs(z):
            return super().epilogue_forward(z, center, scale, shift, act_mid, residual,
                                            res_scale, branch_scale, act_out)
        _, ew = _kernels()
        return ew.epilogue_forward(z, center, scale, shift, act_mid, residual, res_scale,
                                   branch_scale, act_out, memory_format_of(z))

    def epilogue_backward(self, gy, saved, needs):
        s = saved
        z, center, scale, shift = s["z"], s["center"], s["scale"], s["shift"]
        if not self._runs(z):
            return super().epilogue_backward(gy, saved, needs)
        _, ew = _kernels()
        gz, gr, sum_g, sum_gt, g_center = ew.epilogue_backward(
            gy, z, s["y"], center, scale, shift, s["branch_scale"], s["act_mid"], s["act_out"],
            s["res_scale"], s["residual_dtype"], need_gt=needs["z"],
            need_gr=needs["residual"],
            need_sum=(needs["shift"] and shift is not None)
            or (needs["center"] and center is not None),
            need_sum_t=needs["scale"] and scale is not None, fmt=memory_format_of(z))
        return {"residual": gr, "z": gz, **_affine_grads(sum_g, sum_gt, g_center, center,
                                                         scale, shift, needs,
                                                         ("center", "scale", "shift"))}

    def bn_epilogue_backward(self, gy, saved, needs, var, bn_weight, eps, need_var,
                             need_weight):
        s = saved
        z, center, scale, shift = s["z"], s["center"], s["scale"], s["shift"]
        _, ew = _kernels()
        # Merged only where the launch is direct: a backward under a dispatch mode (a flop
        # counter) or compiled autograd takes the ops' custom ops, which have no merged form.
        if not (self._runs(z) and needs["scale"] and scale is not None
                and runs_own(self, TritonBackend, "epilogue_backward", "bn_scale_backward")
                and ew._direct((gy, z, s["y"], center, scale, shift, s["branch_scale"], var,
                                bn_weight))):
            return super().bn_epilogue_backward(gy, saved, needs, var, bn_weight, eps,
                                                need_var, need_weight)
        # The BatchNorm's scale gradient in the programs that add up the pass's sums.
        gz, gr, sum_g, sum_gt, g_center, gv, gw = ew.epilogue_backward(
            gy, z, s["y"], center, scale, shift, s["branch_scale"], s["act_mid"], s["act_out"],
            s["res_scale"], s["residual_dtype"], need_gt=needs["z"],
            need_gr=needs["residual"],
            need_sum=(needs["shift"] and shift is not None)
            or (needs["center"] and center is not None),
            need_sum_t=True, fmt=memory_format_of(z),
            bn=(var, bn_weight, eps, need_var, need_weight))
        return ({"residual": gr, "z": gz, **_affine_grads(sum_g, sum_gt, g_center, center,
                                                          scale, shift, needs,
                                                          ("center", "scale", "shift"))},
                gv, gw)

    # ---- a train-mode BatchNorm's scale and running statistics: one launch each -----------
    def bn_scale_forward(self, var, weight, eps):
        if not self._runs(var):
            return super().bn_scale_forward(var, weight, eps)
        return _bn_kernels().bn_scale(var, weight, eps)

    def bn_scale_backward(self, g, var, weight, eps, need_var, need_weight):
        if not self._runs(var):
            return super().bn_scale_backward(g, var, weight, eps, need_var, need_weight)
        return _bn_kernels().bn_scale_backward(g, var, weight, eps, need_var, need_weight)

    def _updates_in_place(self, var, running_mean, running_var) -> bool:
        # The kernel updates the buffers through their pointers: contiguous, on var's device.
        if not self._runs(var):
            return False  # (the op's resolution warned)
        reason = in_place_reason(var, running_mean, running_var, float32_only=False)
        if reason is not None:
            warn_once(f"the triton backend's running-statistics update: {reason}")
            return False
        return True

    def bn_update_running(self, mean, var, running_mean, running_var, num_batches_tracked,
                          momentum, count):
        if not self._updates_in_place(var, running_mean, running_var):
            return super().bn_update_running(mean, var, running_mean, running_var,
                                             num_batches_tracked, momentum, count)
        _bn_kernels().bn_update_running(mean, var, running_mean, running_var,
                                        num_batches_tracked, momentum, count)

    def bn_scale_and_update(self, var, weight, eps, mean, running_mean, running_var,
                            num_batches_tracked, momentum, count):
        if not self._updates_in_place(var, running_mean, running_var):
            return super().bn_scale_and_update(var, weight, eps, mean, running_mean,
                                               running_var, num_batches_tracked, momentum,
                                               count)
        return _bn_kernels().bn_update_running(mean, var, running_mean, running_var,
                                               num_batches_tracked, momentum, count,
                                               scale_of=(weight, eps))

    # ---- the reference's primitives, in Triton (conv_bn_stats_backward is inherited) -------
    def _prologue_apply(self, x, center, scale, shift, act):
        if not self._runs(x):
            return super()._prologue_apply(x, center, scale, shift, act)
        return self._prologue(x, center, scale, shift, act, memory_format_of(x))

    def _prologue_grads(self, gp, x, center, scale, shift, act, needs):
        if not self._runs(x):
            return super()._prologue_grads(gp, x, center, scale, shift, act, needs)
        return self._prologue_backward(gp, x, center, scale, shift, act, needs,
                                       memory_format_of(x))

    def _stats_grad(self, gz, gmean, gvar, z, mean):
        if not self._runs(z):
            return super()._stats_grad(gz, gmean, gvar, z, mean)
        _, ew = _kernels()
        return ew.stats_backward(gz, gmean, gvar, z, mean, z.dtype, memory_format_of(z))

    # ---- prologue helpers (the backward recomputes p rather than saving it) ---------------
    def _prologue(self, x, center, scale, shift, act, fmt):
        """p = act((x - center) * scale + shift) in x's dtype, one elementwise pass."""
        if center is None and scale is None and shift is None and act != "relu":
            return x
        _, ew = _kernels()
        return ew.epilogue_forward(x, center, scale, shift, act, None, 1.0, None, "none", fmt)

    def _prologue_backward(self, gp, x, center, scale, shift, act, needs, fmt):
        """Gradients of _prologue w.r.t. (x, center, scale, shift) given dL/dp."""
        has_affine = center is not None or scale is not None or shift is not None
        if not has_affine and act != "relu":
            return (gp if needs["x"] else None), None, None, None
        _, ew = _kernels()
        gx, _, sum_g, sum_gt, g_center = ew.epilogue_backward(
            gp, x, None, center, scale, shift, None, act, "none", 1.0, None,
            need_gt=needs["x"], need_gr=False,
            need_sum=(needs["in_shift"] and shift is not None)
            or (needs["in_center"] and center is not None),
            need_sum_t=needs["in_scale"] and scale is not None, fmt=fmt)
        g = _affine_grads(sum_g, sum_gt, g_center, center, scale, shift, needs,
                          ("in_center", "in_scale", "in_shift"))
        return gx, g["center"], g["scale"], g["shift"]


def _affine_grads(sum_g, sum_gt, g_center, center, scale, shift, needs, names):
    """dL/dcenter = -scale Σ gu (the kernels' g_center), dL/dscale = Σ gu (t - center),
    dL/dshift = Σ gu."""
    nc, ns, nb = names
    out = {"center": None, "scale": None, "shift": None}
    if needs[nc] and center is not None:
        out["center"] = g_center.to(center.dtype)
    if needs[ns] and scale is not None:
        out["scale"] = sum_gt.to(scale.dtype)
    if needs[nb] and shift is not None:
        out["shift"] = sum_g.to(shift.dtype)
    return out
