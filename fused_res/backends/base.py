"""The contract every backend keeps (DESIGN.md §4).

A backend computes the three ops of fused_res.ops — conv_unit, conv_bn_stats, channel_stats,
epilogue — forward and backward, with the exact semantics of the reference backend. It may
decline a particular call (`unsupported_reason` returns a string) and the call then runs on
the reference backend with one warning naming the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


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

    #: In training, whether a BatchNorm that normalises with batch statistics, and the ReLU
    #: after it, are applied inside the next conv (its prologue, the default) or in a pass of
    #: their own before it. Its own pass writes the activated tensor once; the conv reads it
    #: and its backward reuses it, where a prologue makes the backward recompute it (so the
    #: bytes moved per step are the same either way) and makes the conv kernel do the affine
    #: and ReLU on every tile it loads (the cost a backend weighs). Memory: the pass keeps the
    #: activated tensor for the backward, as eager does.
    fuse_train_prologue: bool = True

    @contextlib.contextmanager
    def prologue_apart(self) -> Iterator[None]:
        """Within the context, this backend object applies training BatchNorms in their own
        pass (fuse_train_prologue False), whatever its default; the bench's
        fused-<backend>-bnpass contender."""
        previous = self.__dict__.get("fuse_train_prologue")
        self.fuse_train_prologue = False
        try:
            yield
        finally:
            if previous is None:
                del self.fuse_train_prologue
            else:
                self.fuse_train_prologue = previous
