"""A converted model trains under DistributedDataParallel (2 CPU ranks over gloo) exactly like
the unconverted one."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import randomize_bn
from torch import nn

import fused_res
from fused_res import models


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        base = randomize_bn(models.cifar_resnet(8, shortcut="B")).double()
        results = {}
        for tag, model in (("eager", base), ("fused", fused_res.convert(base))):
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            torch.manual_seed(1 + rank)  # each rank its own shard of data
            for _ in range(2):
                x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
                target = torch.randint(0, 10, (4,))
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), target).backward()
                opt.step()
            results[tag] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for r in ranks:
        for k, v in r["eager"].items():
            assert torch.allclose(r["fused"][k].double(), v.double(), rtol=1e-9, atol=1e-12), k
    # Gradients were all-reduced: parameters agree across ranks (BN buffers are per rank).
    for k, v in ranks[0]["fused"].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, ranks[1]["fused"][k]), k
