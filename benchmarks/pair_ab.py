"""What running a block's last conv and its projection shortcut as one kernel buys (inference).

    python benchmarks/pair_ab.py [--batch 64] [--dtype bf16] [--json F]

ResNet-50's four downsampling blocks (layer1..4, block 0), converted to the Triton backend,
eval, channels_last, under no_grad: each timed as CUDA-graph replays with the last conv and
the 1x1 projection as one kernel (ops.conv_shortcut_pair, the default) and as two units (the
shortcut's output written, then read back as the residual), side by side in one process.
Both outputs are checked against each other first. The pair saves a write and a read of the
block's output-sized shortcut tensor and one launch; whether the longer K loop of the one
kernel costs less than that is the GPU's answer, and this script asks for it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_bandwidth import DTYPES, graph_ms, n_sets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    os.environ.setdefault("FUSED_RES_TRITON_AUTOTUNE", "0")
    import fused_res
    from fused_res import models
    from fused_res.backends.triton_backend import TritonBackend
    from fused_res.testing import TOLERANCES, rel_err

    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    net = models.resnet50()
    with torch.no_grad():  # BatchNorms that are not the identity, so the folds mean something
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, {a.dtype}, batch {a.batch}: ms per block "
          "(CUDA-graph replays)")
    print(f"{'block':8} {'one kernel':>11} {'two units':>10} {'ratio':>6}  rel diff")
    for layer in range(1, 5):
        block = getattr(net, f"layer{layer}")[0]
        fused = fused_res.convert(copy.deepcopy(block), backend="triton").eval().cuda()
        fused = fused.to(memory_format=torch.channels_last)
        cin = block.conv1.in_channels
        hw = {1: 56, 2: 56, 3: 28, 4: 14}[layer]  # the block input's height and width
        nbytes = a.batch * cin * hw * hw * dtype.itemsize
        sets = [(torch.randn(a.batch, cin, hw, hw, device="cuda", dtype=dtype).to(
            memory_format=torch.channels_last),) for _ in range(n_sets(nbytes))]

        def fwd(x, fused=fused):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                return fused(x)
        pair_y = fwd(*sets[0])
        original = TritonBackend.fuses_shortcut_conv
        TritonBackend.fuses_shortcut_conv = lambda self: False
        try:
            two_y = fwd(*sets[0])
            two_ms = graph_ms(fwd, sets)
        finally:
            TritonBackend.fuses_shortcut_conv = original
        pair_ms = graph_ms(fwd, sets)
        diff = rel_err(pair_y, two_y)
        ok = diff <= TOLERANCES[dtype]
        row = {"block": f"rn50-l{layer}d", "batch": a.batch, "dtype": a.dtype,
               "pair_ms": pair_ms, "two_units_ms": two_ms, "ratio": pair_ms / two_ms,
               "rel_diff": diff, "agree": ok}
        rows.append(row)
        print(f"{row['block']:8} {pair_ms:11.4f} {two_ms:10.4f} {row['ratio']:6.3f}  "
              f"{diff:.1e}{'' if ok else '  DISAGREE'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": "fused_res.pair_ab/1", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
