"""Where a step's time goes: device time per kernel family, per contender, in one run.

    python benchmarks/profile_step.py [--model resnet50] [--mode train] [--batch 128]
        [--dtype bf16] [--contenders eager-cl,fused-triton,fused-cuda] [--steps 3]
        [--json F] [--markdown F]

For each contender it builds the bench's model and step (fused_res.bench: same precision,
same SGD step), warms up, times `--steps` steps with CUDA events (wall time per step, launch
cost included), then profiles the same steps with torch.profiler and sums each kernel's
device time into families: our Triton conv, our Triton elementwise/statistics kernels, our
CUDA kernels (namespace frk), cuDNN/CUTLASS convolutions, aten's BatchNorm, aten's other
elementwise and reductions, the optimizer, copies. `busy` is the kernels' total over the wall
time: well under 1 means the host (Python, dispatch, launches) is what the step waits on.

A diagnosis, not a benchmark: profiling perturbs timing, and the speed claims stay with
`python -m fused_res bench`. On a CPU it profiles CPU operators instead (a smoke test of the
script, no statement about any GPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import torch

# First match wins; names are demangled kernel names (CUDA) or operator names (CPU).
# Every Triton kernel of fused_res/triton by name (a test lists them from the sources): one
# missing fell to "other", or, with "conv" in its name, to cuDNN's family.
FAMILIES = (
    ("triton conv", r"conv_(unit|pair)_kernel|conv1x1_tma_kernel"),
    ("triton elementwise", r"epilogue_(fwd|bwd)_kernel|stats_(partial|finalize|bwd)_kernel"
                           r"|channel_sums_kernel|bn_(scale|scale_bwd|running)_kernel"),
    ("fused_res cuda", r"\bfrk::"),
    ("cudnn/cutlass conv", r"xmma|cutlass|implicit_gemm|cudnn|wgrad|dgrad|fprop|conv|nhwc"
                           r"|sm[0-9]{2}_"),
    ("aten batchnorm", r"batch_norm|batchnorm|bn_fw|bn_bw|welford"),
    ("optimizer", r"multi_tensor|foreach|sgd"),
    ("copy/fill", r"memcpy|memset|copy|fill|cat_"),
    ("aten elementwise/reduce", r"elementwise|vectorized|unrolled|reduce|relu|add|mul"),
)
_COMPILED = [(name, re.compile(pat, re.IGNORECASE)) for name, pat in FAMILIES]


def family(name: str) -> str:
    """The family of a kernel or operator name ('other' when no pattern matches)."""
    for fam, pat in _COMPILED:
        if pat.search(name):
            return fam
    return "other"


def _device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def device_kernels(prof, device: str) -> dict[str, float]:
    """{kernel (or CPU operator) name: self time in microseconds} summed over the profile."""
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        if device == "cuda":
            is_kernel = str(getattr(evt, "device_type", "")).endswith("CUDA")
            us = _device_us(evt)
            if not is_kernel or us <= 0:
                continue
        else:
            us = float(evt.self_cpu_time_total)
            if us <= 0:
                continue
        out[evt.key] = out.get(evt.key, 0.0) + us
    return out


def by_family(kernels: dict[str, float]) -> dict[str, float]:
    fams: dict[str, float] = {}
    for name, us in kernels.items():
        fams[family(name)] = fams.get(family(name), 0.0) + us
    return fams


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(step, x, steps: int, device: str) -> float:
    """Median wall time of one step (CUDA events on a GPU, perf_counter on a CPU)."""
    times = []
    for _ in range(steps):
        _sync(device)
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def profile_contender(name: str, config, workload, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from fused_res.bench import contenders as C
    from fused_res.bench.runner import make_step
    from fused_res.bench.workloads import calibrate_bn

    dev = config.device
    torch.manual_seed(config.seed)
    model = workload.build().to(dev)
    shape = workload.input_shape(config.batches[0])
    calibrate_bn(model, torch.randn(min(shape[0], 8), *shape[1:], device=dev))
    model.train(config.mode == "train")
    built = C.build(name, model, workload, config)
    step = make_step(C.call_with(built), built.module, config.mode, config.dtype, dev)
    x = torch.randn(shape, device=dev).contiguous(memory_format=built.memory_format)
    for _ in range(3):
        step(x)
    ms = wall_ms(step, x, steps, dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(x)
        _sync(dev)
    kernels = {k: us / steps for k, us in device_kernels(prof, dev).items()}
    fams = by_family(kernels)
    busy_ms = sum(kernels.values()) / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"contender": name, "wall_ms": ms, "kernel_ms": busy_ms,
            "busy": busy_ms / ms if ms > 0 else None,
            "families_ms": {k: v / 1e3 for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
            "top_ms": [[k, v / 1e3] for k, v in top], "note": built.note}


def markdown(rows: list[dict], head: str) -> str:
    fams = []
    for r in rows:
        for f in r.get("families_ms", {}):
            if f not in fams:
                fams.append(f)
    lines = [head, "", "| contender | wall ms | kernel ms | busy | " + " | ".join(fams) + " |",
             "|---|---|---|---|" + "---|" * len(fams)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {r['error']} |")
            continue
        cells = [f"{r['families_ms'].get(f, 0.0):.2f}" for f in fams]
        lines.append(f"| {r['contender']} | {r['wall_ms']:.2f} | {r['kernel_ms']:.2f} | "
                     f"{r['busy']:.2f} | " + " | ".join(cells) + " |")
    for r in rows:
        if "top_ms" in r:
            lines += ["", f"top kernels, {r['contender']} (ms per step):", ""]
            lines += [f"- {v:.3f}  {k[:140]}" for k, v in r["top_ms"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--batch", type=int, default=None, help="(128 on CUDA, 2 on a CPU)")
    p.add_argument("--dtype", default=None, help="bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--contenders", default="eager-cl,fused-triton,fused-cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps {a.steps}: accepted: an integer >= 1")
    from fused_res.bench.config import BenchConfig, ConfigError
    from fused_res.bench.workloads import get_workload

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; accepted: cpu")
    try:
        config = BenchConfig(models=(a.model,), batches=(a.batch or (128 if dev == "cuda"
                                                                     else 2),),
                             dtype=a.dtype or ("bf16" if dev == "cuda" else "fp32"),
                             mode=a.mode, device=dev)
        workload = get_workload(a.model)
    except ConfigError as e:
        p.error(str(e))
    rows = []
    for name in [c for c in a.contenders.split(",") if c]:
        try:
            rows.append(profile_contender(name, config, workload, a.steps))
        except Exception as e:  # one contender failing is data too  # noqa: BLE001
            rows.append({"contender": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1])[:400], flush=True)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (operator times, not kernels)"
    head = (f"{a.model} {a.mode} {config.dtype} batch {config.batches[0]}, {gpu}, torch "
            f"{torch.__version__}; ms per step; families are device time per step")
    md = markdown(rows, head)
    print(md)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(md)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(
            {"schema": "fused_res.profile_step/1", "device": gpu, "torch": torch.__version__,
             "model": a.model, "mode": a.mode, "dtype": config.dtype,
             "batch": config.batches[0], "rows": rows}, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
