"""The contenders: what each one runs, how it is built from the shared eager model, and why
it cannot run where it cannot.

  eager-nchw            eager PyTorch, NCHW (the classic baseline; not the one we compare to)
  eager-cl              eager PyTorch, channels_last (+ autocast for bf16/fp16): THE baseline
  compile               torch.compile, default mode
  compile-max-autotune  torch.compile(mode="max-autotune")
  compile-freeze        torch.compile with inductor freezing (eval only)
  cudnn-fused           BN folded, aten's cuDNN conv+bias(+add)+ReLU ops (CUDA, eval only)
  fused-<backend>       fused_res.convert(model, backend=<backend>) for each backend name
                        (a conv unit: fused_res.nn.ConvBNAct2d on the same modules)
  fused-<backend>-unfused   where a backend offers `unfused()` (a context manager under which
                        it runs each op of a unit as its own kernel): what fusion alone buys
  fused-<backend>-bnpass    train only, for a backend whose conv kernel has a prologue
  fused-<backend>-prologue  (Backend.prologue_in_conv): the training BN placement its
                        default does not take. -bnpass: each BN + ReLU in its own pass
                        (Backend.prologue_apart); -prologue: in the next conv's prologue
                        (Backend.prologue_fused). Triton's default is the pass: -prologue.
  fused-<backend>-tma   where a backend offers `tma_loads()` (Triton): operands by TMA
                        where they can be (sm_90 and newer), not yet the default

Groups for --contenders: default, all, eager, compiled (all three compile contenders),
fused, cudnn. A name is never a group: "compile" is the default-mode contender alone.
eager-cl is always measured, being the baseline. With --cuda-graphs every contender is also
timed as a captured CUDA graph (name + "+graph").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends import NAMES as BACKEND_NAMES
from ..backends import available_backends, get_backend_object
from .config import BenchConfig, ConfigError
from .workloads import ConvUnit, Workload

BASELINE = "eager-cl"
EAGER = ("eager-cl", "eager-nchw")  # the baseline first: the gate calibrates on it
COMPILE = ("compile", "compile-max-autotune", "compile-freeze")
CUDNN = ("cudnn-fused",)


def fused_names() -> tuple[str, ...]:
    names = [f"fused-{b}" for b in BACKEND_NAMES]
    for b in BACKEND_NAMES:
        if b in ("auto", "reference"):
            continue
        obj = get_backend_object(b)
        at = names.index(f"fused-{b}") + 1
        flipped = []
        if obj.prologue_in_conv:  # the training BN placement its default does not take
            flipped = [f"fused-{b}-bnpass" if obj.fuse_train_prologue else f"fused-{b}-prologue"]
        names[at:at] = (([f"fused-{b}-unfused"] if hasattr(obj, "unfused") else []) + flipped
                        + ([f"fused-{b}-tma"] if hasattr(obj, "tma_loads") else []))
    return tuple(names)


_VARIANTS = ("-unfused", "-bnpass", "-prologue", "-tma")
_PLACEMENTS = ("-bnpass", "-prologue")  # where a training BN + ReLU goes: train only


def _base(name: str) -> str:
    for suffix in _VARIANTS:
        name = name.removesuffix(suffix)
    return name


def all_names() -> tuple[str, ...]:
    return EAGER + COMPILE + CUDNN + fused_names()


def groups(device: str, quick: bool = False) -> dict[str, tuple[str, ...]]:
    default = all_names()
    if device == "cpu":
        default = tuple(n for n in default if n not in COMPILE)
    elif quick:
        default = tuple(n for n in default if n != "compile-max-autotune")
    return {"default": default, "all": all_names(), "eager": EAGER, "compiled": COMPILE,
            "fused": fused_names(), "cudnn": CUDNN}


def select(config: BenchConfig) -> list[tuple[str, str | None]]:
    """[(name, reason it is left out or None)], in table order. Contenders outside the
    selection are listed with the reason, so a table never hides a baseline silently."""
    table = groups(config.device, config.quick)
    asked = config.contenders or ("default",)
    chosen: list[str] = []
    for item in asked:
        names = table.get(item, (item,) if item in all_names() else None)
        if names is None:
            raise ConfigError(f"--contenders {item!r}: accepted: a comma-separated list of "
                              f"{', '.join(all_names())} or groups {', '.join(table)}")
        chosen += [n for n in names if n not in chosen]
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    out = []
    for name in all_names():
        if name in chosen:
            out.append((name, None))
        elif config.contenders is None and name in COMPILE:
            why = ("not in the CPU default (slow to compile); --contenders default,compiled"
                   if config.device == "cpu" else "not in the quick set; see `bench --help`")
            out.append((name, why))
    return out


@dataclass
class Built:
    """A contender ready to run: forward(x) under the run's precision, the module whose
    parameters it trains, and what it is (for the table)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module
    memory_format: torch.memory_format
    note: str = ""
    wraps: list = field(default_factory=list)  # context managers to enter around every call


