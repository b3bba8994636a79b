"""Memory-bound ops and the conv alone, per backend, against what the device can do.

    python benchmarks/ops_bandwidth.py [--batch 64] [--dtype bf16] [--json F] [--markdown F]

Part 1, the passes issue 6 sets bandwidth targets for, at ResNet-50's activation shapes
(channels_last): the fused apply forward (BN affine, ReLU, residual add, ReLU: reads z and r,
writes y), the BN + ReLU apply alone, the apply backward (reads dy, z, y; writes dz, dr; the
per-channel Σ dy and Σ dy·(z - c) reduced in the same pass) and the batch statistics (reads x).
Each is reported as achieved bytes/s over the copy bandwidth measured in the same run (the
fewest bytes each must move, over its median time), and as the time of a device copy that
moves the same bytes at the same size over the pass's time (small shapes cost every kernel a
fixed few microseconds, a copy's included).

Part 2, issue 5's "conv alone within 15% of cuDNN": the Triton implicit-GEMM conv with no
prologue or epilogue against F.conv2d (cuDNN) at every ResNet-50 conv shape, as time ratios.

Input sets rotate so that the working set exceeds the L2 cache; times are CUDA-event medians,
eager (what a Python caller pays, launch cost included) and of CUDA-graph replays (the kernels
alone); fractions and ratios use the graph times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
from torch.nn import functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ResNet-50's activation shapes (C, H=W) inside and at the output of each stage.
ACTIVATIONS = [(64, 112), (256, 56), (64, 56), (512, 28), (128, 28), (1024, 14), (256, 14),
               (2048, 7), (512, 7)]
# ResNet-50's distinct convs: (C_in, C_out, H=W of the input, k, stride). All 23: the stem and
# the stride-2 projections were missing from the target's table before 2026-11-28.
CONVS = [(3, 64, 224, 7, 2),
         (64, 64, 56, 1, 1), (64, 64, 56, 3, 1), (64, 256, 56, 1, 1), (256, 64, 56, 1, 1),
         (256, 128, 56, 1, 1), (128, 128, 56, 3, 2), (128, 512, 28, 1, 1), (512, 128, 28, 1, 1),
         (128, 128, 28, 3, 1), (512, 256, 28, 1, 1), (256, 256, 28, 3, 2), (256, 1024, 14, 1, 1),
         (1024, 256, 14, 1, 1), (256, 256, 14, 3, 1), (1024, 512, 14, 1, 1),
         (512, 512, 14, 3, 2), (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1), (512, 512, 7, 3, 1),
         (256, 512, 56, 1, 2), (512, 1024, 28, 1, 2), (1024, 2048, 14, 1, 2)]
L2_BYTES = 256 * 2 ** 20  # rotate over at least this much, well past any current L2


def time_ms(fn, sets, warmup=3, repeats=20) -> float:
    """Median CUDA-event time of fn(*s) cycling through the input sets `sets`."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        s = sets[i % len(sets)]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*s)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, sets, repeats=20) -> float:
    """Median time of a CUDA-graph replay of fn(*s), one graph per input set: the kernels'
    own time, without the host-side launch cost that eager timing includes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in sets:
            fn(*s)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for s in sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*s)
        graphs.append(g)
    return time_ms(lambda g: g.replay(), [(g,) for g in graphs], warmup=len(graphs),
                   repeats=repeats)


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device copy, counting the read and the write."""
    src = torch.randn(2 ** 28, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], warmup=3, repeats=10)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def same_size_copy_ms(nbytes: int, device) -> float:
    """Graph-replay time of a device copy that reads nbytes / 2 and writes nbytes / 2: the
    fairest yardstick for a pass of nbytes at a small shape, where a fixed per-kernel cost
    keeps any kernel (a copy included) below the bandwidth of a 1 GiB copy."""
    half = max(nbytes // 2, 1)
    sets = [(torch.empty(half, dtype=torch.uint8, device=device),
             torch.empty(half, dtype=torch.uint8, device=device))
            for _ in range(n_sets(nbytes))]
    return graph_ms(lambda src, dst: dst.copy_(src), sets)


def n_sets(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(L2_BYTES / max(bytes_per_set, 1))))


def _activation(n, c, hw, dtype, device):
    return torch.randn(n, c, hw, hw, device=device, dtype=dtype).to(
        memory_format=torch.channels_last)


def _vec(c, device):
    return torch.randn(c, device=device) * 0.1 + 1.0


