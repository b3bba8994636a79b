"""Tensors fused_res made and never writes (the eval fold's weights and shifts), which the
backends may derive cached copies from.

A cache keyed on a tensor's identity and version counter is stale after a write that bypasses
the counter (`t.data.mul_(2)`, `t.numpy()[:] = ...`). A user's tensor can be written that
way at any time, so a backend caches what it derives from a tensor (the Triton conv's weight
matrix, a cuDNN bias cast) only for tensors marked here; everything else is converted per call.
"""

from __future__ import annotations

import weakref

import torch

# id(t) -> weak reference to t; an entry leaves with its tensor.
_MARKED: dict[int, weakref.ref] = {}


def mark_constant(t: torch.Tensor) -> torch.Tensor:
    """Record that fused_res made t and will never write it; returns t."""
    key = id(t)
    _MARKED[key] = weakref.ref(t, lambda _, k=key: _MARKED.pop(k, None))
    return t


def is_constant(t: torch.Tensor | None) -> bool:
    """Whether t was marked by mark_constant (the very tensor, not a view or a copy)."""
    ref = _MARKED.get(id(t))
    return ref is not None and ref() is t
