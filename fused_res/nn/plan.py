"""What a fused block computes, as data: which children play which role in the conv unit.

A BlockPlan names children (dotted paths relative to the block); the executor in blocks.py
reads the modules at run time, so the plan holds no tensors and never goes stale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ShortcutPlan:
    """How the shortcut r is computed.

    kind: "identity" (r = input), "unit" (optional pool, then conv, then optional BN, run
    through the ops) or "module" (call the module as it is, e.g. option A's PadShortcut).
    reads_preact: the shortcut takes the pre-activated input (pre-activation blocks), whatever
    its kind (an identity shortcut then adds the pre-activated input itself).
    """

    kind: str = "identity"
    module: str | None = None
    pool: str | None = None
    conv: str | None = None
    norm: str | None = None
    reads_preact: bool = False


@dataclass(frozen=True)
class BlockPlan:
    """The residual unit as a chain of convs with BN+ReLU between them:

        h = pre_norm/pre_act(x)                       (pre-activation variants)
        z_k = conv_k(h); h = relu(mid_norm_k(z_k))     for all but the last conv
        u = last_norm(conv_last(h)); u = relu(u) if last_act
        u = attention(u)                               (SE/ECA-style, unfused)
        w = drop_path_mask * u + shortcut_scale * r    (when residual)
        y = relu(post_norm(w)) / relu(w) / w           (post_norm: BN after addition)
    """

    variant: str
    convs: tuple[str, ...]
    mid_norms: tuple[str, ...]
    last_norm: str | None
    pre_norm: str | None = None
    pre_act: bool = False
    last_act: bool = False
    attention: str | None = None
    drop_path: str | None = None
    shortcut: ShortcutPlan = ShortcutPlan()
    residual: bool = True
    post_norm: str | None = None
    act_out: bool = True

    def __post_init__(self) -> None:
        if len(self.mid_norms) != len(self.convs) - 1:
            raise ValueError(f"BlockPlan: {len(self.convs)} convs need {len(self.convs) - 1} "
                             f"mid_norms; got {self.mid_norms}")


_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.Identity)


def shortcut_plan(block: nn.Module, name: str = "downsample",
                  reads_preact: bool = False) -> ShortcutPlan:
    """Recognize block.<name>: None -> identity; Sequential([pool,] Conv2d[, BatchNorm2d]) or
    timm's DownsampleConv/DownsampleAvg -> a fused unit; anything else is called as it is."""
    module = getattr(block, name, None)
    if module is None:
        return ShortcutPlan("identity", reads_preact=reads_preact)
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        pool = None
        if children and isinstance(children[0][1], _POOLS) and len(children) > 1:
            pool = None if isinstance(children[0][1], nn.Identity) else f"{name}.{children[0][0]}"
            children = children[1:]
        if 1 <= len(children) <= 2 and conv_reason(children[0][1]) is None:
            norm = None
            if len(children) == 2:
                if norm_reason(children[1][1], "none") is not None:
                    return ShortcutPlan("module", module=name, reads_preact=reads_preact)
                norm = f"{name}.{children[1][0]}"
            return ShortcutPlan("unit", module=name, pool=pool, conv=f"{name}.{children[0][0]}",
                                norm=norm, reads_preact=reads_preact)
    if type(module).__name__ in ("DownsampleConv", "DownsampleAvg") and \
            conv_reason(getattr(module, "conv", None)) is None:
        pool = getattr(module, "pool", None)
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity) and \
                norm_reason(norm, "none") is not None:
            return ShortcutPlan("module", module=name, reads_preact=reads_preact)
        return ShortcutPlan(
            "unit", module=name,
            pool=None if pool is None or isinstance(pool, nn.Identity) else f"{name}.pool",
            conv=f"{name}.conv",
            norm=None if norm is None or isinstance(norm, nn.Identity) else f"{name}.norm",
            reads_preact=reads_preact)
    return ShortcutPlan("module", module=name, reads_preact=reads_preact)


# (class name, module) of the frozen BatchNorms: eval-mode BatchNorms whatever their training
# flag, weight and bias kept as buffers (torchvision's detection backbones, timm's freeze());
# the last two carry timm's activation as BatchNormAct2d does.
_FROZEN = {("FrozenBatchNorm2d", "torchvision.ops.misc"),
           ("FrozenBatchNorm2d", "timm.layers.norm_act"),
           ("FrozenBatchNormAct2d", "timm.layers.norm_act")}


