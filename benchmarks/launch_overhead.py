"""Triton's JIT launch against fused_res.triton.launch on any machine, and a check that the two
hand the kernel launcher the same call.

    python benchmarks/launch_overhead.py [--repeats 2000] [--check-only]

No GPU is needed: Triton's active driver is replaced by a stub that compiles for real (sm_90)
and records each launch instead of making it, so what is timed is the host path up to the
launcher, the same on both sides (the launch itself, a C call into the CUDA driver, is the
same on both and not timed). The calls are the ones the backend makes in a ResNet-50 training
unit at (64, 256, 56, 56), bf16, channels_last, as fused_res.triton's own launchers build them:
the conv with its statistics epilogue (untuned tile), the finalize, the apply pass, its
backward with the channel sums, the statistics backward, the BatchNorm running-statistics
update.

The check (also run alone with --check-only, and by tests/test_launch.py): every call
launches the same compiled kernel with the same grid, stream, metadata, hooks and arguments
both ways, and the second path only reuses a compiled kernel where the JIT picks that same
one, over calls whose tensors' alignment, integers and dtypes vary. Exit status 1 on any
difference.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

CALLS: list[tuple] = []


class _Launcher:
    """Stands in for a compiled kernel's launcher: records the call."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        CALLS.append(args)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 2, 64, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class StubDriver:
    """A Triton driver with no GPU behind it: sm_90 target, the current device `device` (0
    until set), stream 7 + device (non-zero, and one per device, so that a launch handed the
    wrong stream shows)."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 7 + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True


@contextlib.contextmanager
def stub_driver():
    """Triton's active driver is a StubDriver inside (no GPU is touched); yields it. Use only
    in a process of its own: kernels compiled inside keep the stub's launcher."""
    from triton.runtime.driver import driver

    saved = driver._active
    stub = StubDriver()
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver._active = saved


def _recorded_unit_calls():
    """The (kernel, grid, args, kwargs) of one training unit's launches, as the package's
    launchers make them (CPU tensors; nothing runs)."""
    from fused_res.triton import batchnorm, configs, conv, elementwise

    calls = []

    def record(kernel, grid, *args, **kwargs):
        calls.append((kernel, grid, args, kwargs))

    mods = (conv, elementwise, batchnorm)
    saved = [(m, m.launch) for m in mods]
    saved_sm = elementwise.sm_count
    for m in mods:
        m.launch = record
    elementwise.sm_count = lambda device: 132
    try:
        n, c, hw, dt = 64, 256, 56, torch.bfloat16
        cl = torch.channels_last
        x = torch.randn(n, 64, hw, hw, dtype=dt).contiguous(memory_format=cl)
        wt = torch.randn(c, 64, 1, 1, dtype=dt).contiguous(memory_format=cl)
        vec = lambda: torch.rand(c) + 0.5  # noqa: E731
        cfg = configs.ConvConfig(128, 64, 64, 4, 3)
        conv.conv_launch(x, wt, None, (1, 1), (0, 0), None, None, None, "none", stats=True,
                         memory_format=cl, config=cfg, tma=False)
        z = torch.randn(n, c, hw, hw, dtype=dt).contiguous(memory_format=cl)
        parts = conv.TileStats(torch.rand(3136, c), torch.zeros(3136, c),
                               torch.rand(3136, c), torch.rand(3136) + 1)
        elementwise.stats_finalize(parts, c)
        res = torch.randn_like(z)
        y = elementwise._epilogue_forward(z, vec(), vec(), vec(), "relu", res, 1.0, None,
                                          "relu", cl)
        elementwise._epilogue_backward(torch.randn_like(z), z, y, vec(), vec(), vec(), None,
                                       "relu", "relu", 1.0, dt, True, True, True, True, cl)
        elementwise._stats_backward(torch.randn_like(z), vec(), vec(), z, vec(), dt, cl)
        batchnorm.bn_update_running(vec(), vec(), vec(), vec(), torch.zeros((), dtype=torch.long),
                                    0.1, n * hw * hw, scale_of=(vec(), 1e-5))
    finally:
        for m, f in saved:
            m.launch = f
        elementwise.sm_count = saved_sm
    return calls


