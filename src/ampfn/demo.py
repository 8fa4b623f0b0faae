"""The demo: one training step, several precision pipelines, one table and one figure.

Trains a small network on scikit-learn's bundled digits (1,797 8x8 images, shipped
inside the package: nothing is downloaded) under each pipeline, from the same initial
weights and the same batches, and prints final loss, test accuracy (and how far it ends
from fp32), steps/s, skipped steps and the final loss scale. ``with_telemetry`` records
each step's loss scale and skips; ``--plot`` draws them, ``--json`` writes them::

    python -m ampfn.demo --steps 400 --pipelines fp32,bf16,fp16,bf16-true --plot demo.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn

PIPELINES = (
    "fp32",
    "bf16",
    "fp16",
    "fp16-syncfree",
    "apex-O0",
    "apex-O1",
    "apex-O2",
    "apex-O3",
    "bf16-true",
    "16-true",
    "bf16-true+master",
    "bf16-true+sr",
)
_XLA_PIPELINES = (
    "fp32",
    "bf16",
    "bf16-true",
    "16-true",
    "bf16-true+master",
    "bf16-true+sr",
)
_DEFAULT = "fp32,bf16,fp16,bf16-true,bf16-true+sr"
_XLA_DEFAULT = "fp32,bf16,bf16-true"


def load_digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Standardized digits, split 1,500 train / 297 test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit(
            f"ampfn.demo needs scikit-learn's bundled digits data set ({e}): pip install -e '.[demo]'"
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
    if name == "bf16-true" and device.type == "xla":
        return ampfn.with_xla_bf16(mode="true", model=model)
    if "-true" in name:
        policy, _, remedy = name.partition("+")
        return ampfn.with_policy(
            policy,
            model,
            opt,
            master_weights=remedy == "master",
            stochastic_rounding=remedy == "sr",
        )
    if device.type == "xla":
        return ampfn.with_xla_bf16() if name == "bf16" else ampfn.compose()
    if name == "fp32":
        return ampfn.compose()
    if name == "bf16":
        return ampfn.with_autocast("bf16", device.type)
    if name in ("fp16", "fp16-syncfree"):
        # growth every 100 steps (PyTorch's default is 2000), so that the scale's growth
        # and back-off show within a demo's few hundred steps
        scaler = torch.amp.GradScaler(device.type, growth_interval=100)
        return ampfn.compose(
            ampfn.with_grad_scaling(scaler, sync=name == "fp16"),
            ampfn.with_autocast("fp16", device.type),
        )
    return ampfn.with_apex(name.removeprefix("apex-"), model, opt)


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

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x).float(), y)
        ampfn.backward(loss)
        ampfn.clip_grad_norm_(model.parameters(), 5.0, opt)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

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


def _against_fp32(rows: list[dict[str, str]]) -> None:
    """Fill "vs fp32": the test accuracy's distance from the fp32 run, in points."""
    fp32 = next((r for r in rows if r["pipeline"] == "fp32"), None)
    for r in rows:
        if fp32 is None or r is fp32:
            r["vs fp32"] = "-"
        else:
            r["vs fp32"] = (
                f"{100 * (float(r['test acc']) - float(fp32['test acc'])):+.1f} pt"
            )


# --------------------------------------------------------------------------- the figure

FIGURE_INCHES, FIGURE_DPI = (13.0, 4.0), 100  # a 1300 x 400 pixel PNG


def plot(history: dict[str, Any], path: str, title: str) -> None:
    """Training loss, loss-scale history (log axis) with skipped steps marked, test
    accuracy per pipeline: one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            f"ampfn.demo --plot needs matplotlib ({e}): pip install -e '.[demo]'"
        ) from e
    fig, (ax_loss, ax_scale, ax_acc) = plt.subplots(
        1,
        3,
        figsize=FIGURE_INCHES,
        dpi=FIGURE_DPI,
        gridspec_kw={"width_ratios": [2.2, 1.6, 1.2]},
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, h) in enumerate(history.items()):
        color = colors[i % len(colors)]
        loss = h["loss"]
        window = max(1, len(loss) // 40)
        smooth = [
            sum(loss[max(0, j - window + 1) : j + 1])
            / len(loss[max(0, j - window + 1) : j + 1])
            for j in range(len(loss))
        ]
        ax_loss.plot(smooth, label=name, color=color, lw=1.4)
        if h["skipped"]:
            ax_loss.plot(
                h["skipped"], [smooth[s] for s in h["skipped"]], "x", color=color, ms=6
            )
        if any(s is not None for s in h["loss_scale"]):
            ax_scale.plot(
                h["loss_scale"], label=name, color=color, lw=1.4, drawstyle="steps-post"
            )
            if h["skipped"]:
                ax_scale.plot(
                    h["skipped"],
                    [h["loss_scale"][s] for s in h["skipped"]],
                    "x",
                    color=color,
                    ms=7,
                )
        ax_acc.bar(i, 100 * h["test_acc"], color=color)
    ax_loss.set(
        title="training loss (moving average; x: skipped step)",
        xlabel="step",
        ylabel="cross-entropy",
        yscale="log",
    )
    ax_loss.legend(fontsize=8)
    ax_scale.set(title="loss scale (x: skipped step)", xlabel="step", yscale="log")
    if not ax_scale.lines:
        ax_scale.text(
            0.5,
            0.5,
            "no pipeline here scales the loss",
            ha="center",
            transform=ax_scale.transAxes,
        )
    else:
        ax_scale.legend(fontsize=8)
    names = list(history)
    accs = [100 * history[n]["test_acc"] for n in names]
    ax_acc.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    low = math.floor(min(accs)) - 2
    ax_acc.set(title="test accuracy (%)", ylim=(max(0, low), 100))
    for i, a in enumerate(accs):
        ax_acc.text(i, a + 0.2, f"{a:.1f}", ha="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


# --------------------------------------------------------------------------- the command line


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


if __name__ == "__main__":
    raise SystemExit(main())
