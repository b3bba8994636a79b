"""What one benchmark run measures: the validated configuration shared by the CLI, the runner,
the pytest-benchmark suites and gpu_check.sh."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

DTYPES = ("fp32", "tf32", "bf16", "fp16")
MEMORY_FORMATS = ("channels_last", "contiguous")
MODES = ("eval", "train")
DEVICES = ("cpu", "cuda")
MAX_ROTATE = 64  # distinct inputs: more only costs memory, the L2 is covered by far fewer

# Compute dtype of each precision; tf32 computes in fp32 storage with TF32 tensor-core math.
TORCH_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
               "fp16": torch.float16}
ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


class ConfigError(ValueError):
    """Bad benchmark input; the message names the argument, its value and what is accepted."""


def bad(arg: str, value, accepted: str) -> ConfigError:
    return ConfigError(f"{arg} {value!r}: accepted: {accepted}")


def split_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (the CLI's comma-separated lists)."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_batches(text: str | int | list) -> tuple[int, ...]:
    """'64,256' -> (64, 256); every batch must be a positive integer."""
    items = text if isinstance(text, (list, tuple)) else split_list(str(text))
    out = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise bad("--batch", text, "positive integers, comma-separated (e.g. 64,256)") \
                from None
        if n < 1:
            raise bad("--batch", text, "positive integers, comma-separated (e.g. 64,256)")
        out.append(n)
    if not out:
        raise bad("--batch", text, "positive integers, comma-separated (e.g. 64,256)")
    return tuple(out)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchConfig:
    """One benchmark run. Every workload is measured at every batch with every contender.

    models: model names, block/unit presets or specs (see fused_res.bench.workloads).
    contenders: names or groups (see fused_res.bench.contenders); None: the device's default.
    dtype: fp32 | tf32 | bf16 | fp16 (bf16/fp16 run under autocast; tf32 is fp32 storage with
    TF32 math, CUDA only). warmup/repeats: untimed and timed iterations per contender.
    rotate: distinct input buffers cycled through (0: enough to exceed the L2 cache twice).
    """

    models: tuple[str, ...] = ("resnet50",)
    batches: tuple[int, ...] = (2,)
    dtype: str = "fp32"
    memory_format: str = "channels_last"
    mode: str = "eval"
    device: str = "cpu"
    contenders: tuple[str, ...] | None = None
    cuda_graphs: bool = False
    warmup: int = 3
    repeats: int = 20
    rotate: int = 0
    flush_l2: bool = True
    seed: int = 0
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.batches = parse_batches(self.batches)
        if not self.models:
            raise bad("--model", "", "at least one model, preset or spec")
        for arg, value, choices in (("--dtype", self.dtype, DTYPES),
                                    ("--memory-format", self.memory_format, MEMORY_FORMATS),
                                    ("--mode", self.mode, MODES),
                                    ("--device", self.device, DEVICES)):
            if value not in choices:
                raise bad(arg, value, ", ".join(choices))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise bad("--device", self.device, "cpu (no CUDA device is present here)")
        if self.device == "cpu" and self.dtype == "tf32":
            raise bad("--dtype", self.dtype, "fp32, bf16 or fp16 on the CPU (TF32 is a CUDA "
                      "tensor-core mode)")
        for arg, value, low in (("--warmup", self.warmup, 0), ("--repeats", self.repeats, 1),
                                ("--rotate", self.rotate, 0)):
            if not isinstance(value, int) or value < low:
                raise bad(arg, value, f"an integer >= {low}")
        if self.rotate > MAX_ROTATE:
            # Each rotated input is held in both memory formats for the whole run.
            raise bad("--rotate", self.rotate, f"an integer from 0 to {MAX_ROTATE} (0: enough "
                      "inputs to exceed twice the L2 cache)")
        if self.contenders is not None:
            self.contenders = tuple(self.contenders)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPE[self.dtype]

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["models"], d["batches"] = list(self.models), list(self.batches)
        d["contenders"] = None if self.contenders is None else list(self.contenders)
        return d
