"""Timing: device events on CUDA (perf_counter on the CPU), warm-up, per-iteration samples,
rotated inputs, an L2 flush between iterations, optional CUDA-graph capture, and the
precision every contender runs under."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch


@contextlib.contextmanager
def math_mode(dtype: str) -> Iterator[None]:
    """fp32: true fp32 (TF32 off, also for cuDNN, whose default is on); tf32: TF32 math.
    cuDNN autotuning (benchmark mode) on, so eager gets its best algorithms too."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = old


def autocast_for(dtype: str, device: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32/tf32. cache_enabled=False so the same code can
    be captured in a CUDA graph (autocast's weight-cast cache is not capture-safe)."""
    if dtype not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    low = torch.bfloat16 if dtype == "bf16" else torch.float16
    return torch.autocast(device, dtype=low, cache_enabled=False)


def rotation_count(input_bytes: int, device: str, asked: int = 0) -> int:
    """How many distinct inputs to cycle through: `asked`, or enough to cover twice the L2
    cache (CUDA; at least 2, at most 16), or 3 on the CPU."""
    if asked:
        return asked
    if device != "cuda":
        return 3
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, min(16, math.ceil(2 * l2 / max(1, input_bytes))))


class L2Flush:
    """Overwrite a buffer twice the L2 size, so an iteration does not start with the previous
    one's weights and activations in cache. A no-op on the CPU."""

    def __init__(self, device: str, enabled: bool = True) -> None:
        self.buf = None
        if device == "cuda" and enabled:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
            self.buf = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)

    def __call__(self, _x: torch.Tensor | None = None) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_loop(step: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], *,
              device: str, warmup: int, repeats: int,
              before: Callable[[torch.Tensor], None] | None = None,
              progress: Callable[[], None] | None = None) -> list[float]:
    """Seconds per call of step(x) for `repeats` timed calls after `warmup` untimed ones,
    x cycling through `inputs`. before(x) runs outside the timed region (L2 flush, copying x
    into a graph's static input). CUDA: one event pair per call, read after the loop; the
    host waits only for before(x)'s work, so that each call starts on an idle device: a
    host-bound call issuing its launches while the device still ran the flush had the
    flush's time hidden from its own (up to ~30 us of a ~200 us block)."""
    cuda = device == "cuda"
    for i in range(warmup):
        x = inputs[i % len(inputs)]
        if before is not None:
            before(x)
        step(x)
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
    samples: list[float] = []
    for i in range(repeats):
        x = inputs[(warmup + i) % len(inputs)]
        if before is not None:
            before(x)
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            events[i][0].record()
            step(x)
            events[i][1].record()
        else:
            t0 = time.perf_counter()
            step(x)
            samples.append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    if cuda:
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) / 1e3 for s, e in events]
    return samples


def capture_graph(step: Callable[[torch.Tensor], object], example: torch.Tensor,
                  warmup: int = 3) -> tuple[Callable[[torch.Tensor], None],
                                            Callable[[torch.Tensor], object]]:
    """Capture step(static_x) in a CUDA graph. Returns (before, replay): before(x) copies x
    into the static input (untimed), replay(x) replays the graph and returns its output."""
    static = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # lazy state (optimizer buffers, cuDNN plans) before capture
            step(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)

    def before(x: torch.Tensor) -> None:
        static.copy_(x)

    def replay(_x: torch.Tensor) -> object:
        graph.replay()
        return out

    replay.graph = graph  # keep the graph (and its memory pool) alive with the callable
    return before, replay


def summarize(samples: Sequence[float]) -> dict:
    """Median, spread (p10/p90, IQR), min, max, mean, stdev and the raw samples, in seconds."""
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        if n == 1:
            return s[0]
        k = (n - 1) * p
        lo = math.floor(k)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9), "iqr": q(0.75) - q(0.25),
            "min": s[0], "max": s[-1], "mean": statistics.fmean(s),
            "stdev": statistics.stdev(s) if n > 1 else 0.0, "n": n, "samples": list(samples)}
