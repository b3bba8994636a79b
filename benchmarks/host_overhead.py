"""The host-side cost of the fused Triton path, on any machine: a fused ResNet eval forward or
train step with every Triton kernel launch (and, in train, aten's conv backward) replaced by a
no-op, so what is timed is our Python, the custom-op and autograd dispatch and the argument
preparation, not the kernels or Triton's launcher.

    python benchmarks/host_overhead.py [--model resnet50] [--mode eval|train] [--repeats 20]
                                       [--rounds 5] [--size 32] [--profile [--sort cumtime|both]]
                                       [--launches]
    python benchmarks/host_overhead.py --backend cuda|reference --model resnet20 --size 8
    python benchmarks/host_overhead.py --device cuda [--backend triton|cuda|cudnn] ...

With --backend cuda or reference on the CPU, that backend's CPU kernels run for real and eager
runs beside it: on a tiny model and input (resnet20, --size 8) the compute is small next to
the host path, so the ratio is the host path's, ours against eager's (ResNet-50's weights would
make the weight-sized work of autocast casts and the optimizer dominate instead).

--device cuda runs the real kernels on a GPU instead, on the same tiny input (2x3x32x32), where
the device finishes each kernel long before the host issues the next: the wall time per step
is then the host's, launchers included, beside eager's on the same model. With the Triton
backend it is also timed with fused_res.triton.launch's direct path off (every launch through
the JIT) and with Triton's launcher call a no-op (launcher_stubbed: the launcher's own share).
--profile shows where it goes (our Python, Triton's launcher, the dispatcher).

Without CUDA graphs this cost is paid per conv unit on every call; on the first H100 run the
fused-triton blocks took 1.1-1.7 ms per call against 0.2-0.6 ms as graph replays. Not a speed
claim about the GPU: a way to see the host path shrink or grow between commits. (Stubbed
kernels leave outputs uninitialised; nothing here looks at the values.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import os
import pstats
import sys
import time


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing but count."""

    launches = 0
    stubbed_aten = 0  # aten ops replaced by stubs (the conv backward)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1
        return launch


# aten ops that launch no kernel on a GPU: views, allocations, metadata.
_NO_KERNEL = ("view", "permute", "_unsafe_view", "as_strided", "expand", "t", "detach", "alias",
              "slice", "select", "unsqueeze", "squeeze", "transpose", "empty", "empty_strided",
              "empty_like", "new_empty", "new_empty_strided", "reshape", "is_same_size",
              "lift_fresh", "_record_function_enter_new", "_record_function_exit")


# The CUDA kernels each fused_res_C op launches on a non-empty input (csrc/cuda/ops_cuda.cu;
# a reduction is two: its passes and their finalize). What the op runs through aten inside
# (a dtype conversion of a vector) is not seen; bn_finalize without a momentum adds one.
_EXT_KERNELS = {"channel_stats": 2, "channel_stats_bn": 2, "stats_backward": 1, "epilogue": 1,
                "epilogue_backward": 2, "bn_epilogue_backward": 2, "bn_finalize": 1,
                "bn_scale": 1, "bn_scale_backward": 1}


def _ext_kernels(name: str, args) -> int:
    if name == "bn_finalize" and args[7] is None and args[6] is not None and args[4] is not None:
        return 2  # (num_batches_tracked.add_ first: the kernel reads the count)
    return _EXT_KERNELS[name]


