"""A ResNet stem (conv -> BatchNorm -> ReLU, then the model's own max-pool) fused in place,
without touching the model's forward or its state_dict keys.

The model still calls conv1, bn1 and relu in turn. After fusion conv1 is a `FusedStemConv`
that computes relu(bn1(conv1(x))) through the conv-unit ops (eval: BN folded into the conv,
one pass; train: the statistics in the conv's pass, BN + ReLU in one more), bn1 is an
`AppliedBatchNorm2d` (the same parameters and buffers under the same names; it passes the
tensor its fused conv returned through, being already applied, and in eager code normalizes
a tensor that is not that output as the plain module would: _applied says when) and relu an
`AppliedReLU` (the same). While any of the
three has hooks (added after convert()), conv1 computes the plain conv and the other two
their own BatchNorm and ReLU, so that the hooks see what they would see unfused. The stem's
BatchNorm + ReLU were two or three eager passes over the network's largest activation.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops import prepare_backend
from .hooks import calls_more, global_hooks, has_hooks, share_hooks, warn_once
from .plan import padding_reason
from .scripting import NotScriptable
from .unit import run_unit


class StemState:
    """Whether the stem's last call ran fused, and whether its BatchNorm has been called
    since (awaiting_bn: False, True, or "recomputed" when that call was a recompute in a
    backward pass); shared by its three modules (and no module: deepcopy and pickle copy it
    with them, and it makes no reference cycle). parent: the model, as the stem's ParentRef
    (set by the model's StemLink), for the BatchNorm and ReLU to see conv1 replaced."""

    __slots__ = ("fused", "awaiting_bn", "awaiting_act", "parent")

    def __init__(self) -> None:
        self.fused, self.awaiting_bn, self.awaiting_act, self.parent = True, False, False, None

    def __getstate__(self):
        return self.fused, self.awaiting_bn

    def __setstate__(self, state) -> None:
        (self.fused, self.awaiting_bn), self.awaiting_act, self.parent = state, False, None


class ParentRef:
    """The model a fused stem sits in, held weakly (no reference cycle through the model's
    own conv1). A copy or a pickle of it holds none: the model's StemLink, copied and pickled
    with the model and only with it, sets the copy's (a stem copied alone then cannot see a
    replaced bn1 before its next call; a pickled reference would drag the whole model into
    the stem's file)."""

    __slots__ = ("_ref",)

    def __init__(self, parent: nn.Module | None) -> None:
        self._ref = None if parent is None else weakref.ref(parent)

    def __call__(self) -> nn.Module | None:
        return None if self._ref is None else self._ref()

    def __reduce__(self):
        return ParentRef, (None,)


class StemLink:
    """Kept in the model's own __dict__ (LINK_ATTR) by convert(): copied or pickled with the
    model, and only with it, it points the new stem's ParentRef at the new model. Holds the
    model weakly, the stem strongly (the model holds it anyway)."""

    __slots__ = ("_model", "_stem")

    def __init__(self, model: nn.Module | None, stem: nn.Module) -> None:
        # (None: pickled after its model was freed, nothing to point at)
        self._model = None if model is None else weakref.ref(model)
        self._stem = stem
        ref = ParentRef(model)
        stem.__dict__["_parent"] = ref
        state = stem.__dict__.get("_state")
        if state is not None:
            state.parent = ref

    def __getstate__(self):
        return (None if self._model is None else self._model()), self._stem

    def __setstate__(self, state) -> None:
        self.__init__(*state)


LINK_ATTR = "_fused_res_stem_link"


# The outputs of fused stem convs still alive, by id: (a weak reference to the tensor, its
# stem's StemState). A stem's BatchNorm and ReLU pass through only the tensor their own fused
# conv returned; anything else they compute on, as the plain modules would.
_OUTPUTS: dict[int, tuple[weakref.ref, StemState]] = {}


def _record_output(y: Tensor, state: StemState) -> None:
    key = id(y)
    _OUTPUTS[key] = (weakref.ref(y, lambda _, k=key: _OUTPUTS.pop(k, None)), state)


def _maker(x: Tensor) -> StemState | None:
    """The StemState of the fused stem conv whose output x is, or None."""
    entry = _OUTPUTS.get(id(x))
    return entry[1] if entry is not None and entry[0]() is x else None


def _applied(module: nn.Module, x: Tensor, pending: bool) -> bool:
    """Whether module (the stem's AppliedBatchNorm2d or AppliedReLU) may pass x through as
    applied; pending: whether its fused conv ran (in eager code) since the module's last call.

    The tensor its own fused conv returned passes; another stem's fused conv's output raises.
    Any other tensor is computed on, as the plain module would (a conv1 replaced, wrapped, or
    swapped in a Sequential of the model's children; a direct call: each passed through
    unnormalized before, the first with a warning, the others silently) -- unless the conv
    did run fused since and x holds its values under another tensor object (a hook's or a
    device wrapper's return, a checkpoint's detached or save_on_cpu's unpacked copy), or the
    conv runs where it records nothing (Module.compile(), a forward replaced on the instance:
    make_graphed_callables): there, and under torch.compile and in a backward's recompute
    (which must do what the forward did), the stem's flags decide, as before."""
    state = module.__dict__.get("_state")
    if state is None or torch.compiler.is_compiling() or _in_backward():
        return _fused(module)
    maker = _maker(x)
    if maker is state:
        return True
    if maker is not None:
        raise RuntimeError(
            f"fused_res: the fused stem's {type(module).__name__} was given the output of "
            "another stem's fused conv (another converted model's, or a copy: model_b.conv1 "
            "= model_a.conv1?), which applied its own BatchNorm and ReLU already; this "
            "model's cannot follow it. Assign a plain conv over the same weights instead "
            "(model_b.conv1 = model_a.conv1.as_conv()), or revert() the models and convert() "
            "them again")
    fused = _fused(module)  # (called either way: its warning where conv1 was replaced)
    return fused and (pending or _conv_unseen(state))


def _conv_unseen(state: StemState) -> bool:
    """Whether the model's fused conv1 runs through something that skips its eager forward
    (compiled in place by Module.compile(); a forward set on the instance, as
    torch.cuda.make_graphed_callables does), which then records nothing."""
    parent = state.parent() if state.parent is not None else None
    conv = parent._modules.get("conv1") if parent is not None else None
    return isinstance(conv, FusedStemConv) and (
        conv.__dict__.get("_compiled_call_impl") is not None or "forward" in conv.__dict__)


def _fused(module: nn.Module) -> bool:
    """Whether the stem's BatchNorm or ReLU is applied by its conv: the stem's last call ran
    fused, and its model (where known) still holds the fused conv1. A conv1 replaced after
    convert() (a grayscale or CIFAR stem) never runs fused again: the BatchNorm and ReLU
    passed its output through, unnormalized, without a word."""
    state = module.__dict__.get("_state")
    if state is None:
        return True
    if not state.fused:
        return False
    parent = state.parent() if state.parent is not None else None
    if parent is not None and not isinstance(parent._modules.get("conv1"), FusedStemConv):
        warn_once("the fused stem's conv1 was replaced after convert(): its BatchNorm and "
                  "ReLU apply themselves, unfused; revert() the model and convert() it "
                  "again to fuse the new stem")
        return False
    return True


class AppliedBatchNorm2d(NotScriptable, nn.BatchNorm2d):
    """A BatchNorm2d whose normalization the preceding FusedStemConv applies: its forward is
    the identity (the BatchNorm itself when the stem ran unfused). Parameters, buffers,
    train/eval state and state_dict keys are the original module's."""

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, state: StemState | None = None
                       ) -> AppliedBatchNorm2d:
        new = cls.__new__(cls)
        # The same parameter and buffer dicts: one set of tensors, updated in place.
        new.__dict__.update(bn.__dict__)
        new.__dict__["_state"] = state
        return new

    def forward(self, x: Tensor) -> Tensor:
        state = self.__dict__.get("_state")
        pending = state is not None and bool(state.awaiting_bn)
        if pending:
            state.awaiting_bn = False
        return x if _applied(self, x, pending) else super().forward(x)

    def as_batchnorm(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d over the same parameters, buffers and hooks (revert)."""
        bn = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        bn.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_state"})
        return bn


class AppliedReLU(NotScriptable, nn.Module):
    """The stem's ReLU, which the preceding FusedStemConv applies: the identity (a ReLU when
    the stem ran unfused)."""

    def __init__(self, inplace: bool, state: StemState) -> None:
        super().__init__()
        self.inplace = inplace
        self.__dict__["_state"] = state

    def forward(self, x: Tensor) -> Tensor:
        state = self.__dict__.get("_state")
        pending = state is not None and state.awaiting_act
        if pending:
            state.awaiting_act = False
        return x if _applied(self, x, pending) else F.relu(x, inplace=self.inplace)

    def as_relu(self) -> nn.ReLU:
        """A plain nn.ReLU with this module's hooks (revert)."""
        relu = nn.ReLU(inplace=self.inplace)
        share_hooks(self, relu)
        return relu


