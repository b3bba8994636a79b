"""Model surgery: recognise residual blocks, swap in fused ones, revert, report.

Recognised: fused_res.models (ImageNet blocks and every CIFAR variant), torchvision's
BasicBlock/Bottleneck, timm's resnet BasicBlock/Bottleneck (attention before the add,
drop_path, pooled "d" shortcuts) and resnetv2 PreActBasic/PreActBottleneck/Bottleneck; and
the conv -> BatchNorm -> ReLU stem of those ResNets (fused_res/nn/stem.py). The
fused block shares the original's children, so parameters, buffers and state_dict keys are
unchanged; anything not recognised, or recognised but not fusable, is left as it is and the
report says why. Library classes are looked up in sys.modules, never imported here.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from . import models
from .backends import NAMES as BACKEND_NAMES
from .nn import blocks as fblocks
from .nn.conv_bn_act import ConvBNAct2d
from .nn.hooks import calls_more, describe, hooked_child
from .nn.plan import (
    BlockPlan,
    ShortcutPlan,
    conv_reason,
    is_frozen,
    norm_reason,
    padding_reason,
    relu_reason,
    shortcut_plan,
)
from .nn.stem import (
    LINK_ATTR,
    AppliedBatchNorm2d,
    AppliedReLU,
    FusedStemConv,
    StemLink,
    StemState,
    unapply,
    unfuse_stem,
)

Recognized = tuple[type, BlockPlan]


def _first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _fused_class(plan: BlockPlan) -> type:
    n = len(plan.convs)
    if plan.variant == "original":
        return {2: fblocks.BasicBlock, 3: fblocks.Bottleneck}.get(n, fblocks.FusedResidualBlock)
    if plan.variant == "full_preact":
        return {2: fblocks.PreActBasicBlock, 3: fblocks.PreActBottleneck}.get(
            n, fblocks.FusedResidualBlock)
    return fblocks.FusedResidualBlock


def _names(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{k}" for k in range(1, n + 1))


def _check_convs_and_norms(block, convs, norms, norm_act: str = "none") -> str | None:
    return _first_reason(*(conv_reason(getattr(block, c, None)) for c in convs),
                         *(norm_reason(getattr(block, b, None), norm_act) for b in norms))


def _shortcut_reason(sc: ShortcutPlan, block: nn.Module) -> str | None:
    if sc.kind != "unit":
        return None
    return _first_reason(conv_reason(block.get_submodule(sc.conv)),
                         None if sc.norm is None else
                         norm_reason(block.get_submodule(sc.norm), "none"))


def _torchvision_like(block: nn.Module) -> Recognized | str:
    n = 3 if hasattr(block, "conv3") else 2
    convs, norms = _names("conv", n), _names("bn", n)
    reason = _first_reason(_check_convs_and_norms(block, convs, norms),
                           relu_reason(getattr(block, "relu", None)))
    if reason:
        return reason
    plan = BlockPlan("original", convs, norms[:-1], norms[-1], shortcut=shortcut_plan(block))
    return _shortcut_reason(plan.shortcut, block) or (_fused_class(plan), plan)


def _cifar(block: models.CifarBlock) -> Recognized | str:
    n, v = block.num_convs, block.variant
    convs, norms = _names("conv", n), _names("bn", n)
    reason = _check_convs_and_norms(block, convs, norms)
    if reason:
        return reason
    preact = v in ("relu_only_preact", "full_preact")
    sc = shortcut_plan(block, reads_preact=preact and block.shortcut_reads_preact())
    common = {"shortcut": sc}
    if v == "original":
        plan = BlockPlan(v, convs, norms[:-1], norms[-1], **common)
    elif v == "plain":
        plan = BlockPlan(v, convs, norms[:-1], norms[-1], residual=False, **common)
    elif v == "bn_after_add":
        plan = BlockPlan(v, convs, norms[:-1], None, post_norm=norms[-1], **common)
    elif v == "relu_before_add":
        plan = BlockPlan(v, convs, norms[:-1], norms[-1], last_act=True, act_out=False,
                         **common)
    elif v == "relu_only_preact":
        plan = BlockPlan(v, convs, norms[:-1], norms[-1], pre_act=True, act_out=False,
                         **common)
    else:
        plan = BlockPlan(v, convs, norms[1:], None, pre_norm=norms[0], pre_act=True,
                         act_out=False, **common)
    return _shortcut_reason(sc, block) or (_fused_class(plan), plan)


def _timm_resnet(block: nn.Module) -> Recognized | str:
    n = 3 if hasattr(block, "conv3") else 2
    convs, norms = _names("conv", n), _names("bn", n)
    acts = _names("act", n)
    reason = _first_reason(
        _check_convs_and_norms(block, convs, norms),
        *(relu_reason(getattr(block, a, None)) for a in acts),
        None if _is_identity(getattr(block, "drop_block", None)) else
        "DropBlock between conv and activation",
        None if _is_identity(getattr(block, "aa", None)) else "anti-aliased downsampling")
    if reason:
        return reason
    dp = getattr(block, "drop_path", None)
    plan = BlockPlan("original", convs, norms[:-1], norms[-1],
                     attention=None if block.se is None else "se",
                     drop_path=None if _is_identity(dp) else "drop_path",
                     shortcut=shortcut_plan(block))
    return _shortcut_reason(plan.shortcut, block) or (_fused_class(plan), plan)


def _timm_v2_preact(block: nn.Module) -> Recognized | str:
    n = 3 if hasattr(block, "conv3") else 2
    convs, norms = _names("conv", n), _names("norm", n)
    reason = _check_convs_and_norms(block, convs, norms, norm_act="relu")
    if reason:
        return reason
    dp = getattr(block, "drop_path", None)
    plan = BlockPlan("full_preact", convs, norms[1:], None, pre_norm=norms[0], pre_act=True,
                     drop_path=None if _is_identity(dp) else "drop_path",
                     shortcut=shortcut_plan(block, reads_preact=block.downsample is not None),
                     act_out=False)
    return _shortcut_reason(plan.shortcut, block) or (_fused_class(plan), plan)


def _timm_v2_bottleneck(block: nn.Module) -> Recognized | str:
    convs, norms = _names("conv", 3), _names("norm", 3)
    reason = _first_reason(
        _check_convs_and_norms(block, convs, norms[:-1], norm_act="relu"),
        norm_reason(block.norm3, "none"), relu_reason(block.act3))
    if reason:
        return reason
    dp = getattr(block, "drop_path", None)
    plan = BlockPlan("original", convs, norms[:-1], norms[-1],
                     drop_path=None if _is_identity(dp) else "drop_path",
                     shortcut=shortcut_plan(block))
    return _shortcut_reason(plan.shortcut, block) or (_fused_class(plan), plan)


def _recognizers() -> dict[type, Callable[[nn.Module], Recognized | str]]:
    table: dict[type, Callable] = {
        models.BasicBlock: _torchvision_like,
        models.Bottleneck: _torchvision_like,
        models.CifarBlock: _cifar,
    }
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        table[tv.BasicBlock] = table[tv.Bottleneck] = _torchvision_like
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        table[timm_resnet.BasicBlock] = table[timm_resnet.Bottleneck] = _timm_resnet
    timm_v2 = sys.modules.get("timm.models.resnetv2")
    if timm_v2 is not None:
        table[timm_v2.PreActBasic] = table[timm_v2.PreActBottleneck] = _timm_v2_preact
        table[timm_v2.Bottleneck] = _timm_v2_bottleneck
    return table


def recognize(module: nn.Module) -> Recognized | str | None:
    """(fused class, plan) for a block we can fuse; a reason string for a residual block we
    leave alone; None for a module that is not a residual block we know."""
    table = _recognizers()
    fn = table.get(type(module))
    if fn is None:
        # A subclass may override forward or add modules: left alone, but reported.
        base = next((b for b in type(module).__mro__[1:] if b in table), None)
        if base is None:
            return None
        return (f"a subclass of {base.__module__}.{base.__qualname__}, whose forward may "
                "differ: only the recognised classes themselves are fused")
    hooked = hooked_child(module)
    if hooked is not None:
        return (f"{describe(hooked)}: left unfused (a fused block runs its original forward "
                "while they are there)")
    return fn(module)


def _stem_classes() -> dict[type, str]:
    """ResNet classes whose forward runs conv1 -> bn1 -> <act> -> maxpool, with <act>'s
    attribute name."""
    table: dict[type, str] = {models.ResNet: "relu"}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        table[tv.ResNet] = "relu"
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        table[timm_resnet.ResNet] = "act1"
    return table


def _fuse_stem(model: nn.Module, backend: str | None) -> bool:
    """Fuse model's conv1 -> bn1 -> act stem in place where it is a plain zero-padded conv,
    a BatchNorm2d and a ReLU without hooks (timm's deep stems, an nn.Sequential conv1, stay
    as they are). Returns whether it did."""
    act_name = _stem_classes().get(type(model))
    if act_name is None or isinstance(getattr(model, "conv1", None), FusedStemConv):
        return False
    conv, bn, act = (getattr(model, n, None) for n in ("conv1", "bn1", act_name))
    # (A frozen bn1 stays: AppliedBatchNorm2d is a BatchNorm2d's stand-in.)
    if (conv_reason(conv) or norm_reason(bn, "none") or is_frozen(bn) or relu_reason(act)
            or any(calls_more(m) for m in (conv, bn, act))):
        return False
    state = StemState()
    applied = AppliedBatchNorm2d.from_batchnorm(bn, state)
    relu = AppliedReLU(act.inplace, state)
    model._modules["bn1"] = applied
    model._modules[act_name] = relu
    stem = FusedStemConv.from_modules(conv, applied, ("bn1", act_name), act.inplace, backend,
                                      act=relu)
    model._modules["conv1"] = stem
    model.__dict__[LINK_ATTR] = StemLink(model, stem)  # (and the stem's ParentRef)
    return True


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new
    return model


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r}; accepted: None or one of "
                         f"{', '.join(map(repr, BACKEND_NAMES))}")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")


def _check_flag(name: str, value) -> None:
    # A string is truthy: inplace="no" converted the caller's own model.
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}; accepted: True or False")


def convert(model: nn.Module, backend: str | None = "auto", inplace: bool = False,
            filter: Callable[[str, nn.Module], bool] | None = None,
            stem: bool = True) -> nn.Module:
    """Swap every recognised residual block of `model` for a fused one, and (stem=True) fuse
    the conv -> BatchNorm -> ReLU stem of a recognised ResNet.

    backend: the backend the fused blocks use ('auto', 'reference', ...; None: follow
    fused_res.set_backend at run time); blocks that already are fused_res blocks are left as
    they are, their backend included (set their `backend` attribute to change it).
    inplace=False converts a deep copy. filter(name, block) -> bool restricts which blocks
    are converted. Parameters, buffers, state_dict keys
    and what the model computes are unchanged. Returns the converted model.
    """
    _check_model(model)
    _check_flag("inplace", inplace)
    _check_flag("stem", stem)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter={filter!r}; accepted: None or a callable (name, block) -> bool")
    _check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    fused = unfusable = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (fblocks.FusedResidualBlock, ConvBNAct2d)):
            fused += 1  # (built fused: a model of fused_res's own units has nothing to add)
            continue
        found = recognize(module)
        unfusable += isinstance(found, str)
        if found is None or isinstance(found, str):
            continue
        if filter is not None and not filter(name, module):
            continue
        cls, plan = found
        model = _replace(model, name, cls.from_block(module, plan, backend))
        fused += 1
    if stem:
        for module in list(model.modules()):
            fused += isinstance(module, FusedStemConv) or _fuse_stem(module, backend)
    if not fused and filter is None and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # A model of another family (timm's byobnet, regnet, res2net, ...) computes as before;
        # without a word the caller would take it for fused.
        why = (f"its {unfusable} recognised residual block{'s' * (unfusable > 1)} cannot be "
               "(fused_res.format_report(model) says why)" if unfusable else
               "it has no residual block of a recognised class and no recognised ResNet stem")
        warnings.warn(f"fused_res.convert: nothing in this {type(model).__name__} was fused: "
                      f"{why}; it computes as before", stacklevel=2)
    return model


def revert(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Put back the original block of every block that convert() fused, and a fused stem's
    plain conv, BatchNorm and ReLU. Blocks built directly as fused_res.nn modules have no
    original and stay. Returns the model."""
    _check_model(model)
    _check_flag("inplace", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module._modules.get("conv1"), FusedStemConv):
            unfuse_stem(module, module._modules["conv1"])
        else:
            unapply(module)
        # (also where conv1 was replaced since: the link would keep the old stem alive)
        module.__dict__.pop(LINK_ATTR, None)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedStemConv):  # (wrapped since convert(): not conv1)
                module._modules[name] = child.as_conv()
    for name, module in list(model.named_modules()):
        if isinstance(module, fblocks.FusedResidualBlock):
            original = module.original()
            if original is not None:
                model = _replace(model, name, original)
    return model


