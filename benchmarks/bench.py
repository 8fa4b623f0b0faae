"""ampfn pipelines against the identical hand-written torch.amp loops, in one process.

For each pipeline and model size the two loops run interleaved (alternating which goes
first) from identical copies of the model, and the script prints the median over rounds
of (ampfn time / hand-written time) per step. A ratio of 1.00 means no overhead. It also
times ``import ampfn`` after torch in fresh interpreters and checks that no optional
backend (apex, torch_xla, hypothesis) was imported.

    python benchmarks/bench.py [--device cpu|cuda] [--rounds 15] [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn

Loop = Callable[[tuple[torch.Tensor, torch.Tensor]], Any]
SIZES = {"tiny": (32, 64, 32), "large": (512, 2048, 256)}  # in/hidden features, batch


def mlp(size: str, device: str) -> nn.Module:
    d, h, _ = SIZES[size]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    ).to(device)


# --------------------------------------------------------------------------- the pairs


def pair_bf16(model: nn.Module, device: str) -> tuple[Loop, Loop]:
    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)

    @ampfn.with_autocast("bf16", device)
    def ours(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(m2(batch[0]).float(), batch[1])
        loss.backward()
        o2.step()
        o2.zero_grad(set_to_none=True)

    return ours, hand


def pair_fp16_scaled(
    model: nn.Module, device: str, clip: bool = False
) -> tuple[Loop, Loop]:
    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)
    s2 = torch.amp.GradScaler(device)

    @ampfn.compose(
        ampfn.with_grad_scaling(torch.amp.GradScaler(device)),
        ampfn.with_autocast("fp16", device),
    )
    def ours(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
        if clip:
            ampfn.clip_grad_norm_(model.parameters(), 1.0, o1)
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(m2(batch[0]).float(), batch[1])
        s2.scale(loss).backward()
        if clip:
            s2.unscale_(o2)
            torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
        s2.step(o2)
        s2.update()
        o2.zero_grad(set_to_none=True)

    return ours, hand


def pair_apex_o2(model: nn.Module, device: str) -> tuple[Loop, Loop]:
    """Native O2 against the same recipe by hand: fp16 model, fp32 masters, GradScaler."""
    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    masters = [p.detach().clone().requires_grad_(True) for p in m2.parameters()]
    o2 = torch.optim.SGD(masters, lr=1e-3, momentum=0.9)
    m2.half()
    halves: list[torch.Tensor] = list(m2.parameters())
    s2 = torch.amp.GradScaler(device)
    transform = ampfn.with_apex("O2", model, o1, backend="native")

    @transform
    def ours(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]), batch[1]))
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss = F.cross_entropy(m2(batch[0].half()).float(), batch[1])
        s2.scale(loss).backward()
        for p, m in zip(halves, masters, strict=True):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        s2.step(o2)
        s2.update()
        with torch.no_grad():
            torch._foreach_copy_(halves, masters)
        o2.zero_grad(set_to_none=True)

    return ours, hand


PAIRS: dict[str, Callable[[nn.Module, str], tuple[Loop, Loop]]] = {
    "autocast bf16": pair_bf16,
    "autocast fp16 + scaling": pair_fp16_scaled,
    "fp16 + scaling + clip": lambda m, d: pair_fp16_scaled(m, d, clip=True),
    "apex O2 (native)": pair_apex_o2,
}


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_loop(
    loop: Loop, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str
) -> float:
    sync(device)
    start = time.perf_counter()
    for b in batches:
        loop(b)
    sync(device)
    return (time.perf_counter() - start) / len(batches)


def bench_pair(
    name: str, size: str, device: str, rounds: int, steps: int
) -> tuple[float, float, float]:
    d, _, n = SIZES[size]
    ours, hand = PAIRS[name](mlp(size, device), device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(n, d, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device),
        )
        for _ in range(steps)
    ]
    for loop in (ours, hand):
        time_loop(loop, batches[:10], device)  # warm up
    ratios, t_ours, t_hand = [], [], []
    for r in range(rounds):
        if r % 2:
            a, b = time_loop(ours, batches, device), time_loop(hand, batches, device)
        else:
            b, a = time_loop(hand, batches, device), time_loop(ours, batches, device)
        ratios.append(a / b)
        t_ours.append(a)
        t_hand.append(b)
    return (
        statistics.median(t_ours),
        statistics.median(t_hand),
        statistics.median(ratios),
    )


def import_cost(repeats: int = 7) -> tuple[float, list[str]]:
    code = (
        "import sys, time, torch; t = time.perf_counter(); import ampfn; dt = time.perf_counter() - t; "
        "print(dt); print(','.join(m for m in ('apex', 'torch_xla', 'hypothesis') if m in sys.modules))"
    )
    times, heavy = [], set()
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        times.append(float(out[0]))
        heavy |= {m for m in out[1].split(",") if m}
    return statistics.median(times), sorted(heavy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of 10 steps: a smoke run"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 10
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds of {args.steps} steps; median per step"
    )
    print(f"{'pipeline':<26}{'model':<7}{'ampfn':>11}{'by hand':>11}{'ratio':>8}")
    for name in PAIRS:
        for size in SIZES:
            ours, hand, ratio = bench_pair(
                name, size, args.device, args.rounds, args.steps
            )
            print(
                f"{name:<26}{size:<7}{ours * 1e6:>9.0f}us{hand * 1e6:>9.0f}us{ratio:>8.3f}"
            )
    cost, heavy = import_cost()
    print(
        f"import ampfn after torch: {cost * 1e3:.1f} ms (median of 7 fresh interpreters); "
        f"optional backends imported: {', '.join(heavy) or 'none'}"
    )


if __name__ == "__main__":
    main()
