"""Inference plans: a conv_unit call that came down to one kernel launch, launched again for the
next calls like it without the layers above the launch.

Without CUDA graphs, inference at small batches is bound by the host: on H100 run 8 the
ResNet-50 blocks at batch 64 ran 0.85-1.43x eager's speed as launched calls against 1.52-1.76x
as graph replays (benchmarks/results/2026-11-27-h100-run8-bandwidth-train-configs), the
difference being the host path of each conv unit: argument checks, the backend's choice, the
op's dispatch, the launcher's own argument handling. A plan keeps what the first call worked
out (the kernel, its grid, every argument but the input, the residual and the output) and
launches it again.

The same for conv_shortcut_pair (a downsampling block's last conv and projection shortcut),
whose second input x2 takes the residual's place below. A plan runs a call only where that call
would do exactly what the planned one did; otherwise it returns None and the caller runs the op
(conv_unit_planned, conv_shortcut_pair_planned: they plan again). Checked on every call:
- the same weight, bias and vector tensors (the very objects; the backends plan only for
  fused_res's own constants, which nobody writes: the eval fold's) and the same settings,
  compared by type and value;
- an input and a residual of the planned shape, strides, dtype and device, with 32-bit
  offsets (the backend's plan checks those);
- grad mode off, plain eager mode (no torch.compile, trace, dispatch or function mode, torch.func
  transform or forward AD), and autocast's cast of a float32 input as planned (the stem's:
  a plan repeats that cast, and is made for no other);
- the backend in force the same where the call names none, the same object registered under
  its name (register_backend makes a new one), and that backend's switches as they were
  (Backend.plan_switches: the Triton backend's unfused and TMA modes, FUSED_RES_TRITON_TMA
  and FUSED_RES_TRITON_AUTOTUNE, the float32 dot precision);
- with TMA asked for, the input's 16-byte alignment (which decides whether a 1x1 conv takes
  the TMA kernel).

FUSED_RES_PLANS=0 (read at import; ENABLED at run time) turns plans off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..backends import current_backend, get_backend_object, resolve
from ..backends.registry import instance
from . import functional, library

# FUSED_RES_PLANS=0 (read at import): no plans; every call through the op.
ENABLED = os.environ.get("FUSED_RES_PLANS", "1") != "0"


def _same(a, b) -> bool:
    """Whether two argument values are the same: tensors by identity, the rest by type and
    value (True is not 1: the checks that refuse a bool must not be skipped)."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, Tensor):
        return False
    if type(a) in (list, tuple):  # (stride, padding: flat lists of ints)
        return len(a) == len(b) and all(type(u) is type(v) and type(u) not in (list, tuple)
                                        and u == v for u, v in zip(a, b, strict=True))
    return a == b


class _Plan:
    """What the plans of both ops check (see the module docstring)."""

    __slots__ = ("fixed", "current", "name", "backend", "switches", "launch", "cast")

    def _run(self, x, x2, fixed: tuple, backend) -> Tensor | None:
        """launch(x, x2) where this call (x, x2: the tensors filled per call; fixed: the
        rest, as planned) is one the plan covers, else None."""
        if not ENABLED or torch.is_grad_enabled() or type(x) is not Tensor:
            return None
        for u, v in zip(fixed, self.fixed, strict=True):
            if u is not v and not _same(u, v):
                return None
        cast = (functional._autocast_dtype(x) if x.dtype == torch.float32 else None)
        if ((x2 is not None and type(x2) is not Tensor)
                or cast != self.cast
                or (backend is None and current_backend() != self.current)
                or instance(self.name) is not self.backend  # (registered anew since)
                or not library.runs_eagerly(x, x2)):
            return None
        if cast is not None:  # (autocast's cast of a float32 input, as the op makes it)
            x = x.to(cast)
        if self.backend.plan_switches(x.dtype) != self.switches:
            return None
        return self.launch(x, x2)

    @classmethod
    def _make(cls, name: str, launch, x: Tensor, fixed: tuple, backend: str | None,
              requested: str, cast: torch.dtype | None = None):
        plan = cls()
        obj = get_backend_object(name)
        # Lists copied: a caller may change its own in place (its stride) between calls.
        plan.fixed = tuple(list(v) if type(v) is list else v for v in fixed)
        plan.current, plan.name = (requested if backend is None else None), name
        plan.backend, plan.switches, plan.launch = obj, obj.plan_switches(x.dtype), launch
        plan.cast = cast
        return plan


class ConvUnitPlan(_Plan):
    """A planned conv_unit call (see the module docstring). Called with conv_unit's own
    arguments, it returns the output y, or None where this call is not one it covers."""

    __slots__ = ()

    def __call__(self, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                 in_center=None, in_scale=None, in_shift=None, act_in="none", out_scale=None,
                 out_shift=None, act_mid="none", residual=None, res_scale=1.0,
                 branch_scale=None, act_out="none", backend=None) -> Tensor | None:
        return self._run(x, residual, (weight, bias, stride, padding, dilation, groups,
                                       in_center, in_scale, in_shift, act_in, out_scale,
                                       out_shift, act_mid, res_scale, branch_scale, act_out,
                                       backend), backend)