def is_frozen(m: nn.Module | None) -> bool:
    """Whether m is one of the frozen BatchNorms (the class itself, not a subclass):
    y = (x - running_mean) * weight * rsqrt(running_var + eps) + bias, in training too."""
    t = type(m)
    return (t.__name__, t.__module__) in _FROZEN


def norm_reason(m: nn.Module | None, act: str) -> str | None:
    """None if `m` is a BatchNorm2d the ops can run (followed by `act`, when the norm layer
    carries its own activation as timm's BatchNormAct2d does), or a frozen one (is_frozen);
    else why not."""
    if m is None:
        return "missing norm layer"
    if isinstance(m, nn.SyncBatchNorm):
        return ("SyncBatchNorm is left unfused: its statistics are all-reduced across ranks, "
                "which the fused ops do not do")
    name = type(m).__name__
    if type(m) is nn.BatchNorm2d or (is_frozen(m) and not name.endswith("Act2d")):
        return None if act == "none" else f"expected a BatchNorm with {act}, got a bare one"
    if (name == "BatchNormAct2d" and isinstance(m, nn.BatchNorm2d)) or is_frozen(m):
        drop = getattr(m, "drop", None)
        if drop is not None and not isinstance(drop, nn.Identity):
            return f"{name} with dropout"
        a = getattr(m, "act", None)
        kind = "relu" if type(a) is nn.ReLU else "none" if (a is None or
                                                               isinstance(a, nn.Identity)) \
            else type(a).__name__
        return None if kind == act else f"norm activation is {kind}, fused kernels do {act}"
    if isinstance(m, nn.BatchNorm2d):
        return (f"{type(m).__name__} is a subclass of nn.BatchNorm2d, whose forward may "
                "differ")
    return f"{type(m).__name__} is not a BatchNorm2d"


def conv_reason(m: nn.Module | None) -> str | None:
    """None if `m` is a plain zero-padded nn.Conv2d; else why not."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a plain nn.Conv2d"
    return padding_reason(m)


def explicit_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """m's zero padding as the (top/bottom, left/right) ints the ops take: its own ints,
    'valid' as 0, 'same' as half the span where the span is odd; None where no symmetric
    padding is the same (an even span under 'same' pads one side more)."""
    p = m.padding
    if type(p) is not str:
        return p
    if p == "valid":
        return 0, 0
    spans = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation, strict=True)]
    if any(s % 2 for s in spans):
        return None
    return spans[0] // 2, spans[1] // 2


def padding_reason(m: nn.Conv2d) -> str | None:
    """None where the ops can pad as m does (zeros: ints, 'valid', 'same' of an odd span),
    else why not."""
    if m.padding_mode != "zeros":
        return f"padding {m.padding!r} with padding_mode {m.padding_mode!r}"
    if explicit_padding(m) is None:
        return (f"padding {m.padding!r} with kernel_size {tuple(m.kernel_size)} and dilation "
                f"{tuple(m.dilation)} pads one side more than the other")
    return None


def _computes_forward_of(m: nn.Module, base: type) -> bool:
    """m is a `base` whose class computes base's forward: the class itself, or a subclass
    that only adds (a norm_layer with other defaults, torch.nn.utils.parametrize's
    Parametrized* classes) and overrides nothing the forward calls."""
    return isinstance(m, base) and type(m).forward is base.forward


def built_conv_reason(m: nn.Module | None) -> str | None:
    """None if the fused ops compute `m` exactly as its own forward does (a zero-padded
    nn.Conv2d, or a subclass that leaves the forward alone), for modules a fused unit is
    built from directly; else why not. (convert() is stricter: conv_reason.)"""
    if not (_computes_forward_of(m, nn.Conv2d)
            and type(m)._conv_forward is nn.Conv2d._conv_forward):
        return f"{type(m).__name__} is not an nn.Conv2d computing nn.Conv2d's forward"
    return padding_reason(m)


def built_norm_reason(m: nn.Module | None) -> str | None:
    """norm_reason(m, "none"), but a BatchNorm2d subclass that leaves the forward alone
    passes (not SyncBatchNorm: its statistics are all-reduced)."""
    why = norm_reason(m, "none")
    if why is not None and _computes_forward_of(m, nn.BatchNorm2d) and not isinstance(
            m, nn.SyncBatchNorm):
        return None
    return why


def relu_reason(m: nn.Module | None) -> str | None:
    return None if type(m) is nn.ReLU else f"activation {type(m).__name__} is not ReLU"
