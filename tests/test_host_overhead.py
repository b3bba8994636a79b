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
    m = re.search(r"fused-triton (\d+) \((\d+) aten, (\d+) Triton, 0 extension\)", proc.stdout)
    assert m, proc.stdout
    # 53 convs: 49 kernels, the 4 downsampling blocks' last conv and projection shortcut in
    # one each; aten: the stem's autocast casts, max pool, mean, fc. An interpreted kernel
    # would add aten copies by the dozen.
    assert (int(m[2]), int(m[3])) == (6, 49), proc.stdout


def test_launcher_stub_replaces_every_direct_launch_and_restores_the_cache(monkeypatch):
    """The GPU-only launcher A/B (host_overhead --device cuda): inside launcher_stubbed()
    every cached direct launch calls a counting no-op, a bound launch (an inference plan's,
    which shares the cache's entry) too, and the cache is as it was after."""
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    from fused_res.triton import launch as fast

    ran = []
    entries = {("k", i): [lambda *a, i=i: ran.append(i), f"fn{i}", "meta", "compiled", ()]
               for i in range(3)}
    want = {key: list(entry) for key, entry in entries.items()}
    monkeypatch.setattr(fast, "_CACHE", dict(entries))
    held = entries[("k", 0)]  # what a launch.Bound holds
    with host.launcher_stubbed() as calls:
        for key in entries:
            run, *rest = fast._CACHE[key]
            assert rest == want[key][1:]
            run(1, 1, 1, "stream")
        held[0](1, 1, 1, "stream")
        assert calls[0] == 4 and ran == []
    assert fast._CACHE == want and held[0] is want[("k", 0)][0]
    with pytest.raises(RuntimeError), host.launcher_stubbed():
        raise RuntimeError("the cache comes back after an error too")
    assert fast._CACHE == want


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_train_step_counts_five_launches_per_unit_and_times_the_three_ops_beside():
    """A ResNet-50 train step (narrowed: the same units) launches five Triton kernels per
    conv unit (conv with statistics, the statistics' last combine with the BatchNorm's scale
    and running update, the apply pass, its backward with the scale's gradient, the
    statistics' backward; ops/train_unit.py), and the step is timed with the units as three
    ops beside."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "resnet50", "--mode", "train",
                           "--repeats", "1", "--rounds", "1", "--narrow", "16", "--launches"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"fused-triton (\d+) \((\d+) aten, (\d+) Triton, 0 extension\)", proc.stdout)
    assert m and int(m[3]) == 5 * 53, proc.stdout
    assert "as three ops (FUSED_RES_TRAIN_UNIT=0)" in proc.stdout, proc.stdout


def test_cuda_backend_train_step_counts_six_extension_kernels_per_unit():
    """With the cuda backend (its CPU kernels run here), a training unit's extension ops
    would launch six CUDA kernels per step: the statistics pass and its finalize with the
    BatchNorm's (channel_stats_bn), the apply pass, the apply backward and its finalize with
    the scale's gradient (bn_epilogue_backward), the statistics' backward."""
    from fused_res import _ext

    if _ext.load() is None:
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "resnet50", "--mode", "train",
                           "--backend", "cuda", "--repeats", "1", "--rounds", "1", "--narrow",
                           "16", "--launches"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"fused-cuda (\d+) \((\d+) aten, 0 Triton, (\d+) extension\)", proc.stdout)
    assert m and int(m[3]) == 6 * 53, proc.stdout


def test_narrowing_a_cifar_resnet_is_refused_by_name():
    """--narrow only keeps an ImageNet ResNet's blocks consistent (a CIFAR ResNet's option-A
    shortcut pads a fixed count of channels): it was a traceback from the residual's shape."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "resnet20", "--narrow", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--narrow 4 --model resnet20: accepted" in proc.stderr, \
        proc.stderr[-2000:]