def count_launches(step) -> tuple[int, int, int, dict]:
    """(aten ops that would launch a device kernel, Triton launches, the CUDA kernels the
    extension's ops would launch, count per aten op) of one call of step().
    The fused ops take their eager path (twins, direct launches) as they do outside the
    counting dispatch mode, so that the mode sees every aten op they run inside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fused_res._eager as eager
    import fused_res.ops.library as library
    import fused_res.ops.train_unit as train_unit
    import fused_res.triton.batchnorm as tbn
    import fused_res.triton.elementwise as tew

    def plain_ignoring_modes(args):
        return eager.ENABLED and all(type(a) in eager._PLAIN for a in args
                                     if isinstance(a, torch.Tensor))

    import torch

    per_op: dict[str, int] = {}
    ext = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns, name = func.namespace, func._schema.name.split("::")[-1]
            if ns == "aten" and name not in _NO_KERNEL:
                per_op[name] = per_op.get(name, 0) + 1
            elif ns == "fused_res_C":
                ext[0] += _ext_kernels(name, args)
            return func(*args, **(kwargs or {}))

    _NoLaunch.launches = _NoLaunch.stubbed_aten = 0
    patched = (library, train_unit, tew, tbn)
    for m in patched:
        m.plain_eager = plain_ignoring_modes
    try:
        with Count():
            step()
    finally:
        for m in patched:
            m.plain_eager = eager.plain_eager
    if _NoLaunch.stubbed_aten:
        per_op["convolution_backward"] = per_op.get("convolution_backward", 0) + \
            _NoLaunch.stubbed_aten
    return sum(per_op.values()), _NoLaunch.launches, ext[0], per_op


def _stub_kernels(conv_backward: bool) -> None:
    """Every Triton kernel launch becomes a no-op, and with conv_backward aten's conv backward
    too (what the Triton backend's backward leaves to aten). Backends whose CPU kernels run
    keep the real conv backward: it is shared through ReferenceBackend, and a stub there would
    stub theirs as well (their gradients uninitialised, their step cheaper than eager's)."""
    import importlib
    import pkgutil

    import torch

    import fused_res.backends.reference as ref
    import fused_res.backends.triton_backend as tb
    import fused_res.triton as kernels

    # Every kernel the launchers call (module-level *_kernel names of every module of the
    # package), so that a new kernel or kernel module is never silently run in the
    # interpreter here.
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            setattr(module, name, _NoLaunch())

    def stub_conv_backward(gz, p, weight, has_bias, stride, padding, dilation, groups, needs_p,
                           needs_w):
        _NoLaunch.stubbed_aten += 1  # one aten convolution_backward, as eager's count has
        return (torch.empty_like(p) if needs_p else None,
                torch.empty_like(weight) if needs_w else None,
                gz.new_empty((weight.shape[0],)) if has_bias else None)
    if conv_backward:
        ref._conv_backward = tb._conv_backward = stub_conv_backward
    # The backend declines bf16 in the interpreter (its arithmetic is wrong there); nothing is
    # interpreted here, and the model runs under bf16 autocast as on a GPU.
    tb.INTERPRETER_BF16 = True


@contextlib.contextmanager
def launcher_stubbed():
    """Within the context, every launch on fused_res.triton.launch's direct path (a kernel
    already launched once with the same key) calls a no-op instead of the compiled kernel's
    launcher, and counts the calls; the cache is restored on exit. The entries are swapped
    in place, so that the inference plans' bound launches (launch.Bound, which share them)
    are stubbed too, and restored with them. What the launcher costs on a host is the step's
    time without this less its time with it: Triton's Python CudaLauncher.__call__, then in
    C the argument parsing, a data_ptr() call and a cuPointerGetAttribute per pointer
    argument, and cuLaunchKernelEx. Nothing runs on the device for those kernels (their
    outputs are left uninitialised)."""
    from fused_res.triton import launch as fast

    calls = [0]

    def no_launch(*args):
        calls[0] += 1

    saved = {key: (entry, entry[0]) for key, entry in fast._CACHE.items()}
    try:
        for entry, _ in saved.values():
            entry[0] = no_launch
        yield calls
    finally:
        # (Entries made inside hold real launchers; the swapped ones get theirs back.)
        for entry, run in saved.values():
            entry[0] = run


def narrowed(model, k: int):
    """model with every conv, BatchNorm and the classifier's input k times narrower (the
    3-channel image input kept): the same modules, units and spatial shapes, so the same host
    path, with the weight-sized work on the CPU (weight copies, autocast casts, the optimizer)
    k^2 times smaller, where on a GPU it is a few kernels and here it would swamp the host
    path being timed."""
    import torch.nn as nn

    def c(n):
        return n if n == 3 else max(1, n // k)

    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is nn.Conv2d:
                new = nn.Conv2d(c(m.in_channels), c(m.out_channels), m.kernel_size, m.stride,
                                m.padding, bias=m.bias is not None)
            elif type(m) is nn.BatchNorm2d:
                new = nn.BatchNorm2d(c(m.num_features))
            elif type(m) is nn.Linear:
                new = nn.Linear(c(m.in_features), m.out_features)
            else:
                continue
            setattr(parent, name, new)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--mode", choices=("eval", "train"), default="eval")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; the fastest counts")
    p.add_argument("--profile", action="store_true", help="also print the top functions")
    p.add_argument("--sort", choices=("tottime", "cumtime", "both"), default="tottime",
                   help="order of the --profile listing; both: the top functions by their own "
                   "time, then fused_res's own functions by cumulative time")
    p.add_argument("--launches", action="store_true",
                   help="also count the device kernels one step would launch, fused and eager")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: kernels stubbed out; cuda: real kernels on a tiny input")
    p.add_argument("--backend", default="triton", help="the fused model's backend")
    p.add_argument("--size", type=int, default=32, help="input height and width (batch 2)")
    p.add_argument("--narrow", type=int, default=1, metavar="K",
                   help="every layer K times narrower (the same host path, K^2 less "
                   "weight-sized work: a train step's host path on the CPU, e.g. 16)")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and a.launches:
        p.error("--launches counts stubbed launches: --device cpu only")
    if not gpu:
        # The interpreter flag makes the backend run on CPU tensors; the stubs mean no kernel
        # is ever interpreted.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("FUSED_RES_TRITON_AUTOTUNE", "0")
    import torch

    import fused_res
    from fused_res import models

    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if not gpu:
        _stub_kernels(conv_backward=a.backend == "triton")
        torch.set_num_threads(1)
    dev = a.device
    if a.narrow < 1:
        p.error(f"--narrow {a.narrow}: accepted: an integer >= 1")
    if a.narrow > 1 and not isinstance(getattr(models, a.model)(), models.imagenet.ResNet):
        # (a CIFAR ResNet's option-A shortcut pads a fixed count of channels, which a
        # narrowed model's blocks no longer match)
        p.error(f"--narrow {a.narrow} --model {a.model}: accepted: --narrow only with an "
                "ImageNet ResNet of fused_res.models (resnet18 .. resnet152, ...)")
    model = narrowed(getattr(models, a.model)(), a.narrow) if a.narrow > 1 else \
        getattr(models, a.model)()
    model = model.to(dev, memory_format=torch.channels_last)
    fused = fused_res.convert(copy.deepcopy(model), backend=a.backend)
    fused.train(a.mode == "train")
    units = sum(1 for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
    # foreach=True: the multi-tensor update torch picks by default for CUDA parameters.
    opt = torch.optim.SGD(fused.parameters(), lr=1e-4, momentum=0.9, foreach=True)

    def make_step(net, opt):
        def step():
            if a.mode == "eval":
                with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                    return net(x)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = net(x)
            out.float().square().mean().backward()
            opt.step()
            return out
        return step

    def per_step_ms(step) -> float:
        """The fastest of --rounds means of --repeats steps: host timing on a shared machine
        is noisy upwards only (other processes, frequency changes), never downwards."""
        for _ in range(3):
            step()
        best = float("inf")
        for _ in range(a.rounds):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                step()
            if gpu:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / a.repeats * 1e3)
        return best

    step = make_step(fused, opt)
    ms = per_step_ms(step)
    what = "eval forward" if a.mode == "eval" else "train step (forward, backward, SGD)"
    how = (f"backend {a.backend}, real kernels on {torch.cuda.get_device_name()}, input "
           f"{tuple(x.shape)}" if gpu else "kernels stubbed out" if a.backend == "triton"
           else f"backend {a.backend}: its CPU kernels and aten's conv run, only Triton is "
                "stubbed")
    print(f"{a.model}: {ms:.2f} ms of host work per {what}, {units} convs, "
          f"{1e3 * ms / units:.0f} us per conv unit ({how})")
    if a.mode == "eval":
        # The same forward without inference plans (fused_res/ops/plans.py), side by side.
        from fused_res.nn import eval_fold
        from fused_res.ops import plans

        def unplanned():
            eval_fold.PLANS.clear()
            eval_fold.PAIR_PLANS.clear()

        was = plans.ENABLED
        plans.ENABLED = not was
        unplanned()
        other = per_step_ms(step)
        plans.ENABLED = was
        unplanned()
        on, off = (ms, other) if was else (other, ms)
        print(f"{a.model}: {off:.2f} ms with inference plans off (FUSED_RES_PLANS=0), "
              f"{on:.2f} ms on ({on / off:.2f}x)")
    if a.mode == "train":
        # The same step with each training unit as the three ops (fused_res/ops/
        # train_unit.py off), side by side.
        from fused_res.ops import train_unit

        was = train_unit.ENABLED
        train_unit.ENABLED = not was
        other = per_step_ms(step)
        train_unit.ENABLED = was
        on, off = (ms, other) if was else (other, ms)
        print(f"{a.model}: {off:.2f} ms with each training unit as three ops "
              f"(FUSED_RES_TRAIN_UNIT=0), {on:.2f} ms as one node ({on / off:.2f}x)")
    if gpu and a.backend == "triton":
        # The same step with every Triton launch through the JIT (fused_res.triton.launch
        # off), side by side in this run: what the direct launch path saves.
        import triton

        from fused_res.triton import launch as fast
        was = fast.enabled()
        fast.set_enabled(not was)
        other = per_step_ms(step)
        fast.set_enabled(was)
        on, off = (ms, other) if was else (other, ms)
        print(f"{a.model}: {off:.2f} ms with every Triton launch through the JIT, {on:.2f} ms "
              f"with fused_res.triton.launch's direct path ({on / off:.2f}x)"
              + ("" if fast._compatible() else f"; the direct path stays off: Triton "
                 f"{triton.__version__}'s JIT calls its launcher differently"))
        if fast.enabled():
            # Run 7 (H100 host): 28.8 ms per ResNet-18 train step against eager's 7.9 (3.6x),
            # while on a 2-CPU machine with the launches stubbed a resnet20 step took 8.4 ms
            # against eager's 5.8 (1.45x): much of the gap is in what those stubs remove.
            # This separates the launcher's part of it.
            with launcher_stubbed() as calls:
                step()
                per_step = calls[0]
                bare = per_step_ms(step)
            print(f"{a.model}: {bare:.2f} ms with Triton's launcher call a no-op on the "
                  f"direct path ({per_step} launches per step): the launcher costs "
                  f"{on - bare:.2f} ms per step, {1e3 * (on - bare) / max(per_step, 1):.1f} "
                  "us per launch (nothing runs on the device for those kernels)")
    if gpu or a.backend != "triton":
        model.train(a.mode == "train")
        eager_ms = per_step_ms(make_step(model, torch.optim.SGD(
            model.parameters(), lr=1e-4, momentum=0.9, foreach=True)))
        print(f"{a.model}: eager channels_last + autocast {eager_ms:.2f} ms per {what} on the "
              f"same input ({ms / eager_ms:.2f}x)")
    if a.launches:
        model.train(a.mode == "train")
        eager_step = make_step(model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                                                      foreach=True))
        for _ in range(2):
            eager_step()
        aten_n, triton_n, ext_n, fused_ops = count_launches(step)
        eager_n, _, _, eager_ops = count_launches(eager_step)
        print(f"device kernels per {what}: fused-{a.backend} {aten_n + triton_n + ext_n} "
              f"({aten_n} aten, {triton_n} Triton, {ext_n} extension), eager {eager_n} (aten; "
              "cuDNN's own count per conv aside)")
        for name, ops in ((f"fused-{a.backend}", fused_ops), ("eager", eager_ops)):
            top = sorted(ops.items(), key=lambda kv: -kv[1])
            print(f"  {name} aten: " + ", ".join(f"{k} {v}" for k, v in top))
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.repeats):
            step()
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        if a.sort == "both":
            # Where the time of our own layers goes, callees included (the per-op wrappers,
            # the launchers), beside the flat listing of the costliest single functions.
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumtime").print_stats("fused_res", 30)
        else:
            stats.sort_stats(a.sort).print_stats(30)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
