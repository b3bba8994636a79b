"""The extension's CPU kernels beside aten's CPU ops doing the same work, on one activation.

    python benchmarks/cpu_ops.py [--shape 2,256,56,56] [--dtype fp32,bf16] [--repeats 20]

Per dtype and layout (NHWC, NCHW): a copy of the tensor; aten's eval BatchNorm, and BatchNorm +
add + ReLU (what a residual block's tail costs eager); aten's var_mean over (N, H, W); then
fused_res_C's apply pass as that tail (center, scale, shift, ReLU, + residual, ReLU) and as
BN + ReLU, its batch statistics, the apply's backward with every gradient (the tail's) and
the statistics' backward. The best of --repeats calls each, in milliseconds, side by side in
one process: a CPU is shared and noisy, so compare rows of one run, not runs. Each of ours is
checked against aten's (or the reference backend's) result before it is timed.

Not a target of the issues (those are GPU bandwidths, benchmarks/ops_bandwidth.py): this is
how a user on a CPU sees the cuda backend's CPU path against eager, and what found its apply
pass at 30x aten's time (its per-element flag tests compiled to branches).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def best_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def one_row(ops, shape: tuple, dtype: torch.dtype, fmt: torch.memory_format,
            repeats: int) -> str:
    """One dtype and layout: every op checked, then timed; the row's cells."""
    from fused_res.backends.reference import ReferenceBackend
    from fused_res.testing import TOLERANCES, rel_err
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    mean, scale, shift = (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
                          torch.randn(c, generator=g))
    rm, rv = torch.zeros(c), torch.ones(c)
    z, r, gy = (torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
                for _ in range(3))

    def tail():
        return ops.epilogue(z, mean, scale, shift, True, r, 1.0, None, True)

    y = tail()
    want = ReferenceBackend().epilogue_forward(z.double(), mean.double(), scale.double(),
                                               shift.double(), "relu", r.double(), 1.0, None,
                                               "relu")
    sm, sv = ops.channel_stats(z)
    vv, mm = torch.var_mean(z.double(), dim=(0, 2, 3), unbiased=False)
    checks = {"tail": rel_err(y, want), "stats": max(rel_err(sm, mm), rel_err(sv, vv))}
    tol = TOLERANCES[dtype]
    bad = {k: f"{e:.1e}" for k, e in checks.items() if not e <= tol}
    if bad:
        return f"WRONG {bad} (tolerance {tol:.0e}); not timed"
    row = {
        "copy": lambda: z.clone(),
        "aten bn": lambda: torch.batch_norm(z, scale, shift, rm, rv, False, 0.1, 1e-5, False),
        "aten bn+add+relu": lambda: torch.relu_(torch.batch_norm(
            z, scale, shift, rm, rv, False, 0.1, 1e-5, False).add_(r)),
        "aten var_mean": lambda: torch.var_mean(z, dim=(0, 2, 3), unbiased=False),
        "ours tail": tail,
        "ours bn+relu": lambda: ops.epilogue(z, None, scale, shift, True, None, 1.0, None,
                                             False),
        "ours stats": lambda: ops.channel_stats(z),
        "ours tail bwd": lambda: ops.epilogue_backward(
            gy, z, y, mean, scale, shift, True, 1.0, None, True, True, True, True, True),
        "ours stats bwd": lambda: ops.stats_backward(gy, mean, scale, z, mean),
    }
    return "  ".join(f"{k} {best_ms(f, repeats):.2f}" for k, f in row.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2,256,56,56", help="N,C,H,W of the activation")
    p.add_argument("--dtype", default="fp32,bf16", help=f"comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    try:
        shape = tuple(int(v) for v in a.shape.split(","))
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--shape {a.shape!r}: accepted: four positive ints N,C,H,W")
    dtypes = [d.strip() for d in a.dtype.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtype {d!r}: accepted: {', '.join(DTYPES)}")
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: accepted: an integer >= 1")

    from fused_res import _ext
    if _ext.load() is None:
        print(f"fused_res._C is not loaded: {_ext.reason()}", file=sys.stderr)
        return 1
    ops = torch.ops.fused_res_C
    print(f"{torch.get_num_threads()} threads, shape {shape}; best of {a.repeats}, ms")
    for name in dtypes:
        for layout, fmt in (("NHWC", torch.channels_last), ("NCHW", torch.contiguous_format)):
            print(f"{name} {layout}: " + one_row(ops, shape, DTYPES[name], fmt, a.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
