"""Units (conv -> BN -> ReLU) and residual blocks at the ResNet stage shapes, eval and train,
through the same builders, precision and correctness gate as `python -m fused_res bench`."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch

from fused_res.bench import contenders as C
from fused_res.bench.config import BenchConfig
from fused_res.bench.roofline import trace_costs, work
from fused_res.bench.runner import make_step
from fused_res.bench.timing import L2Flush, autocast_for, math_mode
from fused_res.bench.workloads import GROUPS, calibrate_bn, get_workload
from fused_res.testing import rel_err

DEVICE = os.environ.get("FUSED_RES_BENCH_DEVICE") or (
    "cuda" if torch.cuda.is_available() else "cpu")
DTYPE = os.environ.get("FUSED_RES_BENCH_DTYPE") or ("bf16" if DEVICE == "cuda" else "fp32")
BATCH = int(os.environ.get("FUSED_RES_BENCH_BATCH") or (64 if DEVICE == "cuda" else 2))

WORKLOADS = [*GROUPS["rn50-units"], *GROUPS["rn50-blocks"], *GROUPS["rn18-blocks"],
             *GROUPS["cifar-blocks"]]
CONTENDERS = ["eager-cl", "fused-auto", "fused-reference"] + (
    ["cudnn-fused"] if DEVICE == "cuda" else [])
CASES = [(w, m, c) for w, m, c in itertools.product(WORKLOADS, ("eval", "train"), CONTENDERS)
         if not (m == "train" and c == "cudnn-fused")]


@pytest.mark.parametrize("workload,mode,contender", CASES,
                         ids=[f"{w}-{m}-{c}" for w, m, c in CASES])
def test_bench(benchmark, workload, mode, contender):
    cfg = BenchConfig(models=(workload,), batches=(BATCH,), dtype=DTYPE, mode=mode,
                      device=DEVICE, contenders=(contender,))
    wl = get_workload(workload)
    why = C.unavailable(contender, wl, cfg)
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    model = wl.build().to(DEVICE)
    shape = wl.input_shape(BATCH)
    calibrate_bn(model, torch.randn(max(2, min(BATCH, 8)), *shape[1:], device=DEVICE))
    model.train(mode == "train")
    flops, nbytes = work(trace_costs(model, wl.sample_shape), BATCH, mode, cfg.element_bytes)
    inputs = [torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
              for _ in range(3)]
    flush = L2Flush(DEVICE)
    with math_mode(DTYPE):
        eager = C.build("eager-cl", model, wl, cfg)  # the model itself, for the gate
        with torch.no_grad(), autocast_for(DTYPE, DEVICE):
            ref = eager.forward(inputs[0]).float()
        built = C.build(contender, copy.deepcopy(model), wl, cfg)
        fwd = C.call_with(built)
        with torch.no_grad(), autocast_for(DTYPE, DEVICE):
            out = fwd(inputs[0]).float()
        # A loose gate (both sides at the run's precision): a wrong contender is not timed.
        assert rel_err(out, ref) <= 5e-2, f"{contender} disagrees with eager"
        step = make_step(fwd, built.module, mode, DTYPE, DEVICE)
        rotation = itertools.cycle(inputs)

        def setup():
            x = next(rotation)
            flush(x)
            return (x,), {}

        def timed(x):
            step(x)
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{workload} {mode} {DTYPE} b{BATCH}"
        benchmark.extra_info.update({"flops": flops, "bytes_min": nbytes, "device": DEVICE,
                                     "dtype": DTYPE, "batch": BATCH, "note": built.note})
        benchmark.pedantic(timed, setup=setup, rounds=20 if DEVICE == "cuda" else 3,
                           warmup_rounds=2, iterations=1)
