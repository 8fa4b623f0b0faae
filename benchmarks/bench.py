"""ampfn pipelines against the identical hand-written PyTorch loops, in one process.

For each pipeline and model size the two loops run interleaved (see harness.py: rotating
order, thread CPU time per step, median and interquartile range), from identical copies
of the model. It prints, per pair, the median time per step of each, the median of the
per-round differences in µs and of the per-round ratios (ampfn / by hand), each with its
interquartile range. A ratio of 1.00 means no overhead. The hand-written loops run
without ampfn's optimizer hook installed, exactly as in a process without ampfn.

With ``--compile`` both loops are compiled (``torch.compile``), and it also reports the
compile time (first two calls, wall clock) and the graph-break reasons of each.

    python benchmarks/bench.py [--device cpu|cuda] [--rounds 150] [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import Comparison, Stat, compare, graph_breaks, interleave
from torch import nn

import ampfn
from ampfn._guard import guard_suspended

Batch = tuple[torch.Tensor, torch.Tensor]
Loop = Callable[[Batch], Any]
SIZES = {"tiny": (32, 64, 32), "large": (512, 2048, 256)}  # in/hidden features, batch
STEPS = {"tiny": 20, "large": 3}  # steps per round


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
    def ours(batch: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: Batch) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(m2(batch[0]).float(), batch[1])
        loss.backward()
        o2.step()
        o2.zero_grad(set_to_none=True)

    return ours, hand


def pair_fp16_scaled(
    model: nn.Module, device: str, clip: bool = False, sync: bool = True
) -> tuple[Loop, Loop]:
    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)
    s2 = torch.amp.GradScaler(device)

    @ampfn.compose(
        ampfn.with_grad_scaling(torch.amp.GradScaler(device), sync=sync),
        ampfn.with_autocast("fp16", device),
    )
    def ours(batch: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
        if clip:
            ampfn.clip_grad_norm_(model.parameters(), 1.0, o1)
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: Batch) -> None:
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
    s2 = torch.amp.GradScaler(device, init_scale=2.0**16, growth_interval=2000)
    transform = ampfn.with_apex("O2", model, o1, backend="native")

    @transform
    def ours(batch: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]), batch[1]))
        ampfn.step(o1)
        o1.zero_grad(set_to_none=True)

    def hand(batch: Batch) -> None:
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


def pair_telemetry(model: nn.Module, device: str) -> tuple[Loop, Loop]:
    """fp16 + scaling with with_telemetry(every=1) against the same pipeline without it
    (the "by hand" column is ampfn here: this pair measures telemetry's own cost)."""
    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)
    records: list[Any] = []

    def step_for(m: nn.Module, o: torch.optim.Optimizer) -> Loop:
        def train_step(batch: Batch) -> None:
            ampfn.backward(F.cross_entropy(m(batch[0]).float(), batch[1]))
            ampfn.step(o)
            o.zero_grad(set_to_none=True)
            del records[:-1]  # keep memory flat over many rounds

        return train_step

    def pipeline() -> Any:
        return ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler(device)),
            ampfn.with_autocast("fp16", device),
        )

    ours = ampfn.compose(ampfn.with_telemetry(records, model=model), pipeline())(
        step_for(model, o1)
    )
    return ours, pipeline()(step_for(m2, o2))


PAIRS: dict[str, Callable[[nn.Module, str], tuple[Loop, Loop]]] = {
    "autocast bf16": pair_bf16,
    "autocast fp16 + scaling": pair_fp16_scaled,
    "fp16 + scaling + clip": lambda m, d: pair_fp16_scaled(m, d, clip=True),
    # No hand-written loop skips without a sync for a non-fused optimizer: this row is
    # the price of the sync-free mode against GradScaler's syncing step.
    "sync-free (vs syncing)": lambda m, d: pair_fp16_scaled(m, d, sync=False),
    "apex O2 (native)": pair_apex_o2,
    "telemetry (vs no telemetry)": pair_telemetry,
}


# --------------------------------------------------------------------------- running


