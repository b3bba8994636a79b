"""The contract every backend keeps (DESIGN.md §4).

A backend computes the three ops of fused_res.ops — conv_unit, conv_bn_stats, channel_stats,
epilogue — forward and backward, with the exact semantics of the reference backend. It may
decline a particular call (`unsupported_reason` returns a string) and the call then runs on
the reference backend with one warning naming the reason.
"""

from __future__ import annotations

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