# StemState.awaiting_bn after a fused call made inside a backward pass.
_RECOMPUTED = "recomputed"


def _in_backward() -> bool:
    """Whether this runs inside a backward pass: torch.utils.checkpoint recomputing a segment
    that may hold conv1 without bn1, which is no sign of a replaced bn1."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class FusedStemConv(NotScriptable, nn.Conv2d):
    """conv -> BatchNorm (the AppliedBatchNorm2d it is given) -> ReLU through the conv-unit
    ops. Same parameters and state_dict keys as the nn.Conv2d it replaces. Input
    (N, C_in, H, W) -> (N, C_out, H', W') after the ReLU; the plain conv's output while the
    conv, the BatchNorm or the ReLU has hooks (the other two then apply themselves)."""

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: AppliedBatchNorm2d, names: tuple[str, str],
                     relu_inplace: bool, backend: str | None,
                     act: nn.Module | None = None) -> FusedStemConv:
        """names: the parent's attribute names of the BatchNorm and the ReLU (for revert);
        act: the AppliedReLU in the ReLU's place. The model holding all three is made known
        by a StemLink (for seeing either replaced before a call)."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        # Not registered children: they stay where the model keeps them (their keys, their
        # place in .train() / .to()), and deepcopy maps these references to the same copies.
        new.__dict__["_norm"] = bn
        new.__dict__["_act"] = act
        new.__dict__["_stem"] = (names, relu_inplace)
        new.__dict__["_state"] = bn.__dict__.get("_state")
        new.__dict__["_parent"] = ParentRef(None)
        new.backend = prepare_backend(backend)
        return new

    def hooked(self) -> str | None:
        """Which of the stem's modules has hooks (or, the BatchNorm or ReLU, a forward set on
        the instance), or None. A forward set on conv1 after convert() is taken to run the
        fused conv (torch.cuda.make_graphed_callables captures it fused; accelerate's device
        hooks call it): _conv_unseen."""
        d = self.__dict__
        (bn_name, act_name), _ = d["_stem"]
        if has_hooks(self):
            return "conv1"
        for name, m in ((bn_name, d["_norm"]), (act_name, d.get("_act"))):
            if m is not None and calls_more(m):
                return name
        return None

    def replaced(self) -> str | None:
        """The attribute name of the stem's conv, BatchNorm or ReLU where its model now holds
        another module there (a wrapped conv1, SyncBatchNorm.convert_sync_batchnorm after
        convert()), or None (also when the model is unknown: a stem copied alone)."""
        d = self.__dict__
        ref = d.get("_parent")
        parent = ref() if ref is not None else None
        if parent is None:
            return None
        (bn_name, act_name), _ = d["_stem"]
        modules = parent._modules
        if modules.get("conv1") is not self:
            return "conv1"  # (wrapped: nn.Sequential(adapter, conv1), checkpoint_wrapper)
        if modules.get(bn_name) is not d["_norm"]:
            return bn_name
        act = d.get("_act")
        return act_name if act is not None and modules.get(act_name) is not act else None

    def unfused_reason(self) -> str | None:
        """Why the stem runs unfused now (hooks on one of its modules, one replaced, or its
        conv's padding set to one the ops cannot do), or None while it runs fused."""
        why = padding_reason(self)
        if why is not None:
            return (f"the fused stem's conv1 was set to {why} after convert(): it runs as a "
                    "plain conv and the stem's BatchNorm and ReLU as themselves")
        hooked = self.hooked()
        if hooked is not None:
            what = ("global module hooks" if global_hooks() else
                    f"hooks on the fused stem's {hooked} (or an instance forward)")
            return f"{what}: conv1, bn1 and the ReLU run unfused while they are there"
        replaced = self.replaced()
        if replaced == "conv1":
            return ("the fused stem's conv1 is no longer its model's conv1 (wrapped after "
                    "convert()?): it runs as a plain conv and the stem's BatchNorm and ReLU "
                    "as themselves; revert() the model and convert() it again to fuse them")
        if replaced is not None:
            return (f"the fused stem's {replaced} was replaced after convert() "
                    "(SyncBatchNorm.convert_sync_batchnorm?): conv1 runs as a plain conv and "
                    "the stem's BatchNorm and ReLU as themselves; revert() the model and "
                    "convert() it again to fuse them")
        return None

    def forward(self, x: Tensor) -> Tensor:
        state = self.__dict__.get("_state")
        why = self.unfused_reason() if state is not None else None
        if state is not None and state.fused != (why is None):
            state.fused = why is None  # (written only on a change: nothing for a trace)
        if why is not None:
            warn_once(why)
            return super().forward(x)
        eager = state is not None and not torch.compiler.is_compiling()
        if eager:
            recompute = _in_backward()
            # Its AppliedBatchNorm2d not called since the last fused call, where no model is
            # known to look in (a stem copied alone): bn1 was replaced and normalizes the
            # output again, or conv1 is called alone and returns more than its conv. Seen a
            # call late; said at least.
            if state.awaiting_bn == _RECOMPUTED:
                warn_once("torch.utils.checkpoint recomputed the fused stem's conv1, which "
                          "applies bn1: the recompute updated bn1's running statistics a "
                          "second time, as eager does with bn1 inside the checkpointed "
                          "segment but not with conv1 checkpointed alone (values and "
                          "gradients are right either way); for eager's count there, "
                          "convert(..., stem=False)")
            elif state.awaiting_bn and not recompute:
                warn_once("the fused stem's bn1 did not run after its previous call: "
                           "replaced after convert() (SyncBatchNorm.convert_sync_batchnorm)? "
                           "Then the stem normalizes twice; revert() the model and "
                           "convert() it again")
            # A recompute in the backward (checkpoint) is told apart: its early stop skips
            # bn1 (which saves nothing) even inside the segment, and no replacement explains
            # it.
            state.awaiting_bn = _RECOMPUTED if recompute else True
            state.awaiting_act = True
        y, _ = run_unit(x, None, self, self.__dict__["_norm"], "relu", self.backend)
        if eager:
            _record_output(y, state)
        return y


    def as_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d over the same parameters, with this module's hooks (revert)."""
        conv = nn.Conv2d.__new__(nn.Conv2d)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("_norm", "_act", "_state", "_stem", "_parent",
                                           "backend")})
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", fused with its BatchNorm and ReLU, backend={self.backend!r}")


