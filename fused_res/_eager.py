"""When a call may skip the dispatcher: plain eager mode on plain CPU/CUDA tensors.

The custom ops exist for torch.compile, tracing, fake and meta tensors, subclasses, dispatch
and function modes, functorch transforms; in plain eager mode their dispatch costs tens of
microseconds a call and changes nothing, so the ops (fused_res.ops.library) and the Triton
backend's inner ops call their implementations directly when `plain_eager` says so.
FUSED_RES_EAGER_TWINS=0 (read at import) turns that off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd import forward_ad

ENABLED = os.environ.get("FUSED_RES_EAGER_TWINS", "1") != "0"
_PLAIN = (Tensor, torch.nn.Parameter)
# Asked about a hundred times per training step: the C functions bound once.
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_depth = torch._C._len_torch_dispatch_stack
_jit_tracing = torch._C._is_tracing
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def plain_eager(args) -> bool:
    """Whether nothing about this call needs the dispatcher: not compiling or tracing, no
    torch-function or dispatch mode, every tensor in `args` a plain Tensor or Parameter (not a
    fake, subclass or functorch-wrapped tensor), the first one on the CPU or a CUDA device."""
    if (not ENABLED or torch.compiler.is_compiling() or _jit_tracing()
            or _function_mode() or _dispatch_depth() > 0):
        return False
    first = True
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN or _wrapped(a):
                return False
            if first:
                if not (a.is_cuda or a.is_cpu):
                    return False
                first = False
    return True


def transformed() -> bool:
    """Whether forward-mode AD (a dual level) or a torch.func transform (jvp, grad, vmap, ...)
    is active. The fused kernels have no jvp or batching rule: through the custom ops a
    torch.func.jvp tangent came back silently wrong, so such calls run the reference
    composite instead (fused_res.ops.library.call)."""
    return (forward_ad._current_level >= 0
            or torch._C._functorch.maybe_current_level() is not None)
