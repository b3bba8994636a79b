"""fused_res.triton.launch: the direct launch of an already compiled Triton kernel.

On the CPU, Triton's driver is replaced by a stub (benchmarks/launch_overhead.py), so the
real JIT compiles the real kernels for sm_90 and hands its launcher the call; the direct path
must hand over the same call, reuse a compiled kernel only where the JIT would pick that one,
and step aside (to the JIT) for everything it does not handle."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "launch_overhead.py"


def test_direct_launch_hands_the_launcher_what_the_jit_does():
    """The unit's eight launches (conv with statistics, finalize, apply, its backward and
    sums, statistics backward, running update), 120 calls varying what Triton specializes on,
    two kernels alike but for their body, a second device, and a JIT that launches some other
    way; in a child process (the stub's compiled kernels
    must not outlive it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check-only"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 problems" in proc.stdout


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 5


@pytest.fixture
def jit_kernel(monkeypatch):
    """A real JITFunction whose run() records its calls and returns a stand-in compiled
    kernel (no compile, no launch), under a driver that has device 0."""
    import triton
    from triton.runtime.driver import driver

    from fused_res.triton import launch as fast

    @triton.jit
    def kernel(x_ptr, n, scale, FLAG: triton.language.constexpr):
        pass

    runs, launched = [], []
    compiled = types.SimpleNamespace(
        function="f", packed_metadata="m", launch_metadata=lambda grid, stream, *a: None,
        run=lambda *a: launched.append(a))

    def run(*args, grid, warmup, **kwargs):
        runs.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", run)
    saved = driver._active
    driver.set_active(_Driver())
    fast.set_enabled(True)
    try:
        yield kernel, runs, launched
    finally:
        driver._active = saved
        fast.set_enabled(os.environ.get("FUSED_RES_TRITON_FAST_LAUNCH", "1") != "0")


def test_second_call_skips_the_jit(jit_kernel):
    from fused_res.triton.launch import launch

    kernel, runs, launched = jit_kernel
    x = torch.zeros(64)
    launch(kernel, (4,), x, 100, 0.5, FLAG=True)
    launch(kernel, (4, 2), x, 100, 0.5, FLAG=True)
    assert len(runs) == 1 and len(launched) == 1
    grid_x, grid_y, grid_z, stream, fn, meta, _, _, _, *args = launched[0]
    assert (grid_x, grid_y, grid_z, stream, fn, meta) == (4, 2, 1, 5, "f", "m")
    # every parameter in signature order, the constexpr from its keyword
    assert args[0] is x and args[1:] == [100, 0.5, True]


@pytest.mark.parametrize("change", ["int", "int_one", "alignment", "dtype", "none", "bool",
                                    "keyword", "grid_callable", "odd_argument",
                                    "keyword_tensor", "disabled"])
def test_what_the_jit_must_see_again(jit_kernel, change):
    """Each change to what Triton specializes on (or to what the direct path handles) goes
    back through the JIT."""
    from fused_res.triton import launch as fast

    kernel, runs, launched = jit_kernel
    base = torch.zeros(64)
    fast.launch(kernel, (1,), base, 32, 0.5, FLAG=True)
    args, kw, grid = [base, 32, 0.5], {"FLAG": True}, (1,)
    if change == "int":
        args[1] = 48
    elif change == "int_one":
        args[1] = 1
    elif change == "alignment":
        args[0] = base[1:]
    elif change == "dtype":
        args[0] = base.half()
    elif change == "none":
        args[0] = None
    elif change == "bool":
        args[1] = True  # a bool where an int was: Triton types it u1
    elif change == "keyword":
        kw["FLAG"] = False
    elif change == "grid_callable":
        grid = lambda meta: (1,)  # noqa: E731
    elif change == "odd_argument":
        args[1] = types.SimpleNamespace(value=32)
    elif change == "keyword_tensor":
        kw["FLAG"] = base
    elif change == "disabled":
        fast.set_enabled(False)
    fast.launch(kernel, grid, *args, **kw)
    assert len(runs) == 2 and not launched
    fast.launch(kernel, grid, *args, **kw)
    reused = change in ("int", "int_one", "alignment", "dtype", "none", "bool", "keyword")
    assert len(runs) == (2 if reused else 3)
    assert len(launched) == (1 if reused else 0)


@pytest.mark.parametrize("call", ["constexpr_positional", "runtime_by_keyword",
                                  "pre_run_hook", "incompatible_jit", "stages_hook"])
def test_calls_the_key_cannot_describe_always_take_the_jit(jit_kernel, call, monkeypatch):
    """A constexpr passed positionally (a float is keyed by type only), a runtime argument
    passed by keyword (its stored value would be reused), a kernel with pre-run hooks, a
    Triton whose JIT calls the launcher differently, a stages inspection hook: never
    cached."""
    import triton

    from fused_res.triton import launch as fast

    kernel, runs, launched = jit_kernel
    x = torch.zeros(64)
    args, kw = (x, 16, 0.5), {"FLAG": True}
    if call == "constexpr_positional":
        args, kw = (x, 16, 0.5, True), {}
    elif call == "runtime_by_keyword":
        args, kw = (x, 16), {"scale": 0.5, "FLAG": True}
    elif call == "pre_run_hook":
        monkeypatch.setattr(kernel, "pre_run_hooks", [lambda *a, **k: None])
    elif call == "incompatible_jit":
        monkeypatch.setitem(fast._STATE, "compatible", False)
    elif call == "stages_hook":
        monkeypatch.setattr(triton.knobs.runtime, "add_stages_inspection_hook",
                            lambda: ("k", "h"))
    for _ in range(3):
        fast.launch(kernel, (1,), *args, **kw)
    assert len(runs) == 3 and not launched


def test_keyword_types_and_triton_switches_are_in_the_key(jit_kernel, monkeypatch):
    """FLAG=True and FLAG=1 are equal but may compile differently; Triton's debug switch
    and instrumentation mode select other compiled kernels."""
    import triton

    from fused_res.triton.launch import launch

    kernel, runs, launched = jit_kernel
    x = torch.zeros(64)
    launch(kernel, (1,), x, 16, 0.5, FLAG=True)
    launch(kernel, (1,), x, 16, 0.5, FLAG=1)
    assert len(runs) == 2 and not launched
    monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    launch(kernel, (1,), x, 16, 0.5, FLAG=True)
    assert len(runs) == 3
    monkeypatch.setattr(triton.knobs.runtime, "debug", False)
    monkeypatch.setattr(triton.knobs.compilation, "instrumentation_mode", "gsan")
    launch(kernel, (1,), x, 16, 0.5, FLAG=True)
    assert len(runs) == 4 and not launched


def test_this_triton_calls_the_launcher_as_expected():
    """The installed Triton's JIT launches the way the direct path repeats (else the direct
    path stays off everywhere: benchmarks/launch_overhead.py reports that as a problem)."""
    from fused_res.triton import launch as fast
    assert fast._compatible()


def test_bool_and_int_one_are_different_keys(jit_kernel):
    from fused_res.triton.launch import launch

    kernel, runs, _ = jit_kernel
    x = torch.zeros(64)
    launch(kernel, (1,), x, 1, 0.5, FLAG=True)
    launch(kernel, (1,), x, True, 0.5, FLAG=True)
    assert len(runs) == 2


def test_objects_that_are_not_jit_functions_launch_as_they_are():
    """The host-overhead stubs and Triton's autotuner: kernel[grid](...) as written."""
    from fused_res.triton.launch import launch

    seen = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((grid, a, k))

    launch(Stub(), (3,), 1, 2, FLAG=True)
    assert seen == [((3,), (1, 2), {"FLAG": True})]


def test_bound_launch_hands_the_launcher_the_call_with_new_tensors(jit_kernel):
    """launch.bind: after one cached launch, the same call with other tensors of the same
    dtype, without the JIT and without computing the key again."""
    from fused_res.triton import launch as fast

    kernel, runs, launched = jit_kernel
    x = torch.zeros(64)
    assert fast.bind(kernel, (2,), (x, 16, 0.5), {"FLAG": True}) is None  # never launched
    fast.launch(kernel, (2,), x, 16, 0.5, FLAG=True)  # the JIT: compiled and cached
    bound = fast.bind(kernel, (2,), (x, 16, 0.5), {"FLAG": True}, varying=(0,))
    assert bound is not None
    y = torch.ones(64)
    bound((y, 16, 0.5))
    assert len(runs) == 1 and len(launched) == 1
    grid_x, grid_y, grid_z, stream, fn, meta, _, _, _, *args = launched[0]
    assert (grid_x, grid_y, grid_z, stream, fn, meta) == (2, 1, 1, 5, "f", "m")
    assert args[0] is y and args[1:] == [16, 0.5, True]


@pytest.mark.parametrize("change", ["alignment", "disabled", "debug", "pre_run_hook",
                                    "device"])
def test_bound_launch_goes_through_launch_where_its_key_changed(jit_kernel, change,
                                                                monkeypatch):
    """What a bound launch checks per call (a varying tensor's alignment, the direct path
    turned off, Triton's switches, pre-run hooks, the current device): on a change it
    launches through launch(), which takes the JIT for what it has not seen."""
    import triton
    from triton.runtime.driver import driver

    from fused_res.triton import launch as fast

    kernel, runs, launched = jit_kernel
    base = torch.zeros(64)
    fast.launch(kernel, (1,), base, 16, 0.5, FLAG=True)
    bound = fast.bind(kernel, (1,), (base, 16, 0.5), {"FLAG": True}, varying=(0,))
    arg = base
    if change == "alignment":
        arg = base[1:]
    elif change == "disabled":
        monkeypatch.setitem(fast._STATE, "on", False)
    elif change == "debug":
        monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    elif change == "pre_run_hook":
        monkeypatch.setattr(kernel, "pre_run_hooks", [lambda *a, **k: None])
    elif change == "device":
        monkeypatch.setattr(driver.active, "get_current_device", lambda: 1)
    bound((arg, 16, 0.5))
    assert len(runs) == 2 and not launched
    assert runs[-1][1][0] is arg


def test_bind_is_none_where_the_direct_path_does_not_launch(jit_kernel, monkeypatch):
    from fused_res.triton import launch as fast

    kernel, runs, launched = jit_kernel
    x = torch.zeros(64)
    fast.launch(kernel, (1,), x, 16, 0.5, FLAG=True)
    assert fast.bind(kernel, (1,), (x, 16, 0.5), {"FLAG": False}) is None  # another key
    assert fast.bind(kernel, lambda meta: (1,), (x, 16, 0.5), {"FLAG": True}) is None
    monkeypatch.setitem(fast._STATE, "compatible", False)
    assert fast.bind(kernel, (1,), (x, 16, 0.5), {"FLAG": True}) is None


class _OnDevice1(torch.Tensor):
    """A CPU tensor that says it lives on CUDA device 1."""

    def get_device(self):
        return 1


def test_a_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current device whatever its tensors' device: a model on cuda:1
    while cuda:0 is current ran its kernels on GPU 0 (found by review). launch() and the
    autotuned launch sites switch to the tensors' device first (one GPU here: the device
    calls are stubbed)."""
    from fused_res.triton import launch as fast

    current = [0]
    entered = []

    class _Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", _Device)
    seen = []

    class _Kernel:  # (not a JITFunction: launch() hands it to kernel[grid] as Triton would)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(current[0])

    t = torch.zeros(4).as_subclass(_OnDevice1)
    fast.launch(_Kernel(), (1,), 3, t, flag=True)
    assert seen == [1] and entered == [1] and current[0] == 0
    current[0] = 1
    fast.launch(_Kernel(), (1,), t)
    assert seen == [1, 1] and entered == [1]  # (already current: no switch)
    current[0] = 0
    fast.launch(_Kernel(), (1,), torch.zeros(4))  # a CPU tensor: nothing to switch to
    assert seen == [1, 1, 0]
    with fast.on_device((t,)):
        assert current[0] == 1
    assert entered == [1, 1] and fast.foreign_device((2.0, torch.zeros(1))) is None