def unapply(parent: nn.Module) -> None:
    """Plain modules in place of parent's AppliedBatchNorm2d and AppliedReLU children whose
    fused conv1 is gone (replaced after convert()), for revert()."""
    for name, child in list(parent._modules.items()):
        if isinstance(child, AppliedBatchNorm2d):
            parent._modules[name] = child.as_batchnorm()
        elif isinstance(child, AppliedReLU):
            parent._modules[name] = child.as_relu()


def unfuse_stem(parent: nn.Module, fused: FusedStemConv) -> nn.Conv2d:
    """Put a plain conv, BatchNorm and ReLU back in parent in place of the fused stem
    (revert); a BatchNorm or ReLU put there since (convert_sync_batchnorm) is kept. Hooks
    registered on the fused modules stay registered on the plain ones. Returns the conv."""
    (bn_name, act_name), inplace = fused.__dict__["_stem"]
    bn = parent._modules.get(bn_name)
    if isinstance(bn, AppliedBatchNorm2d):
        parent._modules[bn_name] = bn.as_batchnorm()
    act = parent._modules.get(act_name)
    if isinstance(act, AppliedReLU):
        parent._modules[act_name] = act.as_relu()
    elif type(act) is nn.Identity:  # (a stem fused before AppliedReLU: the Identity is ours)
        relu = nn.ReLU(inplace=inplace)
        share_hooks(act, relu)
        parent._modules[act_name] = relu
    conv = fused.as_conv()
    parent._modules["conv1"] = conv
    return conv