def _mf(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def memory_format_of(name: str, config: BenchConfig) -> torch.memory_format:
    if name == "eager-nchw":
        return torch.contiguous_format
    if name == "eager-cl":
        return torch.channels_last
    return _mf(config.memory_format)


def unavailable(name: str, workload: Workload, config: BenchConfig) -> str | None:
    """Why `name` cannot run this workload here, or None."""
    base = _base(name)
    if name.endswith(_PLACEMENTS):
        if config.mode != "train":
            return f"the same run as {base} outside training (no batch-statistics BN)"
        if workload.kind == "unit":
            return f"the same run as {base}: a single conv unit has no BN before a conv"
    if name.endswith("-tma") and config.device == "cuda" and torch.cuda.is_available() and (
            torch.cuda.get_device_capability()[0] < 9):
        return f"TMA needs an sm_90 or newer GPU: here it would run {base}'s kernels"
    if name == "compile-freeze" and config.mode == "train":
        return "inductor freezing is for inference (eval mode) only"
    if name in COMPILE and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if name == "cudnn-fused":
        if config.device != "cuda":
            return "needs CUDA (aten's cuDNN fused conv ops have no CPU kernel)"
        if config.mode == "train":
            return "cuDNN's fused conv+bias+add+ReLU is inference-only"
    if base.startswith("fused-"):
        status = available_backends()[base.removeprefix("fused-")]
        if not status.available:
            return f"backend unavailable: {status.reason}"
    return None


def build(name: str, module: nn.Module, workload: Workload, config: BenchConfig) -> Built:
    """Build contender `name` from `module` (a private fp32 copy on the device, in the run's
    mode). May raise; the runner reports the exception as the reason it was skipped."""
    mf = memory_format_of(name, config)
    module = module.to(memory_format=mf)
    if name in EAGER:
        return Built(module, module, mf)
    if name in COMPILE:
        kwargs = {"mode": "max-autotune"} if name == "compile-max-autotune" else {}
        compiled = torch.compile(module, **kwargs)
        wraps = []
        if name == "compile-freeze":
            import torch._inductor.config as inductor_config
            wraps.append(lambda: inductor_config.patch(freezing=True))
        return Built(compiled, module, mf, wraps=wraps)
    if name == "cudnn-fused":
        from .cudnn_fused import cudnn_fuse, cudnn_ops
        fused, n, total = cudnn_fuse(module, cudnn_ops(), config.torch_dtype, mf)
        if workload.kind != "unit" and n == 0:
            raise RuntimeError("no residual block has the conv-BN-ReLU / conv-BN-add-ReLU form")
        note = "conv unit" if workload.kind == "unit" else f"{n}/{total} blocks fused"
        return Built(fused, fused, mf, note=note)
    if name.startswith("fused-"):
        import fused_res
        backend = _base(name).removeprefix("fused-")
        if isinstance(module, ConvUnit):
            converted = fused_res.nn.ConvBNAct2d.from_modules(module.conv, module.bn, "relu",
                                                             backend=backend)
            note = "ConvBNAct2d"
        else:
            converted = fused_res.convert(module, backend=backend, inplace=True)
            entries = fused_res.report(converted)
            note = f"{sum(e.fused for e in entries)}/{len(entries)} blocks fused"
        wraps = []
        if name.endswith("-unfused"):
            wraps.append(get_backend_object(backend).unfused)
        if name.endswith("-bnpass"):
            wraps.append(get_backend_object(backend).prologue_apart)
        if name.endswith("-prologue"):
            wraps.append(get_backend_object(backend).prologue_fused)
        if name.endswith("-tma"):
            wraps.append(get_backend_object(backend).tma_loads)
        return Built(converted, converted, mf, note=note, wraps=wraps)
    raise ConfigError(f"contender {name!r}; accepted: {', '.join(all_names())}")


def call_with(built: Built) -> Callable[[torch.Tensor], torch.Tensor]:
    """built.forward wrapped in its context managers."""
    if not built.wraps:
        return built.forward

    def run(x: torch.Tensor) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for w in built.wraps:
                stack.enter_context(w())
            return built.forward(x)
    return run