def _sums_apart(fn):
    """fn with the Triton apply backward's channel sums in a launch of their own (the switch
    is read per call, so a CUDA graph captures whichever kernels it names)."""
    from fused_res.triton import elementwise

    def run(*args):
        before, elementwise.SUMS_IN_PASS = elementwise.SUMS_IN_PASS, False
        try:
            return fn(*args)
        finally:
            elementwise.SUMS_IN_PASS = before
    return run


# Variants of a backend, each timing one pass under a switch: name -> (backend, pass, wrap).
VARIANTS = {"triton-sums-apart": ("triton", "apply_bwd", _sums_apart)}


def _passes(backend, center, scale, shift, dtype) -> dict:
    """The memory-bound passes of `backend` on the given per-channel vectors: op -> fn."""
    def fwd(z, r):
        return backend.epilogue_forward(z, center, scale, shift, "relu", r, 1.0, None, "relu")

    def fwd_bn_relu(z, r):
        return backend.epilogue_forward(z, center, scale, shift, "relu", None, 1.0, None, "none")

    needs = {"z": True, "center": True, "scale": True, "shift": True, "act_mid": False,
             "residual": True, "res_scale": False, "branch_scale": False, "act_out": False,
             "backend": False}

    def bwd(gy, z, y):
        saved = {"z": z, "center": center, "scale": scale, "shift": shift,
                 "branch_scale": None, "y": y, "act_mid": "relu", "res_scale": 1.0,
                 "act_out": "relu", "backend": backend.name, "residual_dtype": dtype}
        return backend.epilogue_backward(gy, saved, needs)

    def stats(x):
        return backend.channel_stats_forward(x)
    return {"apply_fwd": fwd, "apply_bn_relu": fwd_bn_relu, "apply_bwd": bwd, "stats": stats}


def apply_cases(backend, n, c, hw, dtype, device):
    """(name, fn, reference fn, sets, bytes) for the memory-bound passes of `backend` at one
    shape; the reference fn is the reference backend's same pass on the same vectors."""
    from fused_res.backends import get_backend_object

    elem = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * hw * hw
    center, scale, shift = _vec(c, device) - 1.0, _vec(c, device), _vec(c, device) - 1.0
    mine = _passes(backend, center, scale, shift, dtype)
    ref = _passes(get_backend_object("reference"), center, scale, shift, dtype)
    k3 = n_sets(3 * numel * elem)
    k5 = n_sets(5 * numel * elem)
    pairs = [(_activation(n, c, hw, dtype, device), _activation(n, c, hw, dtype, device))
             for _ in range(k3)]
    triples = []
    for _ in range(k5):
        z = _activation(n, c, hw, dtype, device)
        triples.append((_activation(n, c, hw, dtype, device), z, ref["apply_fwd"](z, z)))
    singles = [(_activation(n, c, hw, dtype, device),) for _ in range(n_sets(numel * elem))]
    sets = {"apply_fwd": pairs, "apply_bn_relu": pairs, "apply_bwd": triples, "stats": singles}
    nbytes = {"apply_fwd": 3, "apply_bn_relu": 2, "apply_bwd": 5, "stats": 1}
    return [(op, mine[op], ref[op], sets[op], nbytes[op] * numel * elem) for op in mine]


def _tensors(out) -> list:
    """A pass's result as a flat list of tensors (a dict in key order; None left out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def pass_error(fn, ref_fn, args) -> float:
    """The worst relative error of `fn`'s results against `ref_fn`'s on the same inputs (inf
    where their number or shapes differ, NaN where a result is NaN)."""
    got, want = _tensors(fn(*args)), _tensors(ref_fn(*args))
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=True)):
        return math.inf
    errs = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    # max() drops a NaN that is not first: any NaN makes the whole pass NaN (wrong).
    return math.nan if any(math.isnan(e) for e in errs) else max(errs, default=0.0)


def conv_cases(n, cin, cout, hw, k, stride, dtype, device):
    from fused_res.bench.roofline import conv_work
    from fused_res.triton.conv import conv_launch

    pad = k // 2
    x_sets = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for _ in range(n_sets(n * cin * hw * hw * elem)):
        x_sets.append((_activation(n, cin, hw, dtype, device),))
    w = (torch.randn(cout, cin, k, k, device=device) / math.sqrt(cin * k * k)).to(dtype).to(
        memory_format=torch.channels_last)

    def cudnn(x):
        return F.conv2d(x, w, None, stride, pad)

    def triton_conv(x):
        return conv_launch(x, w, None, (stride, stride), (pad, pad), None, None, None, "none",
                           memory_format=torch.channels_last)[0]

    flops, _ = conv_work(n, cin, cout, hw, k, stride, elem)
    return cudnn, triton_conv, x_sets, flops, w


def conv_peaks(dtype: torch.dtype, device):
    """The matmul rate and copy bandwidth of this device (roofline.measure_peaks, quick) in
    the precision cuDNN's convs take: TF32 for float32 where torch allows it there."""
    from fused_res.bench.roofline import measure_peaks

    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if name is None:
        name = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return measure_peaks(device.type, name, quick=True)


