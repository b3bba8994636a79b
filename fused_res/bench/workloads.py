"""What is measured: a whole reference model, one residual block, or one conv unit, at a shape.

Accepted names (the CLI's --model, comma-separated):
  * a model of fused_res.models.MODELS (resnet18..152, resnet20..1202 CIFAR, ...);
  * a preset: rn50-l1..rn50-l4 (ResNet-50 stage bottlenecks, identity shortcut),
    rn50-l1d..rn50-l4d (first block of a stage: a projection, stride 2 from layer2 on),
    rn18-l1..rn18-l4
    (BasicBlocks), cifar-l1..cifar-l3 (CIFAR BasicBlocks), rn50-l1-1x1 .. rn50-l4-3x3 (conv
    units), or a group: rn50-blocks, rn18-blocks, cifar-blocks, rn50-units;
  * a spec: block:KIND:cin=C:planes=P:hw=H[:stride=S] with KIND basic | bottleneck | cifar, or
    unit:cin=C:cout=C:hw=H[:k=3][:stride=1] (conv -> BatchNorm -> ReLU). Fields are separated
    by ':' because ',' separates the workloads of a list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import models
from .config import ConfigError

_BLOCK_KINDS = ("basic", "bottleneck", "cifar")


@dataclass(frozen=True)
class Workload:
    """A named module factory and the shape of one input sample (C, H, W)."""

    name: str
    kind: str                     # "model" | "block" | "unit"
    spec: str                     # the spec it was built from (equal to name for models)
    sample_shape: tuple[int, int, int]
    build: Callable[[], nn.Module]

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.sample_shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "spec": self.spec,
                "sample_shape": list(self.sample_shape)}


class ConvUnit(nn.Module):
    """conv -> BatchNorm -> ReLU, the eager form of one conv unit (DESIGN.md §2).
    Input (N, cin, H, W) -> (N, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


_RN50 = {1: (256, 64, 56), 2: (512, 128, 28), 3: (1024, 256, 14), 4: (2048, 512, 7)}
_RN18 = {1: (64, 56), 2: (128, 28), 3: (256, 14), 4: (512, 7)}
_CIFAR = {1: (16, 32), 2: (32, 16), 3: (64, 8)}

PRESETS: dict[str, str] = {}
for _i, (_cin, _p, _hw) in _RN50.items():
    PRESETS[f"rn50-l{_i}"] = f"block:bottleneck:cin={_cin}:planes={_p}:hw={_hw}"
    PRESETS[f"rn50-l{_i}-1x1"] = f"unit:cin={_cin}:cout={_p}:hw={_hw}:k=1"
    PRESETS[f"rn50-l{_i}-3x3"] = f"unit:cin={_p}:cout={_p}:hw={_hw}:k=3"
    # A stage's first block: stride 2 and a projection; layer1's keeps stride 1 (64 -> 256).
    PRESETS[f"rn50-l{_i}d"] = (f"block:bottleneck:cin={_cin // 2}:planes={_p}:"
                               f"hw={_hw * 2}:stride=2" if _i > 1 else
                               f"block:bottleneck:cin={_p}:planes={_p}:hw={_hw}")
for _i, (_c, _hw) in _RN18.items():
    PRESETS[f"rn18-l{_i}"] = f"block:basic:cin={_c}:planes={_c}:hw={_hw}"
for _i, (_c, _hw) in _CIFAR.items():
    PRESETS[f"cifar-l{_i}"] = f"block:cifar:cin={_c}:planes={_c}:hw={_hw}"

GROUPS: dict[str, tuple[str, ...]] = {
    "rn50-blocks": ("rn50-l1d", "rn50-l1", "rn50-l2d", "rn50-l2", "rn50-l3d", "rn50-l3",
                    "rn50-l4d", "rn50-l4"),
    "rn18-blocks": tuple(f"rn18-l{i}" for i in _RN18),
    "cifar-blocks": tuple(f"cifar-l{i}" for i in _CIFAR),
    "rn50-units": tuple(f"rn50-l{i}-{k}" for i in _RN50 for k in ("1x1", "3x3")),
}

_ACCEPTED = ("a model (" + ", ".join(sorted(models.MODELS)) + "), a preset ("
             + ", ".join(PRESETS) + "), a group (" + ", ".join(GROUPS) + "), or a spec "
             "block:basic|bottleneck|cifar:cin=C:planes=P:hw=H[:stride=S] | "
             "unit:cin=C:cout=C:hw=H[:k=K][:stride=S]")


def expand(names) -> list[str]:
    """Expand groups; keep order, drop repeats."""
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            if m not in out:
                out.append(m)
    return out


def _parse_fields(name: str, body: str, required: tuple[str, ...],
                  optional: dict[str, int]) -> dict[str, int]:
    vals = dict(optional)
    for part in filter(None, body.split(":")):
        key, eq, value = part.partition("=")
        if not eq or key not in (*required, *optional):
            raise ConfigError(f"--model {name!r}: unknown field {part!r}; accepted fields: "
                              f"{', '.join((*required, *optional))}")
        try:
            vals[key] = int(value)
        except ValueError:
            raise ConfigError(f"--model {name!r}: {key}={value!r}; accepted: a positive "
                              "integer") from None
        if vals[key] < 1:
            raise ConfigError(f"--model {name!r}: {key}={value!r}; accepted: a positive "
                              "integer")
    missing = [k for k in required if k not in vals]
    if missing:
        raise ConfigError(f"--model {name!r}: missing {', '.join(missing)}; accepted: "
                          f"{', '.join(required)} required, {', '.join(optional)} optional")
    return vals


def _block_factory(kind: str, cin: int, planes: int, stride: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if kind == "cifar":
            return models.CifarBlock(cin, planes, stride, shortcut="B")
        cls = models.Bottleneck if kind == "bottleneck" else models.BasicBlock
        cout = planes * cls.expansion
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                 nn.BatchNorm2d(cout))
        return cls(cin, planes, stride, downsample=down)
    return build


def get_workload(name: str) -> Workload:
    """The Workload for a model name, preset or spec; ConfigError naming --model otherwise."""
    if name in models.MODELS:
        size = 32 if name in models.CIFAR_MODELS else 224
        return Workload(name, "model", name, (3, size, size),
                        lambda: models.get_model(name))
    spec = PRESETS.get(name, name)
    head, _, body = spec.partition(":")
    if head == "block":
        kind, _, rest = body.partition(":")
        if kind not in _BLOCK_KINDS:
            raise ConfigError(f"--model {name!r}: block kind {kind!r}; accepted: "
                              f"{', '.join(_BLOCK_KINDS)}")
        f = _parse_fields(name, rest, ("cin", "planes", "hw"), {"stride": 1})
        return Workload(name, "block", spec, (f["cin"], f["hw"], f["hw"]),
                        _block_factory(kind, f["cin"], f["planes"], f["stride"]))
    if head == "unit":
        f = _parse_fields(name, body, ("cin", "cout", "hw"), {"k": 3, "stride": 1})
        return Workload(name, "unit", spec, (f["cin"], f["hw"], f["hw"]),
                        lambda: ConvUnit(f["cin"], f["cout"], f["k"], f["stride"]))
    raise ConfigError(f"--model {name!r}; accepted: {_ACCEPTED}")


def calibrate_bn(module: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of one batch, so that eval mode sees
    normalised activations (freshly built models have mean 0 / var 1, which lets activations
    grow layer after layer and flatters nothing but is not what a trained model looks like)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    was_training = module.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
        with torch.no_grad():
            module.train()(x)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        module.train(was_training)
