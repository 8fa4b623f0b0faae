"""A GPT-style decoder on synthetic tokens: ampfn against the identical hand-written loop.

For each precision (fp32, bf16 autocast, fp16 autocast + loss scaling with a syncing
and a sync-free scaler), eager and compiled, the ampfn step and the hand-written step
train their own copy of the same model, alternating in rounds. It reports tokens/s
(median over rounds), peak memory, the speed-up over fp32, and ampfn / by hand.
``--config 100m`` is GPT-2 small (12 layers, 768 wide, 124M parameters with a 50257
vocabulary; 32768 here: 110M); ``--config tiny`` runs on a CPU in seconds (the test
suite's smoke test). Fused AdamW on CUDA, foreach AdamW elsewhere.

    python benchmarks/gpt.py --config 100m [--compile] [--cudagraphs] [--budget 420]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    seq: int
    width: int
    layers: int
    heads: int
    batch: int


CONFIGS = {
    "100m": Config(vocab=32768, seq=512, width=768, layers=12, heads=12, batch=16),
    "tiny": Config(vocab=256, seq=32, width=64, layers=2, heads=4, batch=4),
}


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.up = nn.Linear(c.width, 4 * c.width)
        self.down = nn.Linear(4 * c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        q, k, v = (
            z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Embedding(c.seq, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # type: ignore[no-any-return]


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), batch[1].reshape(-1)
    )


# --------------------------------------------------------------------------- the two steps

PRECISIONS = ("fp32", "bf16", "fp16", "fp16 sync-free")
FP8 = ("fp8 tensorwise", "fp8 rowwise")  # with --precisions; needs torchao


def optimizer(model: nn.Module, device: str, precision: str) -> torch.optim.Optimizer:
    """Fused AdamW on CUDA, except for fp16 with a syncing scaler: GradScaler.step reads the
    overflow flag back for a non-fused optimizer, and ampfn (which returns a bool) must do
    the same for a fused one, where hand-written code need not: foreach AdamW for both."""
    if device == "cuda" and precision != "fp16":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def ampfn_step(
    model: nn.Module, opt: torch.optim.Optimizer, precision: str, device: str
) -> Callable[[Batch], Any]:
    def train_step(batch: Batch) -> Any:
        ampfn.backward(loss_of(model, batch))
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    if precision.startswith("fp8"):  # bf16 everywhere but the fp8 matmuls
        recipe = precision.split()[1]
        emulate = device != "cuda"
        return ampfn.compose(  # type: ignore[no-any-return]
            ampfn.with_autocast("bf16", device),
            ampfn.with_float8(model, recipe=recipe, emulate=emulate),
        )(train_step)
    pipelines: dict[str, Callable[[Any], Any]] = {
        "fp32": ampfn.compose(),
        "bf16": ampfn.with_autocast("bf16", device),
        "fp16": ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler(device)),
            ampfn.with_autocast("fp16", device),
        ),
        "fp16 sync-free": ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler(device), sync=False),
            ampfn.with_autocast("fp16", device),
        ),
    }
    return pipelines[precision](train_step)  # type: ignore[no-any-return]


def hand_step(
    model: nn.Module, opt: torch.optim.Optimizer, precision: str, device: str
) -> Callable[[Batch], Any]:
    scaler = torch.amp.GradScaler(device)
    dtype = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp16 sync-free": torch.float16,
    }.get(precision)
    if precision.startswith("fp8"):  # torchao's own recipe, by hand
        import dataclasses

        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(precision.split()[1])
        config = dataclasses.replace(config, emulate=device != "cuda")
        convert_to_float8_training(
            model,
            config=config,
            module_filter_fn=lambda m, fqn: (
                m.in_features % 16 == 0 and m.out_features % 16 == 0
            ),
        )
        dtype = torch.bfloat16

    def train_step(batch: Batch) -> Any:
        with torch.autocast(
            device, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            loss = loss_of(model, batch)
        if precision.startswith("fp16"):
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


# --------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(step: Callable[[Batch], Any], data: list[Batch], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for b in data:
        step(b)
    sync(device)
    return time.perf_counter() - start


def measure(
    precision: str, cfg: Config, args: argparse.Namespace, mode: str
) -> dict[str, Any]:
    device = args.device
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    steps: dict[str, Callable[[Batch], Any]] = {}
    for label, make in (("ampfn", ampfn_step), ("by hand", hand_step)):
        model = copy.deepcopy(base)
        step = make(model, optimizer(model, device, precision), precision, device)
        if mode != "eager":
            step = torch.compile(
                step, mode="reduce-overhead" if mode == "cudagraphs" else None
            )
        steps[label] = step
    del base
    g = torch.Generator().manual_seed(1)
    data: list[Batch] = []
    for _ in range(args.steps):
        seq = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
        seq = seq.to(device)
        data.append((seq[:, :-1], seq[:, 1:]))  # next-token targets
    out: dict[str, Any] = {"precision": precision, "mode": mode}
    for label, step in steps.items():
        start = time.perf_counter()
        run_steps(step, data[: args.warmup], device)  # compiles here when compiled
        out[f"{label} warm-up s"] = time.perf_counter() - start
    times: dict[str, list[float]] = {label: [] for label in steps}
    peak: dict[str, int] = {}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for label in order:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[label].append(run_steps(steps[label], data, device))
            if device == "cuda":
                peak[label] = max(peak.get(label, 0), torch.cuda.max_memory_allocated())
    tokens = cfg.batch * cfg.seq * len(data)
    for label in steps:
        out[f"{label} tok/s"] = tokens / statistics.median(times[label])
        out[f"{label} peak GiB"] = peak.get(label, 0) / 2**30
    out["ampfn / by hand"] = out["ampfn tok/s"] / out["by hand tok/s"]
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="100m")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument(
        "--modes", default="eager", help="comma-separated: eager, compiled, cudagraphs"
    )
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--budget",
        type=float,
        default=math.inf,
        help="stop starting variants after this many seconds",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    print(
        f"GPT {args.config}: {n_params / 1e6:.0f}M parameters, {cfg.batch}x{cfg.seq} tokens/step, "
        f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), torch {torch.__version__}"
    )
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        for precision in args.precisions.split(","):
            if mode == "cudagraphs" and precision != "fp16 sync-free":
                continue  # CUDA graphs need a step that never synchronizes
            if time.perf_counter() - start > args.budget:
                print(f"budget spent: skipping {precision} {mode}")
                continue
            r = measure(precision, cfg, args, mode)
            results.append(r)
            base = next(
                (
                    x
                    for name in ("fp32", "bf16")
                    for x in results
                    if x["precision"] == name and x["mode"] == mode and x is not r
                ),
                None,
            )
            speedup = (
                ""
                if base is None
                else (
                    f"  vs {base['precision']}: ampfn {r['ampfn tok/s'] / base['ampfn tok/s']:.2f}x, "
                    f"by hand {r['by hand tok/s'] / base['by hand tok/s']:.2f}x"
                )
            )
            print(
                f"{precision:>15} {mode:>10}: ampfn {r['ampfn tok/s']:>10.0f} tok/s ({r['ampfn peak GiB']:.2f} GiB), "
                f"by hand {r['by hand tok/s']:>10.0f} tok/s ({r['by hand peak GiB']:.2f} GiB), "
                f"ratio {r['ampfn / by hand']:.3f}{speedup}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
