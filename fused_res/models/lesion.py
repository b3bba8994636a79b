"""Residual-block discovery and the lesion study of Veit et al. 2016.

A residual block is any module that has a `forward_shortcut_only(x)` method (our blocks) or
whose class has an adapter below (torchvision's and timm's blocks). Adapters are looked up by
class and never import torchvision or timm themselves, so `import fused_res` stays light.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

ShortcutOnly = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _post_act_shortcut_only(act_attr: str) -> ShortcutOnly:
    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        r = x if block.downsample is None else block.downsample(x)
        act = getattr(block, act_attr)
        if isinstance(act, nn.ReLU):
            return F.relu(r)
        # The block's own activation may work in place (timm's SiLU(inplace=True), ...), and r
        # may be the caller's tensor, which the unlesioned block never writes.
        return act(r.clone() if r is x and getattr(act, "inplace", False) else r)
    return run


def _timm_preact_shortcut_only(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if block.downsample is None:
        return x
    return block.downsample(block.norm1(x))


def _foreign_adapters() -> dict[type, ShortcutOnly]:
    """Adapters for the block classes of libraries that are already imported."""
    adapters: dict[type, ShortcutOnly] = {}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        adapters[tv.BasicBlock] = _post_act_shortcut_only("relu")
        adapters[tv.Bottleneck] = _post_act_shortcut_only("relu")
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        adapters[timm_resnet.BasicBlock] = _post_act_shortcut_only("act2")
        adapters[timm_resnet.Bottleneck] = _post_act_shortcut_only("act3")
    timm_v2 = sys.modules.get("timm.models.resnetv2")
    if timm_v2 is not None:
        adapters[timm_v2.PreActBasic] = _timm_preact_shortcut_only
        adapters[timm_v2.PreActBottleneck] = _timm_preact_shortcut_only
        adapters[timm_v2.Bottleneck] = _post_act_shortcut_only("act3")
    return adapters


def _shortcut_only_fn(module: nn.Module, adapters: dict[type, ShortcutOnly]):
    if callable(getattr(type(module), "forward_shortcut_only", None)):
        if getattr(module, "is_residual", True):
            return lambda m, x: m.forward_shortcut_only(x)
        return None
    return adapters.get(type(module))


def shortcut_only_fn(module: nn.Module) -> ShortcutOnly | None:
    """f(module, x): module without its residual branch, or None where module is no
    residual block this module knows."""
    return _shortcut_only_fn(module, _foreign_adapters())


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of `model` in forward order (registration order, which is the
    order in which every supported ResNet calls them)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    adapters = _foreign_adapters()
    return [m for m in model.modules() if _shortcut_only_fn(m, adapters) is not None]


@contextlib.contextmanager
def lesion(model: nn.Module, drop: Iterable[int]) -> Iterator[nn.Module]:
    """Within the context, the blocks `residual_blocks(model)[i]` for i in `drop` return only
    their shortcut path (the residual branch is deleted, as in Veit et al. 2016). The model is
    restored on exit, also on error. Negative indices count from the end."""
    adapters = _foreign_adapters()
    blocks = residual_blocks(model)
    try:
        drop = list(drop)
    except TypeError:
        raise TypeError(f"drop={drop!r}; accepted: an iterable of integer block indices "
                        "(e.g. [3] or range(2, 5))") from None
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no residual blocks to lesion")
    chosen: dict[int, nn.Module] = {}
    for i in drop:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)  # (numpy and 0-dim torch integers too)
        except TypeError:
            raise TypeError(f"drop contains {i!r}; accepted: integer block indices") from None
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"drop contains {i}; accepted: -{len(blocks)} <= i < "
                             f"{len(blocks)} (the model has {len(blocks)} residual blocks)")
        chosen[i % len(blocks)] = blocks[i]
    patched = []
    try:
        for block in chosen.values():
            fn = _shortcut_only_fn(block, adapters)
            had_own = "forward" in block.__dict__
            previous = block.__dict__.get("forward")
            block.forward = (lambda f, b: lambda x: f(b, x))(fn, block)
            patched.append((block, had_own, previous))
        yield model
    finally:
        for block, had_own, previous in reversed(patched):
            if had_own:
                block.forward = previous
            else:
                del block.forward
