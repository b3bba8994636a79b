"""The contract every backend keeps (DESIGN.md §4).

A backend computes the three ops of fused_res.ops — conv_unit, conv_bn_stats, channel_stats,
epilogue — forward and backward, with the exact semantics of the reference backend. It may
decline a particular call (`unsupported_reason` returns a string) and the call then runs on
the reference backend with one warning naming the reason.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Per thread, the train_prologue() contexts in force: `by_name` {backend name: fused}, absent
# outside every context (read with getattr, which torch.compile guards on).
_TRAIN_PROLOGUE = threading.local()


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and if not, why."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return "available" if self.available else f"unavailable: {self.reason}"


class Backend:
    """Base class. Subclasses override the ops they accelerate; the rest is the reference."""

    name = "base"

    def status(self) -> BackendStatus:
        return BackendStatus(True, "")

    def unsupported_reason(self, x: torch.Tensor, weight: torch.Tensor | None, groups: int,
                           dilation: tuple[int, ...]) -> str | None:
        """None if this backend runs the call; otherwise a short reason for the fallback."""
        return None

    #: The default of fuses_train_prologue(): in training, whether a BatchNorm that
    #: normalises with batch statistics, and the ReLU after it, are applied inside the next
    #: conv (its prologue) or in a pass of their own before it. Its own pass writes the
    #: activated tensor once; the conv reads it and its backward reuses it, where a prologue
    #: makes the backward recompute it (so the bytes moved per step are the same either way)
    #: and makes the conv kernel do the affine and ReLU on every tile it loads (the cost a
    #: backend weighs). Memory: the pass keeps the activated tensor for the backward, as
    #: eager does.
    fuse_train_prologue: bool = True

    #: Whether this backend's conv kernel applies an input affine + ReLU as it loads its
    #: tiles. Only then is fuse_train_prologue a trade worth measuring both ways (the bench's
    #: fused-<backend>-bnpass / -prologue contenders); elsewhere a prologue is an apply pass
    #: before the conv either way.
    prologue_in_conv: bool = False

    #: Whether ops.train_unit may run a training unit (conv_bn_stats, bn_scale, epilogue) as
    #: one autograd node on this backend: only where its choice for the conv decides its choice
    #: for the statistics and the epilogue (unsupported_reason reads no more than the input's
    #: dtype and device, groups and dilation), so that one resolution stands for the three.
    fused_train_unit: bool = False

    def conv_unit_plan(self, *args) -> tuple[torch.Tensor, object | None]:
        """conv_unit_forward(*args)'s output y, and a plan where this backend can run calls
        like this one again without the layers above its kernel: a callable (x, residual)
        -> y for a new input and residual, returning None where they are not like this
        call's (fused_res.ops.plans says what else must stay the same). For inference
        calls only (nothing records a backward). The base class has no plans."""
        return self.conv_unit_forward(*args)[0], None

    def conv_pair_plan(self, *args) -> tuple[torch.Tensor, object | None]:
        """conv_pair_forward(*args), and a plan as conv_unit_plan's (its second input x2)."""
        return self.conv_pair_forward(*args), None

    def plan_switches(self, dtype: torch.dtype) -> tuple:
        """This backend's settings that a plan for inputs of `dtype` depends on beyond its
        call's arguments: a plan runs only while they are what they were when it was made."""
        return ()

    def fuses_shortcut_conv(self) -> bool:
        """Whether, in inference, a block's last conv and its 1x1 projection shortcut should
        run as one op (conv_pair_forward: one GEMM over both convs' K) rather than two conv
        units, the second adding the first's output. Only where one kernel computes both;
        elsewhere the pair is those two units anyway."""
        return False

    def fuses_train_prologue(self) -> bool:
        """The choice in force on this thread: the innermost train_prologue() context's for
        this backend, else fuse_train_prologue."""
        by_name = getattr(_TRAIN_PROLOGUE, "by_name", None)
        if by_name:
            fused = by_name.get(self.name)
            if fused is not None:
                return fused
        return self.fuse_train_prologue

    @contextlib.contextmanager
    def train_prologue(self, fused: bool) -> Iterator[None]:
        """Within the context, on this thread only: this backend applies training BatchNorms
        in the next conv's prologue (fused=True) or in their own pass (False), whatever its
        default. Nests; other threads keep their own choice."""
        if not isinstance(fused, bool):
            raise TypeError(f"fused={fused!r}; accepted: True or False")
        previous = getattr(_TRAIN_PROLOGUE, "by_name", None)
        _TRAIN_PROLOGUE.by_name = {**(previous or {}), self.name: fused}
        try:
            yield
        finally:
            # Absent again outside every context: the state a compiled graph was traced in.
            if previous is None:
                del _TRAIN_PROLOGUE.by_name
            else:
                _TRAIN_PROLOGUE.by_name = previous

    def prologue_apart(self) -> contextlib.AbstractContextManager[None]:
        """train_prologue(False): the bench's fused-<backend>-bnpass contender."""
        return self.train_prologue(False)

    def prologue_fused(self) -> contextlib.AbstractContextManager[None]:
        """train_prologue(True): the bench's fused-<backend>-prologue contender."""
        return self.train_prologue(True)


def runs_own(backend, cls: type, *methods: str) -> bool:
    """Whether `backend` runs cls's own versions of these methods: a launch that merges them
    must not skip a subclass's override."""
    return all(getattr(type(backend), m) is getattr(cls, m) for m in methods)


def in_place_reason(var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    float32_only: bool) -> str | None:
    """Why a kernel cannot update these running statistics in place through their pointers
    (contiguous, on var's device, float32 where float32_only), or None. A backend that then
    leaves the update to the reference says so once (registry.warn_once)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if float32_only and t.dtype != torch.float32:
            return f"{name} is {t.dtype} (its kernel updates float32 statistics in place)"
        if not t.is_contiguous():
            return f"{name} is not contiguous (its kernel updates it in place)"
        if t.device != var.device:
            return f"{name} is on {t.device} and the batch statistics on {var.device}"
    return None
