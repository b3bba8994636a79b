"""Drop-in fused residual blocks.

Each block owns plain nn.Conv2d / nn.BatchNorm2d children under torchvision's names, so
state_dicts, optimizers, hooks, DDP and checkpoints are those of the unfused block. Its forward
runs the BlockPlan through the conv-unit ops (a converted block whose children have hooks runs
its original forward instead, so that they fire):

- eval (running statistics): one conv_unit per conv, BN folded, the residual add and final
  ReLU in the last conv's epilogue; under no_grad, where the backend has the kernel, the last
  conv and a 1x1 projection shortcut as one op (ops.conv_shortcut_pair);
- train (batch statistics): conv_bn_stats per conv, each BN + ReLU applied in the next conv's
  prologue where the backend's fuse_train_prologue says so (the reference's), else in its own
  epilogue pass before it, and one epilogue pass (BN, add, ReLU) at the block output.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from ..models import imagenet
from ..models.lesion import shortcut_only_fn
from . import eval_fold
from .batchnorm import (
    batch_affine,
    frozen_promoted,
    input_affine,
    num_channels,
    running_affine,
    uses_batch_stats,
)
from .hooks import describe, hooked_child, share_hooks, warn_once
from .layout import Layout, misfit, named, walk
from .plan import (
    BlockPlan,
    ShortcutPlan,
    built_conv_reason,
    built_norm_reason,
    explicit_padding,
    padding_reason,
    relu_reason,
    shortcut_plan,
)
from .scripting import NotScriptable
from .unit import RELU_ONLY, Pending, materialize, run_unit


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, each sample's residual branch is
    kept with probability 1 - p and scaled by 1 / (1 - p). Same draw as timm's DropPath."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if (isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float))
                or not 0.0 <= drop_prob < 1.0):
            raise ValueError(f"drop_prob={drop_prob!r}; accepted: a float, 0 <= drop_prob < 1")
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _plain_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d with one group, no dilation and zero padding: what the pair kernel runs."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and explicit_padding(conv) is not None)


def _drop_path_draws(module: nn.Module | None) -> bool:
    """Whether a drop-path module would draw a random mask now (without drawing it)."""
    return (module is not None and not isinstance(module, nn.Identity) and module.training
            and getattr(module, "drop_prob", 1.0) != 0.0)


def _drop_path_scale(module: nn.Module | None, x: Tensor) -> Tensor | None:
    """The per-sample branch scale (N,) a drop-path module would apply now, or None."""
    if not _drop_path_draws(module):
        return None
    ones = torch.ones((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
    return module(ones).reshape(x.shape[0])


_NO_SKIP: frozenset = frozenset()


def _shared_attr(key: str) -> bool:
    """A public attribute a converted block and its original hold alike (shortcut_scale,
    a slot kept as a plain None), as from_block copies them."""
    return not key.startswith("_") and key != "training"


def _block_class_defines(block: nn.Module, name: str) -> bool:
    """Whether `name` is defined by block's class or a base below nn.Module (not by
    nn.Module, whose attributes the fused block has itself)."""
    for klass in type(block).__mro__:
        if klass is nn.Module:
            return False
        if name in vars(klass):
            return True
    return False


class FusedResidualBlock(NotScriptable, nn.Module):
    """A residual block executed through fused_res.ops according to `self.plan`.

    Attributes: plan (BlockPlan), backend (None: the current default, see
    fused_res.set_backend), shortcut_scale (λ). Input (N, C_in, H, W) -> (N, C_out, H', W').
    """

    plan: BlockPlan
    backend: str | None = None
    shortcut_scale: float = 1.0

    # ---- construction from an existing block (fused_res.convert) --------------------------
    @classmethod
    def from_block(cls, block: nn.Module, plan: BlockPlan,
                   backend: str | None = None) -> FusedResidualBlock:
        """A fused block that shares `block`'s children (same parameters, same state_dict
        keys in the same order) and keeps `block` itself, unregistered, for revert()."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in block.__dict__.items():
            if _shared_attr(key):
                new.__dict__[key] = value
        share_hooks(block, new)  # (the block's own hooks fire on the fused block)
        for name, child in block._modules.items():
            new._modules[name] = child
        new.training = block.training
        new.plan = plan
        new.backend = ops.prepare_backend(backend)
        new.shortcut_scale = float(getattr(block, "shortcut_scale", 1.0))
        new.__dict__["_original"] = block
        new._record_layout()
        return new

    def _check_norm_layer(self) -> None:
        """A block built directly: every norm its plan runs must be a BatchNorm2d (the ops
        compute nothing else; a GroupNorm failed in the forward with an AttributeError)."""
        plan = self.plan
        for name in (*plan.mid_norms, plan.last_norm, plan.pre_norm, plan.post_norm,
                     plan.shortcut.norm):
            why = None if name is None else built_norm_reason(self._get(name))
            if why is not None:
                raise ValueError(f"norm_layer built {name} as {type(self._get(name)).__name__}: "
                                 f"{why}; accepted: nn.BatchNorm2d or a frozen one")

    def _check_slots(self) -> None:
        """A block built directly, at its first call: each conv, BatchNorm and ReLU slot holds
        one the ops compute (set since construction, a GELU ran as a ReLU)."""
        plan = self.plan
        checks = [(n, built_conv_reason) for n in (*plan.convs, plan.shortcut.conv) if n]
        checks += [(n, built_norm_reason) for n in (*plan.mid_norms, plan.last_norm,
                                                     plan.pre_norm, plan.post_norm,
                                                     plan.shortcut.norm) if n]
        if "relu" in self._modules:
            checks.append(("relu", relu_reason))
        for name, reason in checks:
            why = reason(self._get(name))
            if why is not None:
                raise TypeError(f"{name} of a {type(self).__name__} built as a fused_res block: "
                                f"{why}; accepted: a plain zero-padded nn.Conv2d, "
                                "nn.BatchNorm2d or nn.ReLU in each place")

    def original(self) -> nn.Module | None:
        """The unfused block this one was converted from (None if built directly), with its
        children and training mode brought up to date."""
        orig = self.__dict__.get("_original")
        if orig is None:
            return None
        for key, value in self.__dict__.items():
            # Set since (shortcut_scale); not the fused block's own (plan, backend).
            if _shared_attr(key) and key in orig.__dict__:
                orig.__dict__[key] = value
        for name in list(orig._modules):
            orig._modules[name] = self._modules.get(name)
        for name, child in self._modules.items():
            if orig._modules.get(name) is not child:
                # A child set since in a slot the original keeps as a plain attribute
                # (torchvision's downsample, timm's drop_path: None, not registered).
                orig.__dict__.pop(name, None)
                orig._modules[name] = child
        orig.training = self.training
        return orig

    def __getattr__(self, name: str):
        """What nn.Module finds (parameters, buffers, children), else a method or class
        attribute of the original block's own class, on the original: timm's
        init_weights(zero_init_last=True) calls zero_init_last() on every module that has
        one, and skipped fused blocks without a word. Children and public attributes such a
        method assigns are taken back into this block (parameters it registers are not)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self.__dict__.get("_original")
            if orig is None or name.startswith("__") or not _block_class_defines(orig, name):
                raise
        value = getattr(self.original(), name)
        if not callable(value) or isinstance(value, type):
            return value

        @functools.wraps(value)
        def through_original(*args, **kwargs):
            out = value(*args, **kwargs)
            self._take_from_original()
            return out
        return through_original

    def _take_from_original(self) -> None:
        """What from_block shares, read again from the original after one of its methods ran
        (else the next original() call would undo a child it replaced)."""
        orig = self.__dict__["_original"]
        for key, value in orig.__dict__.items():
            if _shared_attr(key):
                self.__dict__[key] = value
        mods = self._modules
        for key in [k for k in mods if k not in orig._modules]:
            del mods[key]
        mods.update(orig._modules)

    @property
    def is_residual(self) -> bool:
        return self.plan.residual

    def _get(self, name: str | None) -> nn.Module | None:
        if name is None:
            return None
        # Looked up on every call (a child replaced after construction is honoured): a dict
        # lookup per path component, where get_submodule also type-checks each (3.7 against
        # 0.3 us for "downsample.0" on the CPU here, a few times per block call); its errors
        # where one is missing.
        module = self
        for part in name.split("."):
            module = module._modules.get(part)
            if module is None:
                return self.get_submodule(name)
        return module

    # ---- forward --------------------------------------------------------------------------
    def _shortcut(self, x: Tensor, preact: Tensor | None) -> Tensor:
        sc: ShortcutPlan = self.plan.shortcut
        src = preact if (sc.reads_preact and preact is not None) else x
        if sc.kind == "identity":
            return src
        if sc.kind == "module":
            return self._get(sc.module)(src)
        if sc.pool is not None:
            src = self._get(sc.pool)(src)
        r, _ = run_unit(src, None, self._get(sc.conv), self._get(sc.norm), "none", self.backend)
        return r

    def _projection_pair(self, x: Tensor) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        """The shortcut's (conv, BN) where, in inference, the last conv and the shortcut can
        run as one op (ops.conv_shortcut_pair): a plain 1x1 projection of the block input with
        an eval-mode BN, a last conv (eval-mode BN) whose output goes straight to the add and
        the final act, lambda = 1, no drop path, and a backend with one kernel for the pair.
        Else None."""
        plan, sc = self.plan, self.plan.shortcut
        if (not plan.residual or sc.kind != "unit" or sc.pool is not None or sc.reads_preact
                or sc.norm is None or plan.last_norm is None or plan.last_act
                or plan.attention is not None or plan.post_norm is not None
                or float(self.shortcut_scale) != 1.0 or not eval_fold.applies(x)
                or not ops.fuses_shortcut_conv(self.backend)):
            return None
        conv, norm = self._get(sc.conv), self._get(sc.norm)
        if (uses_batch_stats(norm) or uses_batch_stats(self._get(plan.last_norm))
                or _drop_path_draws(self._get(plan.drop_path))
                or not _plain_conv(conv) or tuple(conv.kernel_size) != (1, 1)
                or explicit_padding(conv) != (0, 0) or not _plain_conv(self._get(plan.convs[-1]))):
            return None
        return conv, norm

    def _run_pair(self, h: Tensor, x: Tensor, pair: tuple[nn.Conv2d, nn.BatchNorm2d]
                  ) -> Tensor | None:
        """The last unit and the projection shortcut in one op, both BNs folded; None where
        either cannot be folded (eval_fold.folded_conv: float16's range)."""
        plan = self.plan
        last = self._get(plan.convs[-1])
        fold = eval_fold.folded_conv(last, self._get(plan.last_norm), h)
        fold2 = eval_fold.folded_conv(pair[0], pair[1], x)
        if fold is None or fold2 is None:
            return None
        (w, b), (w2, b2) = fold, fold2
        kw = {"stride": list(last.stride), "padding": list(explicit_padding(last)),
              "stride2": list(pair[0].stride), "act_out": "relu" if plan.act_out else "none",
              "backend": self.backend}
        # (As run_unit's plans: ops/plans.py. Kept per block, whose last conv the pair is.)
        return ops.plans.run(eval_fold.PAIR_PLANS, self, ops.conv_shortcut_pair_planned,
                             h, w, b, x, w2, b2, **kw)

    def _children_hooked(self, x: Tensor) -> Tensor | None:
        """With hooks on a child (added after convert(): torch.nn.utils.prune, the old
        weight_norm, a feature hook), the original block's forward, whose calls of its children
        fire them; None where they cannot fire (a block built directly has no original), after
        one warning. The original is run through .forward: its hook dicts are this block's,
        which the caller's __call__ has already run."""
        name = hooked_child(self)
        orig = self.original()
        if orig is None:
            warn_once(f"{describe(name)} in a {type(self).__name__} built as a fused_res "
                      "block do not fire: it never calls its children's forward")
            return None
        warn_once(f"{describe(name)} in a fused {type(orig).__name__}: the block runs its "
                  "original modules, unfused, while they are there")
        return orig.forward(x)

    def _skipped_slots(self) -> frozenset:
        """The attention slot (SE, ECA): the block calls it as a module, so a replacement
        there is computed as itself, and only whether it holds one counts. (Not the drop
        path, which the block asks for a per-sample scale, nor a module shortcut, whose
        kind decides what input it reads: either replaced is checked.)"""
        name = self.plan.attention
        return frozenset((name,)) if name and "." not in name else _NO_SKIP

    def _record_layout(self) -> None:
        """Hold later calls to the descendants the block has now (_skipped_slots aside)."""
        skip = self._skipped_slots()
        d = self.__dict__
        d["_layout_skip"] = skip
        d["_layout"] = walk(self, skip)[0]
        d["_layout_named"] = named(self, skip)
        d.pop("_misfit_seen", None)

    def _misfit(self, layout: Layout) -> str | None:
        """None where the block's descendants (`layout`, now) fit its plan: the ones it was
        fused with, or like-for-like replacements (taken in); else what changed. A block
        built directly is held to what it has at its first call (a subclass may add
        modules after the constructor), as is one unpickled from before layouts."""
        d = self.__dict__
        if d.get("_layout_named") is None:
            orig = d.get("_original")
            if orig is None:
                self._check_slots()
                self._record_layout()
                return None
            # Unpickled from before: the original still holds the children it was fused with
            # (as of its last original() call).
            d["_layout_skip"] = self._skipped_slots()
            d["_layout_named"] = named(orig, d["_layout_skip"])
        bad = d.get("_misfit_seen")
        if bad is not None and bad[0] == layout:
            return bad[1]
        why = misfit(d["_layout_named"], named(self, d["_layout_skip"]))
        if why is None:
            self._record_layout()
        else:
            d["_misfit_seen"] = (layout, why)
        return why

    def replaced_reason(self) -> str | None:
        """Which child was replaced by one the block cannot compute, or changed in place so
        (it then runs unfused, or raises where it was built directly), or None."""
        d = self.__dict__
        layout, _ = walk(self, d.get("_layout_skip", _NO_SKIP))
        if layout == d.get("_layout"):
            return self._changed_conv()
        try:
            return self._misfit(layout) or self._changed_conv()
        except TypeError as e:  # (a block built directly: its forward raises this)
            return str(e)

    def _changed_conv(self) -> str | None:
        """A conv of the plan whose padding was set since, in place, to one the ops cannot
        do (padding_mode 'reflect': the ops pad with zeros, and computed it so, silently),
        or None. The layout sees modules replaced, not a module's attributes changed."""
        plan = self.plan
        for name in (*plan.convs, plan.shortcut.conv):
            why = None if name is None else padding_reason(self._get(name))
            if why is not None:
                return f"{name} was set to {why}"
        return None

    def _replaced_child(self, x: Tensor, why: str) -> Tensor:
        """A converted block whose child was replaced by one it cannot compute runs its
        original forward, which calls the new child; a block built directly has none."""
        orig = self.original()
        if orig is None:
            raise TypeError(f"{why}: a {type(self).__name__} built as a fused_res block "
                             "computes only its own kinds of modules; accepted: a plain "
                             "zero-padded nn.Conv2d, nn.BatchNorm2d or nn.ReLU in each place")
        warn_once(f"{why} after convert(): the fused {type(orig).__name__} runs its original "
                  "forward, unfused; revert() and convert() the model to fuse what it can")
        return orig.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        layout, hooked = walk(self, d.get("_layout_skip", _NO_SKIP))
        if layout != d.get("_layout"):
            why = self._misfit(layout)
            if why is not None:
                return self._replaced_child(x, why)
        why = self._changed_conv()
        if why is not None:
            return self._replaced_child(x, why)
        if hooked:
            y = self._children_hooked(x)
            if y is not None:
                return y
        plan, backend = self.plan, self.backend
        pending: Pending | None = None
        if plan.pre_norm is not None:
            pre_norm = self._get(plan.pre_norm)
            if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != num_channels(pre_norm):
                # (else the BN's weight was named as the one of the wrong length)
                raise ValueError(f"x has shape {tuple(x.shape)}; accepted: "
                                 f"{num_channels(pre_norm)} channels, the block's input")
            # (Inference: the BN's affine kept per state of its statistics, eval_fold.affine.)
            pending = Pending(eval_fold.affine(pre_norm, x)
                              if not uses_batch_stats(pre_norm) and eval_fold.applies(x)
                              else input_affine(pre_norm, x, backend), "relu")
        elif plan.pre_act:
            pending = Pending(RELU_ONLY, "relu")

        # A backend may prefer training BatchNorms applied in their own pass rather than in
        # the next conv's prologue (Backend.fuse_train_prologue).
        fuse = ops.fuses_train_prologue(backend)
        shared = pending is not None and plan.residual and plan.shortcut.reads_preact
        h, r = x, None
        if shared or (pending is not None and not fuse and plan.pre_norm is not None
                      and uses_batch_stats(self._get(plan.pre_norm))):
            # Eager computes the pre-activation once for both paths; so do we.
            h = materialize(x, pending, backend)
            pending = None
        pair = self._projection_pair(x)
        if plan.residual and pair is None:
            r = self._shortcut(x, h if shared else None)

        convs = [self._get(n) for n in plan.convs]
        for conv, norm in zip(convs[:-1], plan.mid_norms, strict=True):
            h, pending = run_unit(h, pending, conv, self._get(norm), "relu", backend,
                                  defer=fuse)
        if pair is not None:
            # (pending None is what inference leaves: every BN folded, nothing deferred)
            y = self._run_pair(h, x, pair) if pending is None else None
            if y is not None:
                return frozen_promoted(y, self._get(plan.last_norm))
            r = self._shortcut(x, None)

        tail = {}
        if plan.residual:
            tail = {"residual": r, "res_scale": float(self.shortcut_scale),
                    "branch_scale": _drop_path_scale(self._get(plan.drop_path), x)}
        act_mid = "relu" if plan.last_act else "none"
        last_norm = self._get(plan.last_norm)
        if plan.attention is None and plan.post_norm is None:
            tail["act_out"] = "relu" if plan.act_out else "none"
            y, _ = run_unit(h, pending, convs[-1], last_norm, act_mid, backend, tail=tail)
            return frozen_promoted(y, last_norm)
        u, _ = run_unit(h, pending, convs[-1], last_norm, act_mid, backend)
        if plan.attention is not None:
            u = self._get(plan.attention)(u)
        if plan.post_norm is None:
            return frozen_promoted(ops.epilogue(u, act_out="relu" if plan.act_out else "none",
                                                backend=backend, **tail), last_norm)
        w = ops.epilogue(u, backend=backend, **tail) if tail else u
        pn = self._get(plan.post_norm)
        if uses_batch_stats(pn):
            mean, var = ops.channel_stats(w, backend=backend)
            aff = batch_affine(pn, mean, var, w.shape, backend)
        else:
            aff = eval_fold.affine(pn, w) if eval_fold.applies(w) else running_affine(pn, w)
        return frozen_promoted(ops.epilogue(w, aff.scale, aff.shift, center=aff.center,
                                            act_mid="relu" if plan.act_out else "none",
                                            backend=backend), pn)

    def forward_shortcut_only(self, x: Tensor) -> Tensor:
        """The block with its residual branch removed (Veit et al. 2016 lesion); eager ops."""
        plan = self.plan
        if not plan.residual:
            raise ValueError("a plain block has no shortcut to fall back to")
        why = self.replaced_reason()
        orig = self.original() if why is not None else None
        fn = shortcut_only_fn(orig) if orig is not None else None
        if fn is not None:
            # (the plan's shortcut may no longer be the block's: an appended module)
            warn_once(f"{why} after convert(): the lesioned {type(orig).__name__} runs its "
                      "original's shortcut")
            return fn(orig, x)
        preact = None
        if plan.shortcut.reads_preact:
            preact = F.relu(self._get(plan.pre_norm)(x)) if plan.pre_norm else F.relu(x)
        r = self._shortcut(x, preact) * float(self.shortcut_scale)
        if plan.post_norm is not None:
            r = self._get(plan.post_norm)(r)
        return F.relu(r) if plan.act_out else r

    def extra_repr(self) -> str:
        return f"fused={self.plan.variant!r}, backend={self.backend!r}"


def _post_act_plan(block: nn.Module, n_convs: int, variant: str = "original") -> BlockPlan:
    convs = tuple(f"conv{k}" for k in range(1, n_convs + 1))
    norms = tuple(f"bn{k}" for k in range(1, n_convs + 1))
    return BlockPlan(variant, convs, norms[:-1], norms[-1],
                     drop_path="drop_path" if hasattr(block, "drop_path") else None,
                     shortcut=shortcut_plan(block))


def _check_scale_and_drop(shortcut_scale: float, drop_path: float) -> None:
    if isinstance(shortcut_scale, bool) or not isinstance(shortcut_scale, (int, float)):
        raise TypeError(f"shortcut_scale={shortcut_scale!r}; accepted: a float (λ)")
    if not math.isfinite(shortcut_scale):  # (as the reference CIFAR block refuses it)
        raise ValueError(f"shortcut_scale={shortcut_scale!r}; accepted: a finite float (λ)")
    if (isinstance(drop_path, bool) or not isinstance(drop_path, (int, float))
            or not 0.0 <= drop_path < 1.0):
        raise ValueError(f"drop_path={drop_path!r}; accepted: a float rate, "
                         "0 <= drop_path < 1")


class BasicBlock(FusedResidualBlock, imagenet.BasicBlock):
    """Fused torchvision BasicBlock: conv3x3-BN-ReLU, conv3x3-BN, + λ·shortcut, ReLU.
    Same constructor and children as torchvision's; shortcut_scale (λ), drop_path (rate) and
    backend are extra keyword arguments."""

    def __init__(self, *args, shortcut_scale: float = 1.0, drop_path: float = 0.0,
                 backend: str | None = None, **kwargs) -> None:
        imagenet.BasicBlock.__init__(self, *args, **kwargs)
        _check_scale_and_drop(shortcut_scale, drop_path)
        if drop_path:
            self.drop_path = DropPath(drop_path)
        self.shortcut_scale, self.backend = float(shortcut_scale), ops.prepare_backend(backend)
        self.plan = _post_act_plan(self, 2)
        self._check_norm_layer()

    forward = FusedResidualBlock.forward
    forward_shortcut_only = FusedResidualBlock.forward_shortcut_only


class Bottleneck(FusedResidualBlock, imagenet.Bottleneck):
    """Fused torchvision Bottleneck (v1.5): 1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1-BN,
    + λ·shortcut, ReLU. Constructor as torchvision's plus shortcut_scale, drop_path, backend."""

    def __init__(self, *args, shortcut_scale: float = 1.0, drop_path: float = 0.0,
                 backend: str | None = None, **kwargs) -> None:
        imagenet.Bottleneck.__init__(self, *args, **kwargs)
        _check_scale_and_drop(shortcut_scale, drop_path)
        if drop_path:
            self.drop_path = DropPath(drop_path)
        self.shortcut_scale, self.backend = float(shortcut_scale), ops.prepare_backend(backend)
        self.plan = _post_act_plan(self, 3)
        self._check_norm_layer()

    forward = FusedResidualBlock.forward
    forward_shortcut_only = FusedResidualBlock.forward_shortcut_only


def _preact_plan(block: nn.Module, n_convs: int) -> BlockPlan:
    convs = tuple(f"conv{k}" for k in range(1, n_convs + 1))
    norms = tuple(f"bn{k}" for k in range(1, n_convs + 1))
    return BlockPlan("full_preact", convs, norms[1:], None, pre_norm=norms[0], pre_act=True,
                     drop_path="drop_path" if hasattr(block, "drop_path") else None,
                     shortcut=shortcut_plan(block, reads_preact=block.downsample is not None),
                     act_out=False)


class _PreActBase(FusedResidualBlock):
    n_convs = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm_layer=None, *,
                 shortcut_scale: float = 1.0, drop_path: float = 0.0,
                 backend: str | None = None) -> None:
        super().__init__()
        _check_scale_and_drop(shortcut_scale, drop_path)
        norm_layer = norm_layer or nn.BatchNorm2d
        out = planes * self.expansion
        if self.n_convs == 2:
            chans, strides, kernels = [inplanes, planes, planes], [stride, 1], [3, 3]
        else:
            chans, strides, kernels = [inplanes, planes, planes, out], [1, stride, 1], [1, 3, 1]
        layers = zip(chans[:-1], chans[1:], strides, kernels, strict=True)
        for k, (cin, cout, s, ks) in enumerate(layers, 1):
            self.add_module(f"bn{k}", norm_layer(cin))
            self.add_module(f"conv{k}", nn.Conv2d(cin, cout, ks, s, ks // 2, bias=False))
        if downsample is None and (stride != 1 or inplanes != out):
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False))
        self.downsample = downsample
        if drop_path:
            self.drop_path = DropPath(drop_path)
        self.stride = stride
        self.shortcut_scale, self.backend = float(shortcut_scale), ops.prepare_backend(backend)
        self.plan = _preact_plan(self, self.n_convs)
        self._check_norm_layer()


class PreActBasicBlock(_PreActBase):
    """Fused full pre-activation basic block (He et al. 2016 "e"): BN-ReLU-conv3x3, BN-ReLU-
    conv3x3, + λ·shortcut; no activation after the add. A projection shortcut (1x1 conv,
    `downsample.0`) reads the pre-activated input."""

    expansion = 1
    n_convs = 2


class PreActBottleneck(_PreActBase):
    """Fused full pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3(stride), BN-ReLU-1x1
    (4x channels), + λ·shortcut."""

    expansion = 4
    n_convs = 3
