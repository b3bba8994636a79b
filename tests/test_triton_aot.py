"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90 on a CPU-only machine
(DESIGN.md §5 rung 3). The quick subset (one config per kernel family, bf16) runs here; the full
sweep of every kernel x config x dtype is `python -m fused_res.triton.aot` (run it in CI).

Runs in a child process without TRITON_INTERPRET, so the kernels are real JIT functions even
when another test module set the interpreter up in this process."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fused_res.triton import configs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def test_aot_subset_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fused_res.triton.aot", "--subset", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    import json
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {"conv_unit_kernel", "epilogue_fwd_kernel", "epilogue_bwd_kernel",
            "stats_partial_kernel", "stats_finalize_kernel", "stats_bwd_kernel"} <= kernels
    assert {r["sm"] for r in rows} == {80, 90}
    for r in rows:
        assert r["ok"] and r["shared"] is not None, r


def test_aot_reports_a_compile_error_as_a_failure():
    """The check must be able to fail: a tl.dot below the GPU minimum block size."""
    code = ("from fused_res.triton import aot, configs\n"
            "j = [x for x in aot.jobs(subset=True) if x[1] == 'conv_unit_kernel'][0]\n"
            "cx = dict(j[5], BLOCK_M=8, BLOCK_N=8, BLOCK_K=8)\n"
            "r = aot.compile_one((j[0], j[1], j[2], 'bad', j[4], cx, j[6], j[7], None), 90,"
            " None)\n"
            "assert not r.ok and r.error, r\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_config_exclusion_rule():
    ok = configs.ConvConfig(64, 64, 32, 4, 4)
    assert configs.conv_config_excluded(ok, 2, 9) is None
    assert "minimum" in configs.conv_config_excluded(configs.ConvConfig(8, 64, 32, 4, 3), 2, 9)
    assert "shared" in configs.conv_config_excluded(configs.ConvConfig(256, 256, 64, 8, 5), 4, 1)
    assert "miscompile" in configs.conv_config_excluded(
        configs.ConvConfig(256, 128, 32, 8, 4), 2, 9)
    assert configs.conv_config_excluded(configs.ConvConfig(256, 128, 32, 8, 4), 2, 1) is None
    for elt in (2, 4):
        for taps in (1, 9, 49):
            for c_in, c_out in ((3, 64), (64, 64), (256, 512)):
                picked = configs.conv_configs_for(elt, taps, c_in, c_out, c_in < 16)
                assert picked and all(
                    configs.conv_config_excluded(c, elt, taps) is None for c in picked)
