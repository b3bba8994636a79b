"""Which modules carry hooks. A fused block or stem computes its children's work itself and
never calls their forward, so hooks on them would not fire, nor would a forward set on a
child instance: convert() leaves a block whose children have hooks alone, and a fused block
or stem that finds hooks added later runs its original modules instead. Hooks registered
for every module (torch.nn.modules.module.register_module_forward_hook and its kin) count
as hooks on each."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

GLOBAL = "every module (global module hooks)"  # what hooked_child names then


def global_hooks() -> bool:
    """Whether hooks registered for every module are present (the torch.nn.modules.module
    register_module_* functions; torch.utils.module_tracker's, FlopCounterMode's among
    them)."""
    m = _nn_module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or getattr(m, "_global_backward_pre_hooks", None))


def own_hooks(m: nn.Module) -> bool:
    """Whether m has forward, forward-pre, backward or backward-pre hooks of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m.__dict__.get("_backward_pre_hooks"))


def has_hooks(m: nn.Module) -> bool:
    """Whether hooks run when m is called: its own or global ones."""
    return own_hooks(m) or global_hooks()


def own_forward(m: nn.Module) -> bool:
    """Whether m has hooks of its own or a forward set on the instance (accelerate's
    add_hook_to_module, a monkeypatch), which a fused block's child never runs and a fused
    stem would copy with the module's attributes."""
    return own_hooks(m) or "forward" in m.__dict__


def calls_more(m: nn.Module) -> bool:
    """Whether calling m does more than its class's forward: own_forward, or global hooks."""
    return own_forward(m) or global_hooks()


def describe(name: str) -> str:
    """What a hooked_child answer means, for a message."""
    return "global module hooks" if name == GLOBAL else f"hooks on {name} (or an instance forward)"


def hooked_child(module: nn.Module) -> str | None:
    """The name of the first descendant of module (not module itself) that calls_more, or
    None (GLOBAL where global hooks are registered)."""
    if global_hooks() and module._modules:
        return GLOBAL
    for name, m in module.named_modules():
        if name and calls_more(m):
            return name
    return None


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
