"""Entry point of the 2-process DistributedDataParallel test of FrozenOptimizer (spawned)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import compiledopt as co


def worker(rank: int, world: int, init_file: str, artifact: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
        optimizer = co.FrozenOptimizer(model.parameters(), artifact, lr=10.0, backend="eager")
        generator = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
        for _ in range(10):
            x = torch.randn(16, 4, generator=generator)
            y = x.sum(dim=1, keepdim=True)
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
        torch.save([p.detach() for p in model.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
