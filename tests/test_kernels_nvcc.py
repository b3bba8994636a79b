"""kernels/ compiles with bare nvcc (no torch) for sm_80 and sm_90, with no register spills
in any kernel (kernels/check_kernels.py prints registers per kernel)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "check_kernels.py"


def _find_nvcc():
    spec = importlib.util.spec_from_file_location("check_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_compile_for_sm80_sm90_without_spills():
    mod = _find_nvcc()
    if mod.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "90"],
                         capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 with spills" in out.stdout
    for arch in ("sm_80", "sm_90"):
        assert f"{arch} " in out.stdout
    for kernel in ("reduce_nchw_kernel", "reduce_nhwc_kernel", "elementwise_kernel",
                   "finalize_kernel", "bn_finalize_kernel"):
        assert kernel in out.stdout


def test_spill_parser_flags_spills():
    mod = _find_nvcc()
    log = ("ptxas info    : Compiling entry function '_Z3foov' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3foov\n"
           "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]\n")
    (row,) = mod.parse(log)
    assert (row["regs"], row["spill_st"], row["spill_ld"], row["arch"]) == (255, 8, 4, "sm_90")
