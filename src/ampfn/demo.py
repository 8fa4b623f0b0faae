"""The demo: one training step, several precision pipelines, one table.

Trains a small network on scikit-learn's bundled digits (1,797 8x8 images, shipped
inside the package: nothing is downloaded) under each pipeline, from the same initial
weights and the same batches, and prints final loss, test accuracy, steps/s, skipped
steps and the final loss scale::

    python -m ampfn.demo --steps 400 --pipelines fp32,bf16,fp16,apex-O2
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn._scaling import find_scaler_state

PIPELINES = (
    "fp32",
    "bf16",
    "fp16",
    "apex-O0",
    "apex-O1",
    "apex-O2",
    "apex-O3",
    "bf16-true",
    "16-true",
    "bf16-true+master",
    "bf16-true+sr",
)
_XLA_PIPELINES = ("fp32", "bf16", "bf16-true", "bf16-true+master", "bf16-true+sr")
_DEFAULT = "fp32,bf16,fp16"


def load_digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Standardized digits, split 1,500 train / 297 test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit(
            f"ampfn.demo needs scikit-learn's bundled digits data set ({e}): pip install 'ampfn[demo]'"
        ) from e
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    x = (x - x[:1500].mean(0)) / (x[:1500].std(0) + 1e-3)
    return tuple(t.to(device) for t in (x[:1500], y[:1500], x[1500:], y[1500:]))


def build_model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).to(device)


def make_pipeline(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> Any:
    """The transform for a pipeline name (the same step runs under each)."""
    if name.startswith(("bf16-true+", "16-true")):
        policy, _, remedy = name.partition("+")
        return ampfn.with_policy(
            policy,
            model,
            opt,
            master_weights=remedy == "master",
            stochastic_rounding=remedy == "sr",
        )
    if device.type == "xla":
        if name == "bf16":
            return ampfn.with_xla_bf16()
        if name == "bf16-true":
            return ampfn.with_xla_bf16(mode="true", model=model)
        return ampfn.compose()
    if name == "bf16-true":
        return ampfn.with_policy("bf16-true", model, opt)
    if name == "fp32":
        return ampfn.compose()
    if name == "bf16":
        return ampfn.with_autocast("bf16", device.type)
    if name == "fp16":
        return ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler(device.type)),
            ampfn.with_autocast("fp16", device.type),
        )
    if name.startswith("apex-"):
        return ampfn.with_apex(name.removeprefix("apex-"), model, opt)
    raise SystemExit(f"ampfn.demo: pipeline {name!r} runs only with --device xla")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "xla":
        import torch_xla

        torch_xla.sync()


def _scale(pipeline_step: Callable[..., Any]) -> str:
    state = find_scaler_state(ampfn.state_dict(pipeline_step))
    return "-" if state is None else f"{state['scale']:g}"


def run(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    data: tuple[torch.Tensor, ...],
) -> dict[str, str]:
    x_train, y_train, x_test, y_test = data
    model = build_model(args.seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def train_step(
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, bool]:
        x, y = batch
        loss = F.cross_entropy(model(x).float(), y)
        ampfn.backward(loss)
        ampfn.clip_grad_norm_(model.parameters(), 5.0, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach(), stepped

    step = make_pipeline(name, model, opt, device)(train_step)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = [
        torch.randint(0, len(x_train), (args.batch_size,), generator=g).to(device)
        for _ in range(args.steps)
    ]
    progress = _progress(args, name)
    skipped, loss = 0, torch.zeros(())
    _sync(device)
    start = time.perf_counter()
    for idx in order:
        loss, stepped = step((x_train[idx], y_train[idx]))
        skipped += not stepped
        progress.update(1)
    _sync(device)
    elapsed = time.perf_counter() - start
    progress.close()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return {
        "pipeline": name,
        "final loss": f"{loss.item():.4f}",
        "test acc": f"{accuracy:.3f}",
        "steps/s": f"{args.steps / elapsed:.0f}",
        "skipped": str(skipped),
        "loss scale": _scale(step),
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
        total=args.steps, desc=f"{name:>9}", unit="step", leave=False, file=sys.stderr
    )


def table(rows: Sequence[dict[str, str]]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    return "\n".join(
        [
            line(cols),
            line(["-" * w for w in widths]),
            *(line([r[c] for c in cols]) for r in rows),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ampfn.demo",
        description="Train a small MLP on scikit-learn's bundled digits under several precision pipelines "
        "(the same step function under each) and compare them.",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=400,
        help="optimizer steps per pipeline (default 400)",
    )
    parser.add_argument(
        "--pipelines",
        default=None,
        help=f"comma-separated, from {', '.join(PIPELINES)} (default {_DEFAULT}; with --device xla: fp32,bf16,bf16-true)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or xla (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for weights, split and batches (default 0)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument(
        "--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    valid = _XLA_PIPELINES if device == "xla" else PIPELINES
    chosen = (
        args.pipelines or (",".join(_XLA_PIPELINES) if device == "xla" else _DEFAULT)
    ).split(",")
    for name in chosen:
        if name not in valid:
            parser.error(
                f"--pipelines: {name!r} is not one of {', '.join(valid)}"
                + (" (on --device xla)" if device == "xla" else "")
            )
    args.pipelines, args.device = chosen, device
    return args


def _device(name: str) -> torch.device:
    if name == "xla":
        try:
            import torch_xla
        except ImportError as e:
            raise SystemExit(
                f"ampfn.demo --device xla needs torch_xla ({e}): pip install 'ampfn[xla]' "
                "(set PJRT_DEVICE=CPU to use XLA's CPU backend without a TPU)"
            ) from e
        return torch.device(torch_xla.device())
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "ampfn.demo --device cuda: CUDA is not available here; use --device cpu"
        )
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = _device(args.device)
    data = load_digits(args.seed, device)
    print(
        f"ampfn {ampfn.__version__} demo: digits (sklearn), {args.steps} steps of {args.batch_size}, device {device}"
    )
    rows = [run(name, args, device, data) for name in args.pipelines]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
