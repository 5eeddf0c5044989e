"""Entry point of the 2-process torch.distributed meta-training test (spawned, so importable)."""

import torch
import torch.distributed as dist
from models import ScalarScale

from compiledopt.meta import MetaConfig, MetaLoop
from compiledopt.tasks import RegressionFamily

CONFIG = dict(meta_steps=3, unroll=3, horizon=6, tasks_per_step=4, meta_lr=0.05, eval_every=0)


def train(world: int, rank: int = 0) -> torch.Tensor:
    transform = ScalarScale(log_scale=-2.0, dtype=torch.float32)
    if rank == 1:  # different start on purpose: the loop must broadcast rank 0's weights
        with torch.no_grad():
            transform.log_scale.fill_(5.0)
    loop = MetaLoop(transform, RegressionFamily(seed=3), MetaConfig(**CONFIG))
    loop.train(progress=False)
    return transform.log_scale.detach().clone()


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train(world, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