def _same_launch(a: tuple, b: tuple) -> bool:
    """Two recorded launcher calls agree: grid, stream, function, metadata, hooks, and each
    argument (tensors by identity); the launch metadata (built per call) by its contents."""
    if len(a) != len(b):
        return False
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        if i == 6:
            if type(u) is not type(v) or (u is not None and (
                    u.data != v.data or [(f, x[0]) for f, x in u.extras]
                    != [(f, x[0]) for f, x in v.extras])):
                return False
        elif isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if u is not v:
                return False
        elif u != v:
            return False
    return True


def _count_jit_runs(kernel) -> list:
    """A one-element list counting kernel's JIT runs from now on (until `del kernel.run`)."""
    count = [0]
    jit_run = kernel.run

    def counted(*args, **kwargs):
        count[0] += 1
        return jit_run(*args, **kwargs)

    kernel.run = counted
    return count


@triton.jit(launch_metadata=lambda grid, metadata, args: {"grid": grid})
def _twin_a(x_ptr, n, BLOCK: triton.language.constexpr):
    triton.language.store(x_ptr + triton.language.arange(0, BLOCK), 1.0)


@triton.jit
def _twin_b(x_ptr, n, BLOCK: triton.language.constexpr):
    triton.language.store(x_ptr + triton.language.arange(0, BLOCK), 2.0)


def check(stub, log=print) -> list[str]:
    """Problems found (empty when none); run inside stub_driver(), which gives `stub`."""
    from fused_res.triton import launch as fast
    from fused_res.triton.batchnorm import BLOCK, bn_scale_kernel

    problems = []
    fast._CACHE.clear()
    # 1. The training unit's calls: the same launcher call both ways, first and cached.
    for kernel, grid, args, kwargs in _recorded_unit_calls():
        name = kernel.fn.__name__
        ref = kernel[grid](*args, **kwargs)
        jit_call = CALLS[-1]
        jit_runs = _count_jit_runs(kernel)
        for attempt in ("first", "cached"):
            got = fast.launch(kernel, grid, *args, **kwargs)
            if got is not ref:
                problems.append(f"{name} ({attempt}): a different compiled kernel")
            if not _same_launch(CALLS[-1], jit_call):
                problems.append(f"{name} ({attempt}): the launcher got a different call")
        # The bound launch an inference plan makes (launch.bind): the same call again.
        bound = fast.bind(kernel, grid, args, kwargs)
        if bound is None:
            problems.append(f"{name}: no bound launch after a cached one")
        else:
            bound(args)
            if not _same_launch(CALLS[-1], jit_call):
                problems.append(f"{name} (bound): the launcher got a different call")
        del kernel.run
        if jit_runs != [1]:
            problems.append(f"{name}: {jit_runs[0]} JIT runs in two launches (1 expected: "
                            "the second should reuse the compiled kernel)")
    # 2. Specialization: calls that differ in what Triton specializes on (tensor alignment
    # and dtype, integers == 1 / multiples of 16 / wide, None against a tensor) each reuse a
    # cached kernel only where the JIT picks the same compiled kernel.
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(4096, generator=gen)
    ints = (1, 5, 16, 48, 2 ** 31 + 16)
    tried = 0
    for c in ints:
        for offset in (0, 1, 4):
            for has_w in (False, True):
                for dtype in (torch.float32, torch.float16):
                    var = base[offset:offset + 64]
                    w = base[:64].to(dtype) if has_w else None
                    out = torch.empty(64)
                    args = (var, w if w is not None else var, out, c, 1e-5)
                    kw = dict(HAS_W=has_w, BLOCK=BLOCK)
                    grid = (1,)
                    ref = bn_scale_kernel[grid](*args, **kw)
                    jit_call = CALLS[-1]
                    for _ in range(2):
                        got = fast.launch(bn_scale_kernel, grid, *args, **kw)
                        tried += 1
                        if got is not ref:
                            problems.append(f"bn_scale_kernel C={c} offset={offset} "
                                            f"HAS_W={has_w} {dtype}: a different kernel")
                        elif not _same_launch(CALLS[-1], jit_call):
                            problems.append(f"bn_scale_kernel C={c} offset={offset}: "
                                            "a different launcher call")
    # 3. Two kernels with the same parameters and arguments: each launches its own (the
    # first with a launch_metadata function, which must see the grid as given).
    x = torch.empty(64)
    for _ in range(2):
        for twin in (_twin_a, _twin_b):
            ref = twin[(1,)](x, 3, BLOCK=64)
            jit_call = CALLS[-1]
            if fast.launch(twin, (1,), x, 3, BLOCK=64) is not ref:
                problems.append(f"{twin.fn.__name__}: another kernel's compiled kernel")
            elif not _same_launch(CALLS[-1], jit_call):
                problems.append(f"{twin.fn.__name__}: the launcher got a different call")
    # 4. Another device: the JIT again (a kernel compiled for it), then cached for it, with
    # that device's stream.
    kernel, grid, args, kwargs = _recorded_unit_calls()[1]
    stub.device = 1
    try:
        ref = kernel[grid](*args, **kwargs)
        jit_call = CALLS[-1]
        jit_runs = _count_jit_runs(kernel)
        got = [fast.launch(kernel, grid, *args, **kwargs) for _ in range(2)]
        del kernel.run
        if jit_runs != [1] or any(g is not ref for g in got) or not _same_launch(
                CALLS[-1], jit_call) or CALLS[-1][3] != 8:
            problems.append("device 1: not one JIT run, then its own kernel on its stream")
    finally:
        stub.device = 0
    # 5. A Triton whose JIT calls the launcher differently: the JIT on every call.
    fast._STATE["compatible"] = False
    try:
        kernel, grid, args, kwargs = _recorded_unit_calls()[2]
        jit_runs = _count_jit_runs(kernel)
        for _ in range(2):
            fast.launch(kernel, grid, *args, **kwargs)
        del kernel.run
        if jit_runs != [2]:
            problems.append(f"an incompatible JIT: {jit_runs[0]} JIT runs in 2 launches")
    finally:
        fast._STATE["compatible"] = None
    # 6. Inference plans (conv.ConvPlan, ops/plans.py): a planned launch with a new input and
    # residual (or pair input) hands the launcher what conv_launch (conv_pair_launch) hands
    # it for them, the output aside (each makes its own).
    problems += _check_plans()
    if not fast.enabled():
        problems.append(f"Triton {triton.__version__}'s JIT does not call the launcher as "
                        "fused_res.triton.launch expects: the direct path is off")
    log(f"checked {tried} specialization calls, the unit's launches, twin kernels, a second "
        f"device, an incompatible JIT and two inference plans: {len(problems)} problems")
    return problems