class ConvPairPlan(_Plan):
    """A planned conv_shortcut_pair call; called with that op's own arguments, it returns
    the output, or None where this call is not one it covers."""

    __slots__ = ()

    def __call__(self, x, weight, bias, x2, weight2, bias2, *, stride=1, padding=0,
                 stride2=1, act_out="none", backend=None) -> Tensor | None:
        return self._run(x, x2, (weight, bias, weight2, bias2, stride, padding, stride2,
                                 act_out, backend), backend)


def conv_unit_planned(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1,
                      padding=0, dilation=1, groups: int = 1, in_center: Tensor | None = None,
                      in_scale: Tensor | None = None, in_shift: Tensor | None = None,
                      act_in: str = "none", out_scale: Tensor | None = None,
                      out_shift: Tensor | None = None, act_mid: str = "none",
                      residual: Tensor | None = None, res_scale: float = 1.0,
                      branch_scale: Tensor | None = None, act_out: str = "none",
                      backend: str | None = None) -> tuple[Tensor, ConvUnitPlan | None]:
    """fused_res.ops.conv_unit(...) (same arguments, same y), and a ConvUnitPlan for the next
    calls like this one where the backend has one for it (an inference call, no gradient,
    of a backend that plans: the Triton backend, on constant tensors), else None."""
    args = functional.conv_unit_args(x, weight, bias, stride, padding, dilation, groups,
                                     in_center, in_scale, in_shift, act_in, out_scale,
                                     out_shift, act_mid, residual, res_scale, branch_scale,
                                     act_out)
    requested = backend if backend is not None else current_backend()
    # (args[0], args[14]: the input and residual as the op gets them. A plan repeats
    # autocast's cast of a float32 input (the model's input, at the stem), and no other:
    # not a residual cast to the input's dtype, nor the weight's.)
    cast = args[0].dtype if args[0] is not x and x.dtype == torch.float32 else None
    if (not ENABLED or torch.is_grad_enabled() or requested == "auto"
            or args[14] is not residual or (args[0] is not x and cast is None)
            or (cast is not None and functional._autocast_dtype(x) != cast)
            or args[1] is not weight or not library.runs_eagerly(x, residual)):
        return functional.run_conv_unit(args, backend), None
    name = resolve(requested, args[0], args[1], args[6], tuple(args[5]))
    obj = get_backend_object(name)
    y, launch = obj.conv_unit_plan(*args)
    if launch is None:
        return y, None
    return y, ConvUnitPlan._make(name, launch, args[0], (weight, bias, stride, padding,
                                                        dilation, groups, in_center, in_scale,
                                                        in_shift, act_in, out_scale, out_shift,
                                                        act_mid, res_scale, branch_scale,
                                                        act_out, backend),
                                 backend, requested, cast)


def conv_shortcut_pair_planned(x: Tensor, weight: Tensor, bias: Tensor | None, x2: Tensor,
                               weight2: Tensor, bias2: Tensor | None, *, stride=1, padding=0,
                               stride2=1, act_out: str = "none", backend: str | None = None
                               ) -> tuple[Tensor, ConvPairPlan | None]:
    """fused_res.ops.conv_shortcut_pair(...) (same arguments, same output), and a
    ConvPairPlan for the next calls like this one where the backend has one (as
    conv_unit_planned), else None."""
    args = functional.conv_shortcut_pair_args(x, weight, bias, x2, weight2, bias2, stride,
                                              padding, stride2, act_out)
    requested = backend if backend is not None else current_backend()
    name = resolve(requested, args[0], args[1])
    obj = get_backend_object(name)
    if (not ENABLED or torch.is_grad_enabled() or requested == "auto" or args[0] is not x
            or args[5] is not x2 or args[1] is not weight or args[6] is not weight2
            or not library.runs_eagerly(x, x2)):
        return obj.conv_pair_forward(*args), None
    y, launch = obj.conv_pair_plan(*args)
    if launch is None:
        return y, None
    return y, ConvPairPlan._make(name, launch, x, (weight, bias, weight2, bias2, stride,
                                                  padding, stride2, act_out, backend),
                                 backend, requested)


def run(store, owner, planned, *args, **kwargs) -> Tensor:
    """The op call `planned` plans (conv_unit_planned, conv_shortcut_pair_planned), through
    the plan store[owner] holds where it covers this call, else through the op, keeping the
    plan it makes in store (a weak mapping: one per module) or dropping the old one."""
    plan = store.get(owner)
    y = None if plan is None else plan(*args, **kwargs)
    if y is None:
        y, plan = planned(*args, **kwargs)
        if plan is not None:
            store[owner] = plan
        else:
            store.pop(owner, None)
    return y
