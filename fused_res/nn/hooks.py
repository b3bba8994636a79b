"""Which modules carry hooks. A fused block or stem computes its children's work itself and
never calls their forward, so hooks on them would not fire: convert() leaves a block whose
children have hooks alone, and a fused block or stem that finds hooks added later runs its
original modules instead."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def has_hooks(m: nn.Module) -> bool:
    """Whether m has forward, forward-pre, backward or backward-pre hooks of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def hooked_child(module: nn.Module) -> str | None:
    """The name of the first descendant of module (not module itself) with hooks, or None."""
    for name, m in module.named_modules():
        if name and has_hooks(m):
            return name
    return None


def any_child_hooked(module: nn.Module) -> bool:
    """hooked_child(module) is not None, without building names: it runs on every call of a
    fused block (about 3 us for a Bottleneck on the CPU here, against 10 through
    named_modules)."""
    stack = list(module._modules.values())
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if has_hooks(m):
            return True
        if m._modules:
            stack.extend(m._modules.values())
    return False


def share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst takes src's very hook dicts (forward, backward, state-dict: every attribute whose
    name says hook): hooks registered on src fire on dst, and the handles that registered
    them still remove them (a block converted, a stem's module put back by revert())."""
    for key, value in src.__dict__.items():
        if "hook" in key:
            dst.__dict__[key] = value


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """One warning per message for the fused modules' fallbacks; none while torch.compile
    traces (warnings.warn breaks the graph)."""
    if message not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(message)
        warnings.warn(f"fused_res: {message}", stacklevel=3)
