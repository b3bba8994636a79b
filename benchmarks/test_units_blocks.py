"""Units (conv -> BN -> ReLU) and residual blocks at the ResNet stage shapes, eval and train,
through the same builders, precision and correctness gate as `python -m fused_res bench`."""

from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch

from fused_res.bench import contenders as C
from fused_res.bench.config import BenchConfig
from fused_res.bench.roofline import measure_peaks
from fused_res.bench.runner import Case, build_and_gate, make_step
from fused_res.bench.timing import L2Flush, math_mode
from fused_res.bench.workloads import GROUPS, get_workload

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


@functools.cache
def _peaks():
    return measure_peaks(DEVICE, DTYPE, quick=True)


@functools.lru_cache(maxsize=1)  # the cases run workload by workload, contender innermost
def _case(workload: str, mode: str) -> Case:
    """The bench's case (model, inputs in the dtype a block receives, float64 reference),
    its gate calibrated on eager-cl as in a bench run."""
    cfg = BenchConfig(models=(workload,), batches=(BATCH,), dtype=DTYPE, mode=mode,
                      device=DEVICE, contenders=("eager-cl",))
    case = Case(get_workload(workload), BATCH, cfg, _peaks())
    with math_mode(DTYPE):
        gate = build_and_gate(case, "eager-cl")[2]
    assert gate["status"] == "ok", f"eager-cl: {gate['reason']}"
    return case


@pytest.mark.parametrize("workload,mode,contender", CASES,
                         ids=[f"{w}-{m}-{c}" for w, m, c in CASES])
def test_bench(benchmark, workload, mode, contender):
    cfg = BenchConfig(models=(workload,), batches=(BATCH,), dtype=DTYPE, mode=mode,
                      device=DEVICE, contenders=(contender,))
    wl = get_workload(workload)
    why = C.unavailable(contender, wl, cfg)
    if why:
        pytest.skip(why)
    case = _case(workload, mode)
    flush = L2Flush(DEVICE)
    with math_mode(DTYPE):
        # The bench's gate, against the float64 reference: output, and in train every
        # parameter gradient and running statistic. A wrong contender is not timed.
        built, fwd, gate = build_and_gate(case, contender)
        assert gate["status"] == "ok", f"{contender}: {gate['reason']}"
        step = make_step(fwd, built.module, mode, DTYPE, DEVICE)
        rotation = itertools.cycle(case.inputs[built.memory_format])

        def setup():
            x = next(rotation)
            flush(x)
            return (x,), {}

        def timed(x):
            step(x)
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{workload} {mode} {DTYPE} b{BATCH}"
        benchmark.extra_info.update({"flops": case.flops, "bytes_min": case.bytes_min,
                                     "floor_s": case.floor_s, "device": DEVICE,
                                     "dtype": DTYPE, "batch": BATCH, "note": built.note,
                                     "rel_err": gate["rel_err"]})
        benchmark.pedantic(timed, setup=setup, rounds=20 if DEVICE == "cuda" else 3,
                           warmup_rounds=2, iterations=1)
