"""The cost of agreeing on skips across ranks: DDP on 2 processes (gloo, loopback).

Interleaves, in each of 2 ranks, the same DDP step three ways: with_grad_scaling with
sync_ranks (one extra all-reduce of found_inf per update), with sync_ranks=False, and
hand-written GradScaler; wall time per step (collectives wait), median and IQR on rank 0.

    python benchmarks/bench_distributed.py [--rounds 100] [--size tiny|large]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from bench import SIZES, batches, mlp
from harness import compare, interleave

import ampfn
from ampfn._guard import guard_suspended


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    base = mlp(args.size, "cpu")
    loops: dict[str, Any] = {}
    for name, sync_ranks in (("sync_ranks", True), ("sync_ranks=False", False)):
        model = DDP(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        @ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler("cpu"), sync_ranks=sync_ranks),
            ampfn.with_autocast("fp16", "cpu"),
        )
        def step(b: Any, model: Any = model, opt: Any = opt) -> None:
            ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)

        loops[name] = step
    model = DDP(copy.deepcopy(base))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")

    def hand(b: Any) -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(b[0]).float(), b[1])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    loops["by hand"] = hand
    data = batches(args.size, "cpu", 10)
    # wall time: the ranks wait for each other in collectives
    times = interleave(
        loops,
        data,
        rounds=args.rounds,
        device="cpu",
        wall=True,
        contexts={"by hand": guard_suspended},
    )
    if rank == 0:
        for name in ("sync_ranks", "sync_ranks=False"):
            c = compare(times, name, "by hand")
            print(
                f"{name:<18} {c.ours.fmt(1e6)} us/step vs by hand {c.theirs.fmt(1e6)}: diff {c.diff.fmt(1e6)} us, ratio {c.ratio.fmt(1, 3)}"
            )
        c = compare(times, "sync_ranks", "sync_ranks=False")
        print(f"the all-reduce itself: {c.diff.fmt(1e6)} us per step")
    gc.collect()  # before destroying the group, as in examples/ddp.py (an abort at exit)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(
        f"DDP, 2 ranks, gloo on loopback, {args.size} MLP, {args.rounds} interleaved rounds; wall time, median [IQR]"
    )
    mp.start_processes(worker, args=(port, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
