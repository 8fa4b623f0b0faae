"""What ``ampfn.inspect_precision`` costs, in training steps of the pipeline it inspects.

Issue 22's budget: about 3x one training step, plus the re-run that verifies the islands.
Per round, on a fresh model each: one training step of the pipeline (after one warm-up
step), one ``make(seed)`` (the caller's model building, which the inspector calls twice,
three times with islands), and one whole ``inspect_precision``; reported as medians with
their interquartile ranges, and the per-round ratio to the step, with and without the
``make`` calls. Thread CPU time (``time.thread_time``), so a noisy neighbour's time is
not counted::

    python benchmarks/inspect_cost.py --rounds 15
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from harness import Stat
from torch import nn

import ampfn

Make = Callable[[int], Any]


def _make_mlp(width: int, depth: int) -> Make:
    def make(seed: int) -> Any:
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(model(x).float(), y)
            ampfn.backward(loss)
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, model, opt

    return make


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q(x) @ self.k(x).transpose(-2, -1)).softmax(-1) @ self.v(x)


def _make_attention(seed: int) -> Any:
    """The README's model: its scores overflow fp16, so there is an island to verify."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.embed, model.attn = nn.Linear(64, 64), _Attention(64)
    model.out = nn.Linear(64, 10)
    with torch.no_grad():
        model.embed.weight.mul_(8)
        model.attn.q.weight.mul_(16)
        model.attn.k.load_state_dict(model.attn.q.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(model(x).float().mean(1), y)
        ampfn.backward(loss)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, opt


def _fp16() -> ampfn.Pipeline:
    return ampfn.compose(
        ampfn.with_grad_scaling(torch.amp.GradScaler("cpu")),
        ampfn.with_autocast("fp16", "cpu"),
    )


CASES: dict[str, tuple[Make, Callable[[], Any]]] = {
    "mlp-256x3 bf16": (_make_mlp(256, 3), lambda: ampfn.with_autocast("bf16", "cpu")),
    "mlp-256x3 fp16": (_make_mlp(256, 3), _fp16),
    "mlp-1024x4 fp16": (_make_mlp(1024, 4), _fp16),
    "attention fp16 (island)": (_make_attention, _fp16),
}


def _batch(case: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (rows, 16, 64) if case.startswith("attention") else (rows, 64)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.thread_time()
    out = fn(*args, **kwargs)
    return time.thread_time() - start, out


def measure(case: str, rounds: int, rows: int) -> dict[str, Any]:
    make, transform = CASES[case]
    batch = _batch(case, rows)
    steps, makes, inspects = [], [], []
    islands: tuple[str, ...] = ()
    for _ in range(rounds):
        step, _, _ = make(0)
        wrapped = transform()(step)
        wrapped(batch)  # warm-up
        steps.append(_timed(wrapped, batch)[0])
        makes.append(_timed(make, 0)[0])
        seconds, report = _timed(ampfn.inspect_precision, make, transform(), batch)
        inspects.append(seconds)
        islands = report.islands
    calls = 3 if islands else 2
    ratio = [i / s for i, s in zip(inspects, steps, strict=True)]
    without_make = [
        (i - calls * m) / s for i, m, s in zip(inspects, makes, steps, strict=True)
    ]
    return {
        "case": case,
        "islands": list(islands),
        "step_ms": Stat.of(steps),
        "make_ms": Stat.of(makes),
        "inspect_ms": Stat.of(inspects),
        "ratio": Stat.of(ratio),
        "ratio_without_make": Stat.of(without_make),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, default=64, help="batch rows (default 64)")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    print(
        f"{'case':<24} {'step ms':>20} {'make ms':>20} {'inspect ms':>22} "
        f"{'x step':>20} {'x step, no make':>20}  islands"
    )
    for case in args.cases.split(","):
        r = measure(case, args.rounds, args.rows)
        out.append(r)
        print(
            f"{case:<24} {r['step_ms'].fmt(1e3, 2):>20} {r['make_ms'].fmt(1e3, 2):>20} "
            f"{r['inspect_ms'].fmt(1e3, 1):>22} {r['ratio'].fmt(1, 1):>20} "
            f"{r['ratio_without_make'].fmt(1, 1):>20}  {','.join(r['islands']) or '-'}"
        )
    return out


if __name__ == "__main__":
    main()
