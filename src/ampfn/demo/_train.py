"""Layer 7, the demo: one training run under one pipeline."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import ampfn
from ampfn.demo._data import build_model
from ampfn.demo._pipelines import make_pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "xla":
        import torch_xla

        cut = getattr(torch_xla, "sync", None)
        if cut is None:  # torch_xla before torch_xla.sync()
            import torch_xla.core.xla_model as xm

            cut = xm.mark_step
        cut()


def training_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer
) -> Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The demo's one training step, the same under every pipeline."""

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x).float(), y)
        ampfn.backward(loss)
        ampfn.clip_grad_norm_(model.parameters(), 5.0, opt)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def run(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    data: tuple[torch.Tensor, ...],
    history: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Train under one pipeline; its row of the table (and, in ``history``, its steps)."""
    x_train, y_train, x_test, y_test = data
    model = build_model(args.seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train_step = training_step(model, opt)
    records: list[ampfn.StepRecord] = []
    step = ampfn.compose(
        ampfn.with_telemetry(records), make_pipeline(name, model, opt, device)
    )(train_step)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = [
        torch.randint(0, len(x_train), (args.batch_size,), generator=g).to(device)
        for _ in range(args.steps)
    ]
    progress = _progress(args, name)
    losses = []
    _sync(device)
    start = time.perf_counter()
    for idx in order:
        losses.append(step((x_train[idx], y_train[idx])))
        if device.type == "xla":
            _sync(device)  # cut the lazy graph every step, whatever the pipeline
        progress.update(1)
    _sync(device)
    elapsed = time.perf_counter() - start
    progress.close()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    skipped = [r.step for r in records if r.skipped]
    scale = ampfn.loss_scale(step)
    if history is not None:
        history[name] = {
            "loss": [float(v) for v in losses],
            "loss_scale": [r.loss_scale for r in records],
            "skipped": skipped,
            "test_acc": accuracy,
        }
    return {
        "pipeline": name,
        "final loss": f"{float(losses[-1]):.4f}",
        "test acc": f"{accuracy:.3f}",
        "vs fp32": "",
        "steps/s": f"{args.steps / elapsed:.0f}",
        "skipped": str(len(skipped)),
        "loss scale": "-" if scale is None else f"{scale:g}",
    }


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(args: argparse.Namespace, name: str) -> Any:
    if args.no_progress or importlib.util.find_spec("tqdm") is None:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=args.steps, desc=f"{name:>16}", unit="step", leave=False, file=sys.stderr
    )