def conv_floor_ms(peaks, n, cin, cout, hw, k, stride, dtype) -> float:
    """The conv's roofline floor: max(FLOPs / matmul rate, fewest bytes / copy bandwidth)."""
    from fused_res.bench.roofline import conv_work

    elem = torch.tensor([], dtype=dtype).element_size()
    return 1e3 * peaks.floor_s(*conv_work(n, cin, cout, hw, k, stride, elem))


def _json_num(v: float) -> float | None:
    """v, or None where JSON has no number for it (NaN, inf: the row is flagged wrong)."""
    return v if math.isfinite(v) else None


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backends", default="reference,cuda,triton,triton-sums-apart",
                   help="comma-separated; the reference is aten's eager composition; "
                   "triton-sums-apart: the Triton apply backward with its channel sums in a "
                   "launch of their own (FUSED_RES_TRITON_SUMS_APART=1), beside the default")
    p.add_argument("--no-conv", action="store_true", help="skip part 2")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--markdown", help="write the tables here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ops_bandwidth: needs a CUDA device; none found", file=sys.stderr)
        return 2
    from fused_res.backends import available_backends, get_backend_object

    device = torch.device("cuda")
    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    # cuDNN picks its algorithms by timing them, as the bench lets eager do (bench/timing.py):
    # the conv table's baseline is its best, not its heuristic's first choice.
    torch.backends.cudnn.benchmark = True
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s "
          f"(read + write), batch {a.batch}, {a.dtype}, channels_last", flush=True)
    avail = available_backends()
    rows, lines = [], []
    lines.append(f"copy bandwidth {bw / 1e9:.0f} GB/s; fraction = fewest bytes / time / copy "
                 "bandwidth\n")
    lines.append("| backend | pass | shape (N,C,H,W) | eager ms | graph ms | GB/s | "
                 "fraction of copy | vs same-size copy | rel err vs reference |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    from fused_res.testing import TOLERANCES
    apply_tol = TOLERANCES[dtype]
    copy_cache: dict[int, float] = {}
    for name in a.backends.split(","):
        base, only, wrap = VARIANTS.get(name, (name, None, None))
        if base not in avail or not avail[base].available:
            print(f"backend {name}: not available ({avail.get(base)})", flush=True)
            continue
        be = get_backend_object(base)
        for c, hw in ACTIVATIONS:
            try:
                cases = apply_cases(be, a.batch, c, hw, dtype, device)
            except Exception as e:  # record and go on: one failure must not end the run
                print(f"{name} {c}x{hw}: FAILED to set up: {e!r}", flush=True)
                continue
            for op, fn, ref_fn, sets, nbytes in cases:
                if only is not None and op != only:
                    continue
                if wrap is not None:
                    fn = wrap(fn)
                try:
                    # Against the reference backend's same pass: a fast wrong pass is no
                    # bandwidth (these rows were timed unchecked until 2026-11-28).
                    err = pass_error(fn, ref_fn, sets[0])
                    eager = time_ms(fn, sets)
                    ms = graph_ms(fn, sets)
                except Exception as e:
                    print(f"{name} {op} {c}x{hw}: FAILED: {e!r}", flush=True)
                    rows.append({"backend": name, "op": op, "shape": [a.batch, c, hw, hw],
                                 "error": repr(e)})
                    continue
                frac = nbytes / (ms / 1e3) / bw
                if nbytes not in copy_cache:
                    copy_cache[nbytes] = same_size_copy_ms(nbytes, device)
                vs_copy = copy_cache[nbytes] / ms
                shape = [a.batch, c, hw, hw]
                wrong = not err <= apply_tol  # NaN is wrong
                rows.append({"backend": name, "op": op, "shape": shape, "ms": ms,
                             "eager_ms": eager, "bytes": nbytes, "fraction_of_copy": frac,
                             "same_size_copy_ms": copy_cache[nbytes],
                             "vs_same_size_copy": vs_copy, "rel_err": _json_num(err),
                             "wrong": wrong})
                lines.append(f"| {name} | {op} | {tuple(shape)} | {eager:.4f} | {ms:.4f} | "
                             f"{nbytes / (ms / 1e3) / 1e9:.0f} | {frac:.2f} | {vs_copy:.2f} | "
                             f"{err:.1e}{' WRONG' if wrong else ''} |")
            del cases
            torch.cuda.empty_cache()
    summary = ["", "| backend | pass | geomean fraction of copy | min | max | "
               "geomean vs same-size copy |", "|---|---|---|---|---|---|"]
    for name in a.backends.split(","):
        for op in ("apply_fwd", "apply_bn_relu", "apply_bwd", "stats"):
            mine = [r for r in rows if r["backend"] == name and r["op"] == op and "ms" in r
                    and not r["wrong"]]
            if mine:
                fr = [r["fraction_of_copy"] for r in mine]
                g = math.exp(sum(math.log(f) for f in fr) / len(fr))
                gc = math.exp(sum(math.log(r["vs_same_size_copy"]) for r in mine) / len(mine))
                summary.append(f"| {name} | {op} | {g:.2f} | {min(fr):.2f} | {max(fr):.2f} | "
                               f"{gc:.2f} |")
    lines += summary
    conv_rows, peaks = [], None
    # Against cuDNN's own rounded result, DESIGN.md §4's tolerance (tf32 for float32, which
    # both take where torch allows it), as conv_configs.py judges its tiles.
    conv_tol = TOLERANCES["tf32" if dtype == torch.float32 else dtype]
    if not a.no_conv and "triton" in avail and avail["triton"].available:
        peaks = conv_peaks(dtype, device)
        lines += ["", "conv alone, Triton vs cuDNN (F.conv2d); ratio = Triton time / cuDNN time; "
                  f"FUSED_RES_TRITON_AUTOTUNE={os.environ.get('FUSED_RES_TRITON_AUTOTUNE', '1')}"
                  f"; floor = max(FLOPs / {peaks.matmul_flops_per_s / 1e12:.0f} TFLOP/s "
                  f"({peaks.matmul_dtype} matmul), fewest bytes / "
                  f"{peaks.copy_bytes_per_s / 1e9:.0f} GB/s), measured in this run",
                  "", "| conv (cin,cout,hw,k,s) | cuDNN ms | Triton ms | Triton eager ms | "
                  "ratio | floor ms | cuDNN % floor | Triton % floor | cuDNN TFLOP/s | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for cin, cout, hw, k, s in CONVS:
            try:
                cudnn, tri, sets, flops, _ = conv_cases(a.batch, cin, cout, hw, k, s, dtype, device)
                err = rel_err(tri(*sets[0]), cudnn(*sets[0]))
                t_c = graph_ms(cudnn, sets)
                t_t = graph_ms(tri, sets)
                t_e = time_ms(tri, sets)
            except Exception as e:
                print(f"conv {(cin, cout, hw, k, s)}: FAILED: {e!r}", flush=True)
                conv_rows.append({"conv": [cin, cout, hw, k, s], "error": repr(e)})
                continue
            floor = conv_floor_ms(peaks, a.batch, cin, cout, hw, k, s, dtype)
            conv_rows.append({"conv": [cin, cout, hw, k, s], "cudnn_ms": t_c, "triton_ms": t_t,
                              "triton_eager_ms": t_e, "ratio": t_t / t_c, "flops": flops,
                              "floor_ms": floor, "rel_err": _json_num(err),
                              "wrong": not err <= conv_tol})  # NaN is wrong
            lines.append(f"| {(cin, cout, hw, k, s)} | {t_c:.4f} | {t_t:.4f} | {t_e:.4f} | "
                         f"{t_t / t_c:.2f} | {floor:.4f} | {100 * floor / t_c:.0f} | "
                         f"{100 * floor / t_t:.0f} "
                         f"| {flops / (t_c / 1e3) / 1e12:.0f} | {err:.1e} |")
        ok = [r["ratio"] for r in conv_rows if "ratio" in r and not r["wrong"]]
        if ok:
            g = math.exp(sum(math.log(x) for x in ok) / len(ok))
            lines.append(f"\nTriton/cuDNN time, geomean over {len(ok)} convs: {g:.2f} "
                         f"(target ≤ 1.15); worst {max(ok):.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": "fused_res.ops_bandwidth/1",
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "dtype": a.dtype, "batch": a.batch,
                       "copy_bytes_per_s": bw, "apply": rows, "conv": conv_rows,
                       "conv_peaks": peaks.to_dict() if peaks is not None else None}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
