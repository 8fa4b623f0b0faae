"""Layer 7, on top: ``python -m ampfn.inspect``, the precision inspector on the demo's model.

For each pipeline, one step against fp32 on a batch of scikit-learn's digits (the demo
extra), printed as :class:`ampfn.PrecisionReport`'s table: the error each module
introduces, the fp32 islands that remove it, gradient underflow::

    python -m ampfn.inspect --pipelines bf16,fp16,apex-O2 --json report.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ampfn.demo._inspect import inspect_demo
from ampfn.demo._pipelines import PIPELINES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ampfn.inspect",
        description="Compare one training step of the demo's model under each precision "
        "pipeline with fp32: where precision is lost, and which modules to keep in fp32.",
    )
    parser.add_argument(
        "--pipelines",
        default=",".join(PIPELINES),
        help=f"comma-separated, from {', '.join(PIPELINES)} (default all)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="write the reports as JSON"
    )
    args = parser.parse_args(argv)
    args.pipelines = args.pipelines.split(",")
    for name in args.pipelines:
        if name not in PIPELINES:
            parser.error(f"--pipelines: {name!r} is not one of {', '.join(PIPELINES)}")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reports = inspect_demo(
        args.pipelines,
        torch.device(args.device),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.json:
        data = {
            name: r.to_dict() for name, r in zip(args.pipelines, reports, strict=True)
        }
        Path(args.json).write_text(json.dumps(data, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
