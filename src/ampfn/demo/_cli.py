"""Layer 7, the demo: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import ampfn
from ampfn.demo._data import load_digits
from ampfn.demo._inspect import inspect_demo
from ampfn.demo._pipelines import _DEFAULT, _XLA_DEFAULT, _XLA_PIPELINES, PIPELINES
from ampfn.demo._report import _against_fp32, plot, table
from ampfn.demo._train import run


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "ampfn-demo" if name.startswith("ampfn-demo") else "python -m ampfn.demo"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=_prog(),
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
        help=f"comma-separated, from {', '.join(PIPELINES)} (default {_DEFAULT}); "
        f"with --device xla, from {', '.join(_XLA_PIPELINES)} (default {_XLA_DEFAULT})",
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
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw loss, loss scale and accuracy",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write the table and the per-step histories",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--inspect",
        action="store_true",
        help="instead of training, compare one step of each pipeline with fp32 "
        "(ampfn.inspect_precision): where precision is lost, which modules to keep fp32",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "tpu":
        parser.error(
            "--device tpu: TPUs run through torch_xla; use --device xla (with PJRT_DEVICE=TPU)"
        )
    if device not in ("cpu", "cuda", "xla"):
        parser.error(f"--device: expected cpu, cuda or xla, got {device!r}")
    valid = _XLA_PIPELINES if device == "xla" else PIPELINES
    chosen = (args.pipelines or (_XLA_DEFAULT if device == "xla" else _DEFAULT)).split(
        ","
    )
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
                f"ampfn.demo --device xla needs torch_xla ({e}): pip install -e '.[xla]' "
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
    if args.inspect:
        inspect_demo(
            args.pipelines,
            device,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
        )
        return 0
    data = load_digits(args.seed, device)
    title = f"ampfn {ampfn.__version__} demo: digits (sklearn), {args.steps} steps of {args.batch_size}, device {device}"
    print(title)
    history: dict[str, Any] = {}
    rows = [run(name, args, device, data, history) for name in args.pipelines]
    _against_fp32(rows)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"title": title, "table": rows, "history": history}, indent=1)
        )
    if args.plot:
        plot(history, args.plot, title)
        print(f"figure: {args.plot}")
    return 0
