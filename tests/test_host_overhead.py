"""benchmarks/host_overhead.py on the CPU: every Triton kernel stubbed out (none of them run in
the interpreter, whose numpy work would swamp the host time it measures), and the launch
count of a fused ResNet-50 eval forward."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_eval_forward_stubs_every_kernel_and_counts_its_launches():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "resnet50", "--mode", "eval",
                           "--repeats", "2", "--rounds", "1", "--launches"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"fused-triton (\d+) \((\d+) aten, (\d+) Triton\)", proc.stdout)
    assert m, proc.stdout
    # 53 convs: 49 kernels, the 4 downsampling blocks' last conv and projection shortcut in
    # one each; aten: the stem's autocast casts, max pool, mean, fc. An interpreted kernel
    # would add aten copies by the dozen.
    assert (int(m[2]), int(m[3])) == (6, 49), proc.stdout