def _check_plans() -> list[str]:
    from fused_res.backends.constants import mark_constant
    from fused_res.triton import configs, conv, conv_pair

    problems = []
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)

    def fmap(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16).contiguous(memory_format=cl)

    w = mark_constant(fmap(64, 64, 3, 3))
    w2 = mark_constant(fmap(64, 32, 1, 1))
    b, b2 = mark_constant(torch.randn(64, generator=g)), mark_constant(torch.randn(64))
    cfg = configs.ConvConfig(64, 64, 32, 4, 3)
    unit = lambda x, r, plans=None: conv.conv_launch(  # noqa: E731
        x, w, None, (1, 1), (1, 1), None, None, None, "none", out_shift=b, act_mid="relu",
        residual=r, act_out="relu", memory_format=cl, config=cfg, tma=False,
        cache_weight=True, plan_out=plans)[0]
    pair = lambda x, x2, plans=None: conv_pair.conv_pair_launch(  # noqa: E731
        x, w, b, (1, 1), (1, 1), x2, w2, b2, (2, 2), "relu", memory_format=cl, config=cfg,
        cache_weights=True, plan_out=plans)
    cases = (("conv_unit", unit, lambda: fmap(2, 64, 8, 8)),
             ("conv_pair", pair, lambda: fmap(2, 32, 16, 16)))
    for name, run, second in cases:
        plans: list = []
        run(fmap(2, 64, 8, 8), second(), plans)
        if not plans or plans[0].bound is None:
            problems.append(f"{name}: no plan with a bound launch")
            continue
        x, x2 = fmap(2, 64, 8, 8), second()
        y_plan = plans[0](x, x2)
        planned = CALLS[-1]
        y_direct = run(x, x2)
        direct = CALLS[-1]
        swapped = tuple(y_direct if a is y_plan else a for a in planned)
        if y_plan is None or not _same_launch(swapped, direct):
            problems.append(f"{name}: the plan handed the launcher another call than "
                            "conv_launch / conv_pair_launch")
    return problems


