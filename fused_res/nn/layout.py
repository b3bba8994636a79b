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
from torch.nn.utils import parametrize

from .hooks import global_hooks, own_forward
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


class _Held:
    """A skipped slot that holds a module (which one, and what is under it, does not count)."""

    def __repr__(self) -> str:
        return "HELD"


HELD = _Held()


def walk(module: nn.Module, skip: frozenset = frozenset()) -> tuple[Layout, bool]:
    """module's descendants (None where a child slot holds None), depth first, with HELD
    for a top-level slot named in `skip` that holds a module (nothing under it), and whether
    any of the rest has hooks or a forward of its own (hooks.calls_more)."""
    out, hooked = [], global_hooks()
    if skip:
        stack = [(m if k not in skip else None if m is None else HELD)
                 for k, m in reversed(_children(module))]
    else:
        stack = list(_child_modules(module))
    while stack:
        m = stack.pop()
        out.append(m)
        if m is None or m is HELD:
            continue
        if not hooked and own_forward(m):
            hooked = True
        if m._modules:
            stack.extend(_child_modules(m))
    return tuple(out), hooked


def named(module: nn.Module, skip: frozenset = frozenset()) -> dict[str, nn.Module | None]:
    """walk(module, skip)'s modules by dotted name (for saying what changed)."""
    out = {}

    def visit(m: nn.Module, prefix: str, top: bool) -> None:
        for name, child in _children(m):
            if top and name in skip:
                out[name] = None if child is None else HELD
                continue
            out[prefix + name] = child
            if child is not None:
                visit(child, f"{prefix}{name}.", False)
    visit(module, "", True)
    return out


def _kind(m: nn.Module | None) -> type:
    """m's class, that before a parametrization (weight_norm makes a ParametrizedConv2d)."""
    return type(m) if m is None else parametrize.type_before_parametrizations(m)


def misfit(before: dict[str, nn.Module | None],
           now: dict[str, nn.Module | None]) -> str | None:
    """None where `now` (named(), the block's modules now) differs from `before` (those it
    was fused with, by name) only by like-for-like replacements: a module of the very same
    class (for a conv, with a padding the ops can do); else what changed, naming it."""
    for name, old in before.items():
        if name not in now:
            return f"{name} was removed"
        new = now[name]
        if new is old:
            continue
        if new is None:
            return f"{name} was set to None"
        if old is None:
            return f"{name} was added"
        if _kind(new) is not _kind(old):
            return f"{name} was replaced by {type(new).__name__} (was {type(old).__name__})"
        if isinstance(new, nn.Conv2d):
            why = padding_reason(new)
            if why is not None:
                return f"{name} was replaced by a conv with {why}"
    added = [name for name in now if name not in before]
    if added:
        return f"{added[0]} was added"
    return None
