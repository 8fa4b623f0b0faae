"""DDP with ampfn: fp16 autocast, loss scaling, skips that agree across ranks.

Run on CPU (gloo) or GPUs (nccl), one node or many, with nothing ampfn-specific:

    torchrun --standalone --nproc-per-node 2 examples/ddp.py
"""

import contextlib
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ampfn

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = (
    torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
)
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)  # the same initial weights on every rank
model = DDP(
    torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    ).to(device)
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)


@ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", device.type))
def train_step(batch, accumulate=2):
    x, y = batch
    for i, (xs, ys) in enumerate(
        zip(x.chunk(accumulate), y.chunk(accumulate), strict=True)
    ):
        last = i == accumulate - 1
        with (
            contextlib.nullcontext() if last else model.no_sync()
        ):  # all-reduce once per step
            ampfn.backward(F.cross_entropy(model(xs).float(), ys) / accumulate)
    stepped = ampfn.step(
        opt
    )  # the same True/False on every rank (sync_ranks: automatic)
    opt.zero_grad(set_to_none=True)
    return stepped


g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
for _ in range(20):
    x = torch.randn(16, 32, generator=g).to(device)
    y = (x[:, 0] > 0).long().to(device)
    stepped = train_step((x, y))
scales = [None] * world
dist.all_gather_object(scales, ampfn.loss_scale(train_step))
if rank == 0:
    print(
        f"{world} ranks, 20 steps, last step taken: {stepped}, loss scale on every rank: {scales}"
    )
# Collect garbage before destroying the group: without it, torch 2.13 with gloo aborts a
# rank at exit ("terminate called without an active exception") in about 1 run in 3 on
# our CPU machines, plain DDP code without ampfn included.
gc.collect()
dist.destroy_process_group()
