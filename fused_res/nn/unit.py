"""One conv unit of a block, run through the ops: conv (with a pending BN+ReLU of its input as
the prologue) -> BN -> act -> optional residual tail. Shared by ConvBNAct2d and the blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .. import ops
from . import eval_fold
from .batchnorm import ChannelAffine, batch_affine, check_norm, running_affine, uses_batch_stats
from .plan import explicit_padding


@dataclass
class Pending:
    """An affine + activation not yet applied to a tensor: value = act(affine(t)).
    In training, a BN's batch statistics exist only after its conv has run, so the next conv
    applies it in its prologue instead of a separate pass (where the backend prefers that:
    ops.fuses_train_prologue; otherwise it is materialized right away)."""

    affine: ChannelAffine
    act: str

    def as_prologue(self) -> dict:
        a = self.affine
        return {"in_center": a.center, "in_scale": a.scale, "in_shift": a.shift,
                "act_in": self.act}


RELU_ONLY = ChannelAffine(None, None, None)


def conv_kwargs(conv: nn.Conv2d) -> dict:
    """The conv's geometry as the ops take it (its padding as ints: plan.explicit_padding;
    the modules reach here only where it has some)."""
    return {"stride": list(conv.stride), "padding": list(explicit_padding(conv)),
            "dilation": list(conv.dilation), "groups": conv.groups}


def materialize(t: Tensor, pending: Pending | None, backend: str | None) -> Tensor:
    """Apply a pending affine + act to t in one pass (identity when nothing is pending)."""
    if pending is None:
        return t
    a = pending.affine
    return ops.epilogue(t, a.scale, a.shift, center=a.center, act_mid=pending.act,
                        backend=backend)


def run_unit(h: Tensor, pending: Pending | None, conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
             act_mid: str, backend: str | None, *, defer: bool = False,
             tail: dict | None = None) -> tuple[Tensor, Pending | None]:
    """conv(pending(h)) -> bn -> act_mid -> tail (residual add, act_out).

    Returns (t, pending'): the unit's value is pending'(t). With defer=True and a BN that
    normalizes with batch statistics, the BN + act are returned pending (for the next conv's
    prologue); otherwise the value is materialized and pending' is None.
    """
    if not isinstance(h, Tensor):
        # (a torch.fx Proxy: refused by name, as the ops refuse it, before the eval fold or
        # the BatchNorm's coefficients branch on it)
        ops.functional._check_feature_map("x", h)
    tail = tail or {}
    prologue = pending.as_prologue() if pending is not None else {}
    kw = conv_kwargs(conv)
    if bn is None:
        if eval_fold.applies(h):  # (inference: the weight kept as a fold is, planned)
            w, b = eval_fold.folded_conv(conv, None, h)
            return _planned(conv, h, w, b, kw, prologue, act_mid, backend, tail), None
        y = ops.conv_unit(h, conv.weight, conv.bias, **kw, **prologue, act_mid=act_mid,
                          backend=backend, **tail)
        return y, None
    if uses_batch_stats(bn):
        if not (defer and not tail) and bn.training and bn.track_running_stats:
            # One autograd node for the three ops below where it covers the call (else None).
            check_norm(bn)
            y = ops.train_unit.conv_bn_act(
                h, conv.weight, conv.bias, **kw, **prologue, bn_weight=bn.weight,
                bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                num_batches_tracked=bn.num_batches_tracked, momentum=bn.momentum, eps=bn.eps,
                act_mid=act_mid, backend=backend, **tail)
            if y is not None:
                return y, None
        z, mean, var = ops.conv_bn_stats(h, conv.weight, conv.bias, **kw, **prologue,
                                         backend=backend)
        aff = batch_affine(bn, mean, var, z.shape, backend)
        if defer and not tail:
            return z, Pending(aff, act_mid)
        return ops.epilogue(z, aff.scale, aff.shift, center=aff.center, act_mid=act_mid,
                            backend=backend, **tail), None
    fold = eval_fold.folded_conv(conv, bn, h) if eval_fold.applies(h) else None
    if fold is not None:
        # Inference: BN folded into the weight once (eval_fold.py); the shift stays a float32
        # per-channel vector so that backends applying it in their epilogue keep its precision.
        return _planned(conv, h, *fold, kw, prologue, act_mid, backend, tail), None
    scale, shift = running_affine(bn, h).folded()
    y = ops.conv_unit(h, conv.weight, conv.bias, **kw, **prologue, out_scale=scale,
                      out_shift=shift, act_mid=act_mid, backend=backend, **tail)
    return y, None


def _planned(conv: nn.Conv2d, h: Tensor, w: Tensor, shift: Tensor | None, kw: dict,
             prologue: dict, act_mid: str, backend: str | None, tail: dict) -> Tensor:
    """conv_unit(h, w, out_shift=shift, ...) on a fold's weight and shift, through the plan
    of the conv's last call where it covers this one (ops/plans.py: what the host did to
    launch it, done once), else through the op, planning it again."""
    return ops.plans.run(eval_fold.PLANS, conv, ops.conv_unit_planned, h, w, None, **kw,
                         **prologue, out_shift=shift, act_mid=act_mid, backend=backend, **tail)