def batches(size: str, device: str, n: int) -> list[Batch]:
    d, _, b = SIZES[size]
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(b, d, generator=g).to(device),
            torch.randint(0, 10, (b,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def _hand_context() -> contextlib.AbstractContextManager[None]:
    return guard_suspended()


def _warm_up(fn: Loop, data: list[Batch]) -> None:
    for b in data:
        fn(b)


def run_pair(
    name: str, size: str, args: argparse.Namespace
) -> tuple[Comparison, dict[str, Any]]:
    ours, hand = PAIRS[name](mlp(size, args.device), args.device)
    data = batches(size, args.device, STEPS[size])
    extra: dict[str, Any] = {}
    if args.compile:
        torch._dynamo.reset()
        compiled: dict[str, Loop] = {}
        for label, loop in (("ampfn", ours), ("by hand", hand)):
            fn = torch.compile(loop, backend=args.backend)
            start = time.perf_counter()
            reasons, graphs = graph_breaks(functools.partial(_warm_up, fn, data[:2]))
            extra[label] = {
                "compile_s": time.perf_counter() - start,
                "graphs": graphs,
                "breaks": reasons,
            }
            compiled[label] = fn
        ours, hand = compiled["ampfn"], compiled["by hand"]
    times = interleave_with_guard(ours, hand, data, args)
    return compare(times, "ampfn", "by hand"), extra


def interleave_with_guard(
    ours: Loop, hand: Loop, data: list[Batch], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Interleave the pair. Eager: ampfn's optimizer hook is suspended around each whole
    hand-written loop, outside its timing. Compiled: both loops run with the hook in
    place (a dict lookup that returns at once outside ampfn), because dynamo guards on
    the global hook dict: suspending it would recompile both loops every round."""
    loops = {"ampfn": ours, "by hand": hand}
    return interleave(
        loops,
        data,
        rounds=args.rounds,
        device=args.device,
        contexts={} if args.compile else {"by hand": _hand_context},
    )


def import_cost(repeats: int = 7) -> tuple[float, list[str]]:
    code = (
        "import sys, time, torch; t = time.perf_counter(); import ampfn; dt = time.perf_counter() - t; "
        "print(dt); print(','.join(m for m in ('apex', 'torch_xla', 'hypothesis', 'torchao') if m in sys.modules))"
    )
    times, heavy = [], set()
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        times.append(float(out[0]))
        heavy |= {m for m in out[1].split(",") if m}
    return Stat.of(times).median, sorted(heavy)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--sizes", default="tiny,large")
    parser.add_argument("--pipelines", default=",".join(PAIRS))
    parser.add_argument(
        "--compile", action="store_true", help="compile both loops with torch.compile"
    )
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1)",
    )
    parser.add_argument(
        "--json", default=None, help="also write the results to this file"
    )
    parser.add_argument("--quick", action="store_true", help="5 rounds: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 5
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    mode = f"compiled ({args.backend})" if args.compile else "eager"
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {mode}, "
        f"{args.rounds} interleaved rounds; per step: median [IQR]"
    )
    print(
        f"{'pipeline':<28}{'model':<7}{'ampfn (us)':>30}{'by hand (us)':>30}{'diff (us)':>30}{'ratio':>24}"
    )
    results: list[dict[str, Any]] = []
    for name in args.pipelines.split(","):
        for size in args.sizes.split(","):
            c, extra = run_pair(name, size, args)
            print(
                f"{name:<28}{size:<7}{c.ours.fmt(1e6):>30}{c.theirs.fmt(1e6):>30}"
                f"{c.diff.fmt(1e6):>30}{c.ratio.fmt(1, 3):>24}"
            )
            for label, info in extra.items():
                breaks = "; ".join(
                    f"{k.split(' | ')[0]} x{v}"
                    for k, v in sorted(info["breaks"].items())
                )
                print(
                    f"    {label:<8} compile {info['compile_s']:.1f} s, {info['graphs']} graphs, breaks: {breaks}"
                )
            results.append(
                {
                    "pipeline": name,
                    "model": size,
                    "ours_us": c.ours.median * 1e6,
                    "hand_us": c.theirs.median * 1e6,
                    "diff_us": [c.diff.median * 1e6, c.diff.q1 * 1e6, c.diff.q3 * 1e6],
                    "ratio": [c.ratio.median, c.ratio.q1, c.ratio.q3],
                    **({"compile": extra} if extra else {}),
                }
            )
    cost, heavy = import_cost()
    print(
        f"import ampfn after torch: {cost * 1e3:.1f} ms (median of 7 fresh interpreters); "
        f"optional backends imported: {', '.join(heavy) or 'none'}"
    )
    out = {
        "device": args.device,
        "mode": mode,
        "rounds": args.rounds,
        "results": results,
        "import_ms": cost * 1e3,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
