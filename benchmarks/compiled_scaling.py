"""Compiled fp16 loss scaling on the nanoGPT-style GPT: ampfn sync-free vs ampfn syncing
vs the hand-written GradScaler loop, each compiled the same way.

Each variant trains its own copy of the same model (examples/nanogpt.py's GPT, fp16
autocast, AdamW foreach or fused, clipping to 1.0) on the same batches. Each is warmed up eagerly for one
step (AdamW creates its state), then compiled; the graphs and graph-break reasons of its
first compiled steps are reported. Then ``benchmarks/harness.py`` times the three in
interleaved rounds whose order rotates (thread CPU time on CPU, wall time on CUDA),
and reports the median time per step with its interquartile range, and per pair the
median per-round difference (µs) and ratio with theirs.

    python benchmarks/compiled_scaling.py [--rounds 30] [--steps 5] [--backend inductor]
        [--optimizer foreach|fused]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from harness import compare, graph_breaks, interleave
from torch import nn

import ampfn

Batch = tuple[torch.Tensor, torch.Tensor]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def nanogpt_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "example_nanogpt", ROOT / "examples" / "nanogpt.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ampfn_step(
    model: nn.Module, opt: torch.optim.Optimizer, device: str, sync: bool
) -> Callable[[Batch], Any]:
    @ampfn.compose(
        ampfn.with_grad_scaling(torch.amp.GradScaler(device), sync=sync),
        ampfn.with_autocast("fp16", device),
    )
    def train_step(batch: Batch) -> Any:
        _, loss = model(*batch)
        ampfn.backward(loss)
        ampfn.clip_grad_norm_(list(model.parameters()), 1.0, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    return train_step  # type: ignore[no-any-return]


def hand_step(
    model: nn.Module, opt: torch.optim.Optimizer, device: str
) -> Callable[[Batch], Any]:
    scaler = torch.amp.GradScaler(device)

    def train_step(batch: Batch) -> Any:
        with torch.autocast(device, dtype=torch.float16):
            _, loss = model(*batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return train_step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--optimizer",
        choices=("foreach", "fused"),
        default="foreach",
        help="AdamW's implementation: sync-free masks a foreach step, and hands a fused "
        "one the overflow flag",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
    ex = nanogpt_module()
    config = ex.GPTConfig(
        block_size=args.seq,
        vocab_size=256,
        n_layer=args.layers,
        n_head=4,
        n_embd=args.width,
    )
    torch.manual_seed(0)
    base = ex.GPT(config).to(args.device)
    g = torch.Generator().manual_seed(1)
    batches: list[Batch] = []
    for _ in range(args.steps + 1):
        seq = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g).to(
            args.device
        )
        batches.append((seq[:, :-1], seq[:, 1:]))
    makers: dict[
        str, Callable[[nn.Module, torch.optim.Optimizer], Callable[[Batch], Any]]
    ] = {
        "ampfn sync-free": lambda m, o: ampfn_step(m, o, args.device, sync=False),
        "ampfn syncing": lambda m, o: ampfn_step(m, o, args.device, sync=True),
        "hand GradScaler": lambda m, o: hand_step(m, o, args.device),
    }
    loops: dict[str, Callable[[Batch], Any]] = {}
    shape: dict[str, Any] = {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        fused = args.optimizer == "fused"
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-4, foreach=not fused, fused=fused
        )
        step = make(model, opt)
        step(batches[0])  # eagerly: AdamW creates its state
        compiled = torch.compile(step, backend=args.backend)

        def first_steps(c: Callable[[Batch], Any] = compiled) -> None:
            for b in batches[:2]:
                c(b)

        reasons, graphs = graph_breaks(first_steps)
        shape[name] = {"graphs": graphs, "breaks": reasons}
        loops[name] = compiled
        print(f"{name}: {graphs} graphs, {sum(reasons.values())} breaks", flush=True)
        for reason, count in sorted(reasons.items()):
            print(f"    {count} x {reason[:150]}")
    times = interleave(loops, batches[1:], rounds=args.rounds, device=args.device)
    out: dict[str, Any] = {"shape": shape, "times": times, "args": vars(args)}
    print(
        f"\n{args.rounds} interleaved rounds of {args.steps} steps, {args.backend}, "
        f"AdamW {args.optimizer}, {args.device}, torch {torch.__version__}: median [IQR] "
        "per step"
    )
    for theirs in ("ampfn syncing", "hand GradScaler"):
        c = compare(times, "ampfn sync-free", theirs)
        print(
            f"  sync-free {c.ours.fmt(1e6)} µs vs {theirs} {c.theirs.fmt(1e6)} µs: "
            f"diff {c.diff.fmt(1e6)} µs, ratio {c.ratio.fmt(digits=3)}"
        )
    c = compare(times, "ampfn syncing", "hand GradScaler")
    print(
        f"  syncing {c.ours.fmt(1e6)} µs vs hand GradScaler {c.theirs.fmt(1e6)} µs: "
        f"diff {c.diff.fmt(1e6)} µs, ratio {c.ratio.fmt(digits=3)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
