"""Timing loops against each other in one process, robustly enough for a noisy machine.

Every round runs each loop over the same batches, in an order that rotates from round to
round (so no loop always runs first, or right after the same other loop), and records
the calling thread's CPU time per step (``time.thread_time_ns``: time the thread ran, not
time it waited for a noisy neighbour). On CUDA the device is synchronized around each
loop and wall time is used instead. Per loop the harness reports the median time per
step with its interquartile range; per pair, the median of the per-round differences
(in µs) and of the per-round ratios, each with its interquartile range.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Loop = Callable[[Any], Any]


@dataclass(frozen=True)
class Stat:
    """A median with its interquartile range (q1, q3)."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if len(values) < 4:
            m = statistics.median(values)
            return cls(m, min(values), max(values))
        q1, m, q3 = statistics.quantiles(values, n=4)
        return cls(m, q1, q3)

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        return f"{self.median * scale:.{digits}f} [{self.q1 * scale:.{digits}f}, {self.q3 * scale:.{digits}f}]"


@dataclass(frozen=True)
class Comparison:
    ours: Stat  # seconds per step
    theirs: Stat
    diff: Stat  # seconds per step, ours - theirs, per round
    ratio: Stat  # ours / theirs, per round


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_loop(
    loop: Loop, batches: Sequence[Any], device: str, wall: bool = False
) -> float:
    """Seconds per step of ``loop`` over ``batches``: thread CPU time, or wall time on CUDA
    (and where ``wall``: processes that wait for each other in collectives)."""
    if device == "cuda" or wall:
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            loop(b)
        _sync(device)
        return (time.perf_counter() - start) / len(batches)
    start_ns = time.thread_time_ns()
    for b in batches:
        loop(b)
    return (time.thread_time_ns() - start_ns) / 1e9 / len(batches)


def interleave(
    loops: dict[str, Loop],
    batches: Sequence[Any],
    *,
    rounds: int,
    device: str,
    warmup: int = 3,
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]
    | None = None,
    wall: bool = False,
) -> dict[str, list[float]]:
    """Per loop, its time per step in each round, the order rotating every round.
    ``contexts`` gives a loop a context entered around each of its timings (outside them)."""
    names = list(loops)
    contexts = contexts or {}

    def timed(name: str) -> float:
        with contexts.get(name, contextlib.nullcontext)():
            return time_loop(loops[name], batches, device, wall)

    for _ in range(warmup):
        for name in names:
            timed(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if (r // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(timed(name))
    return times


def compare(times: dict[str, list[float]], ours: str, theirs: str) -> Comparison:
    a, b = times[ours], times[theirs]
    return Comparison(
        ours=Stat.of(a),
        theirs=Stat.of(b),
        diff=Stat.of([x - y for x, y in zip(a, b, strict=True)]),
        ratio=Stat.of([x / y for x, y in zip(a, b, strict=True)]),
    )


def graph_breaks(fn: Callable[[], Any]) -> tuple[dict[str, int], int]:
    """Run ``fn`` (which calls compiled code) and return dynamo's graph-break reasons
    (first line of each, with counts) and the number of graphs compiled."""
    from torch._dynamo.utils import counters

    counters.clear()
    fn()
    reasons: dict[str, int] = {}
    for key, count in counters["graph_break"].items():
        first = key.splitlines()[0]
        explanation = next(
            (line.strip() for line in key.splitlines() if "Explanation" in line), ""
        )
        label = f"{first} | {explanation}" if explanation else first
        reasons[label] = reasons.get(label, 0) + count
    return reasons, int(counters["stats"]["unique_graphs"])