@dataclass(frozen=True)
class BlockReport:
    """One residual block: where it is, what it is, and whether (and as what) it is fused."""

    name: str
    block_type: str
    fused: bool
    detail: str
    unfused_now: bool = False  # (fused, but running unfused: hooks or a changed child)

    def __str__(self) -> str:
        status = "fused" if self.fused else "unfused"
        return f"{self.name or '<root>'}: {self.block_type} -> {status}: {self.detail}"


def _describe(module: fblocks.FusedResidualBlock) -> tuple[str, bool]:
    """The report's detail for a fused block, and whether it runs unfused now."""
    plan = module.plan
    parts = [f"{plan.variant} as {type(module).__name__}", f"backend={module.backend or 'default'}"]
    sc = plan.shortcut
    parts.append("shortcut=" + {"identity": "identity", "unit": "fused conv+bn" if sc.norm
                                else "fused conv", "module": "module (unfused)"}[sc.kind])
    if plan.attention:
        parts.append(f"{plan.attention} unfused")
    if plan.drop_path:
        parts.append("drop_path")
    if module.shortcut_scale != 1.0:
        parts.append(f"shortcut_scale={module.shortcut_scale:g}")
    replaced = module.replaced_reason()
    hooked = hooked_child(module)
    if replaced is not None:
        built = module.__dict__.get("_original") is None
        parts.append(f"{'cannot run' if built else 'running unfused'}: {replaced}")
    elif hooked is not None:
        parts.append(f"running unfused while {describe(hooked)} are there")
    return ", ".join(parts), replaced is not None or hooked is not None


