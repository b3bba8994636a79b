"""benchmarks/gpu_check.sh on the CPU: argument handling, the time budget, and a dry run of
its steps end to end (no build, the GPU tests skipped, tiny CPU benchmarks, the summary)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from fused_res.bench import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "build", "import", "pytest-gpu", "pytest-gpu-triton", "bench-rn50-train-b128",
         "profile-train-b128", "ops-bandwidth", "host-profile", "bench-blocks-eval-b256",
         "bench-rn50-eval-b256", "bench-rn50-eval-b64", "pair-ab", "pytest-gpu-tma",
         "conv-configs", "conv-configs-stats", "conv-configs-train", "bench-blocks-eval-b64",
         "bench-rn50-train-auto", "bench-blocks-train-b64", "bench-units-eval",
         "bench-blocks-compile", "bench-blocks-eval-tuned", "bench-rn50-eval-b256-max-autotune"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(args, timeout=120, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=full)


def test_syntax_and_usage(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    none = _run([])
    assert none.returncode == 2 and "OUTDIR" in none.stderr
    bad = _run([str(tmp_path), "--fast"])
    assert bad.returncode == 2 and "--fast" in bad.stderr and "accepted" in bad.stderr
    # A probe: a misspelt step name was skipped silently and the run exited 0.
    typo = _run([str(tmp_path), "--dry-run"], FUSED_RES_GPU_CHECK_ONLY="env,bench-rn50-eval")
    assert typo.returncode == 2 and "'bench-rn50-eval'" in typo.stderr, typo.stderr
    assert "accepted" in typo.stderr and "bench-rn50-eval-b64" in typo.stderr
    assert not (tmp_path / "gpu_check.log").exists()


def test_every_step_is_listed_in_order():
    text = SCRIPT.read_text()
    listed = text[text.index("ALL_STEPS=(") + 11:text.index(")", text.index("ALL_STEPS=("))]
    assert listed.split() == STEPS


def test_dry_run_end_to_end(tmp_path):
    # Every kind of step once (environment, skipped build, import, pytest -m gpu, the Triton
    # tests run in the background beside the build, an eval bench step with --cuda-graphs
    # filtered out, a train bench step); the rest are deselected, which the summary records.
    only = ("env,build,import,pytest-gpu,pytest-gpu-triton,bench-rn50-eval-b64,"
            "bench-blocks-train-b64,profile-train-b128")
    proc = _run([str(tmp_path), "--dry-run"], timeout=150, FUSED_RES_GPU_CHECK_ONLY=only)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files - {"bench.png"} == {"bench.json", "env.txt", "gpu_check.log", "pytest_gpu.xml",
                                     "steps.tar.gz", "summary.md"}  # the chart needs matplotlib
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("files: ") and "problems: none" in tail[-1]
    assert any("eager-cl img/s" in line for line in tail[-8:])  # the summary table prints last
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert merged["schema"] == "fused_res.gpu_check/1"
    status = {s["step"]: s["status"] for s in merged["steps"]}
    assert list(status) == STEPS
    # A step's own FUSED_RES_* settings lead its command (the tuned step read as untuned).
    command = {s["step"]: s["command"] for s in merged["steps"]}
    assert command["bench-blocks-eval-tuned"].startswith("FUSED_RES_TRITON_AUTOTUNE=1 ")
    assert "FUSED_RES_" not in command["bench-rn50-eval-b64"].split(" -m ")[0]
    assert status["build"] == "skipped" and status["pytest-gpu"] == "ok"
    assert status["pytest-gpu-triton"] == "ok"  # collected, skipped without CUDA
    assert status["bench-rn50-eval-b64"] == "ok" and status["bench-rn50-eval-b256"] == "skipped"
    assert status["profile-train-b128"] == "ok"
    assert set(merged["runs"]) == {"rn50-eval-b64", "blocks-train-b64"}
    for run in merged["runs"].values():
        assert validate(run) == [] and run["config"]["device"] == "cpu"
        assert run["environment"]["fused_res_env"]["FUSED_RES_TRITON_AUTOTUNE"] == "0"
        assert not run["config"]["cuda_graphs"]
    assert merged["runs"]["blocks-train-b64"]["config"]["mode"] == "train"
    profile = merged["extras"]["profile-train-b128"]
    assert profile["schema"] == "fused_res.profile_step/1"
    assert [r["contender"] for r in profile["rows"]] == ["eager-cl", "fused-triton",
                                                         "fused-cuda"]
    log = (tmp_path / "gpu_check.log").read_text()
    # The background step's output joins the log whole, after the step it ran beside.
    assert log.index("=== pytest-gpu-triton") > log.index("=== pytest-gpu (")
    assert "skipped" in log[log.index("=== pytest-gpu-triton"):]
    assert "pip install --no-build-isolation --no-deps -e ." in log
    assert "python" in (tmp_path / "env.txt").read_text()
    assert "## Summary" in (tmp_path / "summary.md").read_text()


def test_budget_bounds_every_step(tmp_path):
    proc = _run([str(tmp_path), "--dry-run"], FUSED_RES_GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1
    merged = json.loads((tmp_path / "bench.json").read_text())
    states = {s["step"]: s["status"] for s in merged["steps"]}
    assert states.pop("build") == "skipped" and states.pop("ops-bandwidth") == "skipped"
    assert states.pop("conv-configs") == "skipped"
    assert states.pop("conv-configs-train") == "skipped"
    assert states.pop("conv-configs-stats") == "skipped"
    assert states.pop("pair-ab") == "skipped"  # (the CUDA-only steps are not run dry)
    assert set(states.values()) == {"out-of-time"}
    assert "problems: env" in proc.stdout


def test_the_run_ends_within_its_budget_when_steps_and_summary_hang(tmp_path):
    """A probe: the last step could run its limit plus the kill delay, then the summary 60 s,
    against a 20 s reserve: a run ended ~50 s past its budget. Here every python call
    hangs (the env step's and the summary's)."""
    import time

    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 300\n")
    hang.chmod(0o755)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _run([str(out), "--dry-run"], timeout=150, PYTHON=str(hang),
                FUSED_RES_GPU_CHECK_BUDGET_S="50", FUSED_RES_GPU_CHECK_ONLY="env")
    assert time.monotonic() - t0 <= 52, proc.stdout[-2000:]
    log = (out / "gpu_check.log").read_text()
    assert "=== env (limit 15s)" in log or "=== env (limit 14s)" in log, log[:500]


def test_profile_step_sorts_kernel_names_into_families():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.pop(0)
    cases = {
        "conv_unit_kernel": "triton conv",
        "conv_pair_kernel": "triton conv",
        "epilogue_bwd_kernel": "triton elementwise",
        "stats_finalize_kernel": "triton elementwise",
        "void frk::reduce_nhwc_kernel<__nv_bfloat16, 8>(frk::ReduceArgs)": "fused_res cuda",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64":
            "cudnn/cutlass conv",
        "void cudnn::engines_precompiled::nhwcToNchwKernel<float>(...)": "cudnn/cutlass conv",
        "void at::native::batch_norm_collect_statistics_channels_last_kernel<...>":
            "aten batchnorm",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, ...>": "aten elementwise/reduce",
        "Memset (Device)": "copy/fill",
        "some_new_kernel": "other",
    }
    for name, fam in cases.items():
        assert profile_step.family(name) == fam, name
    # Every launched Triton kernel of the package (a @triton.jit function named *_kernel).
    import re
    kernels = {m for f in (ROOT / "fused_res" / "triton").glob("*.py")
               for m in re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", f.read_text())}
    assert {"conv_unit_kernel", "channel_sums_kernel", "bn_scale_kernel"} <= kernels
    for name in kernels:
        assert profile_step.family(name).startswith("triton "), name
