"""Which modules carry hooks. A fused block or stem computes its children's work itself and
never calls their forward, so hooks on them would not fire: convert() leaves a block whose
children have hooks alone, and a fused block or stem that finds hooks added later runs its
original modules instead."""

from __future__ import annotations

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
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)):
            return True
        if m._modules:
            stack.extend(m._modules.values())
    return False


# The hook dicts a module keeps (torch >= 2.0); those a torch lacks are skipped.
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks", "_is_full_backward_hook")


def share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst takes src's very hook dicts: hooks registered on src fire on dst, and their
    handles still remove them (a module swapped for another on unfusing)."""
    for key in HOOK_DICTS:
        if key in src.__dict__:
            dst.__dict__[key] = src.__dict__[key]
