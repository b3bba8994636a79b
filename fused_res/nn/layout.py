"""Which modules a fused block was fused with, and whether the ones it holds now still fit.

A fused block computes its plan from its children's parameters and never calls their forward,
so a child replaced after convert() by one that computes something else (a GELU for the ReLU,
a reflect-padded or LoRA conv, a BatchNorm subclass or FrozenBatchNorm2d, a module appended
to the shortcut, a DropPath for an Identity) was silently computed as the old one. The block
keeps the tuple of its descendants (in walk order, None entries included) and compares it
with the current one on every call, identity by identity (a tuple compare: about as cheap as
the hook walk it shares): a like-for-like replacement (same class, and for a conv a padding
the ops can do) is taken in; anything else makes the block run unfused.
"""

from __future__ import annotations

from torch import nn

from .hooks import has_hooks
from .plan import padding_reason

Layout = tuple


def _children(m: nn.Module) -> list:
    """m's (name, child) slots, but a parametrized module's `parametrizations` container: how
    its weight is computed (weight_norm, spectral_norm: the fused ops read the computed
    weight) is not what the block computes."""
    mods = m._modules
    return [(k, v) for k, v in mods.items()
            if k != "parametrizations" or not isinstance(v, nn.ModuleDict)]


def _child_modules(m: nn.Module):
    """_children's modules, reversed (for the walk's stack); no list of pairs where there is
    no parametrization (the walk runs on every call of every block)."""
    mods = m._modules
    if "parametrizations" not in mods:
        return reversed(mods.values())
    return (child for _, child in reversed(_children(m)))


def walk(module: nn.Module) -> tuple[Layout, bool]:
    """module's descendants (None where a child slot holds None), depth first, and whether any
    of them has hooks."""
    out, hooked = [], False
    stack = list(_child_modules(module))
    while stack:
        m = stack.pop()
        out.append(m)
        if m is None:
            continue
        if not hooked and has_hooks(m):
            hooked = True
        if m._modules:
            stack.extend(_child_modules(m))
    return tuple(out), hooked


def _name_of(root: nn.Module, position: int) -> str:
    names = [name for name, _ in _named_walk(root)]
    return names[position] if position < len(names) else f"descendant #{position}"


def _named_walk(module: nn.Module, prefix: str = ""):
    for name, child in _children(module):
        full = f"{prefix}{name}"
        yield full, child
        if child is not None:
            yield from _named_walk(child, full + ".")


def misfit(root: nn.Module, before: Layout, now: Layout) -> str | None:
    """None where `now` differs from `before` only by like-for-like replacements: a module
    of the very same class (for a conv, with a padding the ops can do); else what changed,
    naming the module."""
    for i, (old, new) in enumerate(zip(before, now, strict=False)):  # (the first change)
        if old is new:
            continue
        name = _name_of(root, i)
        if type(old) is not type(new):
            return (f"{name} was replaced by {type(new).__name__} (was "
                    f"{type(old).__name__})")
        if isinstance(new, nn.Conv2d):
            why = padding_reason(new)
            if why is not None:
                return f"{name} was replaced by a conv with {why}"
    if len(before) != len(now):
        where = _name_of(root, min(len(before), len(now)) - 1) if before and now else "it"
        return f"a module was added to or removed from the block (after {where})"
    return None