def report(model: nn.Module) -> list[BlockReport]:
    """Per residual block, in forward order: fused as which variant and backend, or left alone
    and why. str() of each entry is one readable line; see also format_report()."""
    _check_model(model)
    entries = []
    for name, module in model.named_modules():
        if isinstance(module, fblocks.FusedResidualBlock):
            orig = module.__dict__.get("_original")
            kind = type(orig if orig is not None else module)
            detail, unfused_now = _describe(module)
            entries.append(BlockReport(name, f"{kind.__module__}.{kind.__qualname__}", True,
                                       detail, unfused_now))
            continue
        found = recognize(module)
        if found is None:
            continue
        kind = type(module)
        detail = found if isinstance(found, str) else "recognised, not converted"
        entries.append(BlockReport(name, f"{kind.__module__}.{kind.__qualname__}", False,
                                   detail))
    return entries


def _stem_line(name: str, stem: FusedStemConv) -> str:
    (bn_name, act_name), _ = stem.__dict__["_stem"]
    hooked, replaced = stem.hooked(), stem.replaced()
    padding = padding_reason(stem)
    return (f"{name}: stem conv -> {bn_name} -> {act_name} fused, backend={stem.backend}"
            + (f"; running unfused: conv1 was set to {padding}" if padding else "")
            + (f"; running unfused while {hooked} has hooks" if hooked and not padding else "")
            + (f"; running unfused: {replaced} was replaced after convert()"
               if replaced and not hooked and not padding else ""))


def format_report(model: nn.Module) -> str:
    """report(model) as text: a line per fused stem, one per block and a summary line."""
    entries = report(model)
    fused = sum(e.fused for e in entries)
    lines = [_stem_line(name, m) for name, m in model.named_modules()
             if isinstance(m, FusedStemConv)]
    lines += [f"{name + '.' if name else ''}conv1: the fused stem's conv was replaced after "
              "convert(); its BatchNorm and ReLU run unfused"
              for name, m in model.named_modules()
              if not isinstance(m._modules.get("conv1"), FusedStemConv)
              and any(isinstance(c, AppliedBatchNorm2d) for c in m._modules.values())]
    lines += [str(e) for e in entries]
    unfused_now = sum(e.unfused_now for e in entries)
    lines.append(f"{fused}/{len(entries)} residual blocks fused"
                 + (f", {unfused_now} of them running unfused now" if unfused_now else ""))
    return "\n".join(lines)
