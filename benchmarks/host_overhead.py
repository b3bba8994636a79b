"""The host-side cost of the fused Triton path, on any machine: a fused ResNet forward with the
conv kernel's launch replaced by a no-op, so what is timed is our Python, the custom-op
dispatch and the argument preparation, not the kernel or Triton's launcher.

    python benchmarks/host_overhead.py [--model resnet50] [--repeats 20] [--profile]

Without CUDA graphs this cost is paid per conv unit on every call; on the first H100 run the
fused-triton blocks took 1.1-1.7 ms per call against 0.2-0.6 ms as graph replays. Not a speed
claim about the GPU: a way to see the host path shrink or grow between commits.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="also print the top functions")
    a = p.parse_args(argv)
    # The interpreter flag makes the backend run on CPU tensors; the stub below means no
    # kernel is ever interpreted.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FUSED_RES_TRITON_AUTOTUNE"] = "0"
    import torch

    import fused_res
    import fused_res.triton.conv as tconv
    from fused_res import models

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    tconv.conv_unit_kernel = _NoLaunch()
    torch.set_num_threads(1)
    model = getattr(models, a.model)().eval().to(memory_format=torch.channels_last)
    fused = fused_res.convert(copy.deepcopy(model), backend="triton").eval()
    units = sum(1 for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            fused(x)
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            fused(x)
        ms = (time.perf_counter() - t0) / a.repeats * 1e3
        print(f"{a.model}: {ms:.2f} ms of host work per eval forward, {units} convs, "
              f"{1e3 * ms / units:.0f} us per conv unit (conv launch stubbed out)")
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.repeats):
                fused(x)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(30)
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