def _per_call_us(fn, repeats: int) -> float:
    """Microseconds per call of fn(): the fastest of 5 rounds of `repeats` calls."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - t0) / repeats * 1e6)
        CALLS.clear()
    return min(times)


_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _time_autotuned_conv(call, repeats: int, log=print) -> None:
    """The unit's conv launched the way autotuning (the library's default) launched every call
    before conv.TUNED: through Triton's autotuner, its key already tuned (no timing, the same
    tile), against the fixed tile through launch() that conv.TUNED now makes of it."""
    from fused_res.triton import conv
    from fused_res.triton import launch as fast

    kernel, grid, args, kwargs = call
    flags = {k: v for k, v in kwargs.items() if k not in _META}
    want = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']}" \
           f"_w{kwargs['num_warps']}_s{kwargs['num_stages']}"
    tuner = conv._autotuned_kernel()
    # The tile of the recorded call wins the (faked) timing, so only it is ever compiled; the
    # fake timings must not reach Triton's on-disk autotuning cache, which a GPU would read.
    tuner._bench = lambda *a, config, **k: [0.0 if conv._config_name(config) == want else 1.0]
    disk = getattr(tuner, "cache_results", None)
    if disk is not None:
        tuner.cache_results = False
    try:
        tuned = functools.partial(tuner[lambda meta: grid], *args, **flags)
        direct = functools.partial(fast.launch, kernel, grid, *args, **kwargs)
        tuned(), direct()
        if conv._config_name(tuner.best_config) != want:
            log(f"(autotuned row skipped: the autotuner ran {tuner.best_config})")
            return
        t_tuned, t_fast = _per_call_us(tuned, repeats), _per_call_us(direct, repeats)
    except (AttributeError, TypeError) as e:  # another Triton's autotuner internals
        log(f"(autotuned row skipped: {type(e).__name__}: {e})")
        return
    finally:
        del tuner._bench
        tuner.cache.clear()
        if disk is not None:
            tuner.cache_results = disk
    log(f"{'conv, autotuned key':24s} {len(args) + len(flags):4d} {t_tuned:8.1f} "
        f"{t_fast:12.1f} {t_fast / t_tuned:6.2f}   (autotuner, then JIT | conv.TUNED's tile)")


def time_paths(repeats: int, log=print) -> None:
    from fused_res.triton import launch as fast

    calls = _recorded_unit_calls()
    log(f"{'kernel':24s} {'args':>4s} {'JIT us':>8s} {'launch() us':>12s} {'ratio':>6s} "
        f"{'bound us':>9s}")
    tot_jit = tot_fast = tot_bound = 0.0
    for kernel, grid, args, kwargs in calls:
        jit = functools.partial(kernel[grid], *args, **kwargs)
        direct = functools.partial(fast.launch, kernel, grid, *args, **kwargs)
        jit(), direct()
        # What an inference plan launches with (ops/plans.py): the key not computed again.
        bound = functools.partial(fast.bind(kernel, grid, args, kwargs), args)
        t_jit, t_fast = _per_call_us(jit, repeats), _per_call_us(direct, repeats)
        t_bound = _per_call_us(bound, repeats)
        tot_jit += t_jit
        tot_fast += t_fast
        tot_bound += t_bound
        log(f"{kernel.fn.__name__:24s} {len(args) + len(kwargs):4d} {t_jit:8.1f} "
            f"{t_fast:12.1f} {t_fast / t_jit:6.2f} {t_bound:9.1f}")
    log(f"{'one unit (' + str(len(calls)) + ' launches)':24s} {'':4s} {tot_jit:8.1f} "
        f"{tot_fast:12.1f} {tot_fast / tot_jit:6.2f} {tot_bound:9.1f}")
    _time_autotuned_conv(calls[0], repeats, log)
    log(f"host path to the launcher, fastest of 5 rounds of {repeats}; Triton "
        f"{triton.__version__}, torch {torch.__version__}, stub driver (nothing launched)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--check-only", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels would be interpreted, with no launcher "
                "to compare; unset it")
    from fused_res.triton import launch as fast
    fast.set_enabled(True)
    with stub_driver() as stub:
        problems = check(stub)
        for line in problems:
            print("PROBLEM:", line)
        if not a.check_only:
            time_paths(a.repeats)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
