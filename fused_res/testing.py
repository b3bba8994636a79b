"""Helpers for checking a backend against the float64 reference (DESIGN.md §4)."""

from __future__ import annotations

import torch

# Relative-error budgets ‖out − ref‖ / ‖ref‖ against a float64 reference, by dtype.
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    "tf32": 5e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64. NaN or Inf in `out` (or `ref`) where the other
    has none gives inf, so a NaN never passes a tolerance check."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise ValueError(f"rel_err: shapes differ, out {tuple(out64.shape)} vs ref "
                         f"{tuple(ref64.shape)}")
    finite_out, finite_ref = torch.isfinite(out64), torch.isfinite(ref64)
    if not torch.equal(finite_out, finite_ref):
        return float("inf")
    if not finite_ref.all():
        # Non-finite entries must agree exactly (same NaN/Inf pattern and sign).
        same = (out64[~finite_ref] == ref64[~finite_ref]) | (
            torch.isnan(out64[~finite_ref]) & torch.isnan(ref64[~finite_ref]))
        if not same.all():
            return float("inf")
        out64, ref64 = out64[finite_ref], ref64[finite_ref]
    num, denom = (out64 - ref64).norm(), ref64.norm()
    return float(num / denom) if denom > 0 else float(num)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Raise AssertionError naming `what` when rel_err(out, ref) > tol."""
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > tolerance {tol:.1e}")
