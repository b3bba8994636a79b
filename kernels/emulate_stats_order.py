"""The summation order of channel_stats' CUDA kernels (channel_reduce.cuh, NHWC path), emulated
in numpy on the CPU: what fp32 running sums cost against sums in double past each thread.

    python kernels/emulate_stats_order.py

The kernels cannot run without a GPU; their order can. Each thread adds its own rows in
fp32 (the hot loop), then the block adds its threads' sums, the splits are written as
partials and the finalize adds them: in fp32 before, in double now. Prints the relative error
of mean and biased variance against float64 for a typical channel, ones whose first element
sits 30 and 300 std out, and zero-mean channels, with the shift each channel's first element
(before) and the median of its first, middle and last elements (bn_stats.cuh: ShiftAt).
"""

from __future__ import annotations

import numpy as np

THREADS = 256


def plan(rows: int, c: int, vec_width: int = 8, num_sms: int = 132, min_blocks: int = 4,
         unroll: int = 4) -> tuple[int, int, int]:
    """(rows per block along the reduced extent, row lanes per block, splits), as plan_reduce
    and nhwc_tile compute them for StatsOp."""
    vec = vec_width if c % vec_width == 0 else 1
    cv = -(-c // vec)
    tx = 1
    while tx < 32 and tx < cv:
        tx *= 2
    ty = THREADS // tx
    tiles = -(-cv // tx)
    splits = max(1, min(num_sms * min_blocks // tiles, rows // (ty * unroll * 2), 1024))
    chunk = -(-rows // splits)
    return chunk, ty, -(-rows // chunk)


def shift(x_rows: np.ndarray, n: int, median: bool = True) -> np.ndarray:
    """The per-channel shift of x_rows (rows = n * HW, C): the median of rows 0,
    (n/2)*HW + HW/2 and rows-1 (bn_stats.cuh's ShiftAt), or row 0 alone."""
    rows = x_rows.shape[0]
    if not median:
        return x_rows[0]
    hw = rows // n
    picks = x_rows[[0, (n // 2) * hw + hw // 2, rows - 1]]
    return np.median(picks, axis=0).astype(np.float32)


def stats(x_rows: np.ndarray, cross_thread: type, n: int = 1,
          median: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance per channel of x_rows (rows = n * HW, C) float32, shifted by
    shift(x_rows, n, median), per-thread sums in fp32 and everything after them in
    `cross_thread`."""
    rows, c = x_rows.shape
    chunk, ty, splits = plan(rows, c)
    k = shift(x_rows, n, median)
    d = (x_rows - k).astype(np.float32)
    parts_a = np.zeros((splits, c), cross_thread)
    parts_b = np.zeros((splits, c), cross_thread)
    for s in range(splits):
        begin, end = s * chunk, min(rows, (s + 1) * chunk)
        block_a = np.zeros(c, cross_thread)
        block_b = np.zeros(c, cross_thread)
        for t in range(ty):
            acc_a = np.zeros(c, np.float32)
            acc_b = np.zeros(c, np.float32)
            for m in range(begin + t, end, ty):
                acc_a += d[m]
                acc_b += d[m] * d[m]
            block_a += acc_a.astype(cross_thread)
            block_b += acc_b.astype(cross_thread)
        parts_a[s], parts_b[s] = block_a, block_b
    # The finalize: 32 lanes each add every 32nd split, then one lane adds the 32 sums.
    lanes_a = np.zeros((32, c), cross_thread)
    lanes_b = np.zeros((32, c), cross_thread)
    for lane in range(32):
        for s in range(lane, splits, 32):
            lanes_a[lane] += parts_a[s]
            lanes_b[lane] += parts_b[s]
    sum_a, sum_b = lanes_a[0].copy(), lanes_b[0].copy()
    for lane in range(1, 32):
        sum_a += lanes_a[lane]
        sum_b += lanes_b[lane]
    inv = cross_thread(1.0 / rows)
    mean_shifted = sum_a * inv
    var = np.maximum(sum_b * inv - mean_shifted * mean_shifted, 0)
    return (k + mean_shifted).astype(np.float32), var.astype(np.float32)


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main() -> None:
    rng = np.random.default_rng(0)
    cases = {}
    x = rng.standard_normal((8, 4, 64, 64))
    cases["typical first element, (8, 4, 64, 64)"] = x.copy()
    for far in (30.0, 300.0):
        y = x.copy()
        y[0, :, 0, 0] = far
        cases[f"first element {far:g} std out, (8, 4, 64, 64)"] = y
    cases["zero mean, (64, 2, 64, 64)"] = rng.standard_normal((64, 2, 64, 64))
    for name, x in cases.items():
        rows = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]).astype(np.float32)
        ref_mean = rows.astype(np.float64).mean(0)
        ref_var = rows.astype(np.float64).var(0)
        for median in (False, True):
            for label, kind in (("fp32", np.float32), ("double", np.float64)):
                mean, var = stats(rows, kind, x.shape[0], median)
                print(f"{name}: shift {'median of 3' if median else 'first element'}, "
                      f"cross-thread sums in {label}: mean {rel(mean, ref_mean):.1e}, "
                      f"var {rel(var, ref_var):.1e}")


if __name__ == "__main__":
    main()
