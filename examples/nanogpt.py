"""nanoGPT-style training with ampfn: accumulation, clipping, a cosine schedule, resume.

A GPT with nanoGPT's architecture (its own LayerNorm with an optional bias, a fused
q/k/v projection, tied embeddings), written for this project, trained on random tokens
by nanoGPT's loop: ``--accum`` micro-batches per step, gradients clipped to
``--clip``, a warm-up then cosine learning-rate schedule that advances only on real
steps (when ``ampfn.step`` returned True: a step fp16 loss scaling skipped does not
count), and a checkpoint of model, optimizer, ampfn's state (the loss scale) and the
schedule that ``--resume`` continues from.

    python examples/nanogpt.py --dtype fp16 --iters 50 --out /tmp/ckpt.pt
    python examples/nanogpt.py --dtype fp16 --iters 80 --out /tmp/ckpt.pt --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn


@dataclasses.dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and layer norms, as GPT-2


class LayerNorm(nn.Module):
    """Layer norm with an optional bias (``nn.LayerNorm`` has both or neither)."""

    def __init__(self, n: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)  # q, k, v at once
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, w // self.n_head).transpose(1, 2)
            for z in self.c_attn(x).split(w, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, w)
        return self.resid_dropout(self.c_proj(y))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(c.n_embd, c.bias), LayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias),
            nn.GELU(),
            nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias),
            nn.Dropout(c.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class GPT(nn.Module):
    """``model(idx, targets)`` returns ``(logits, loss)``, the loss None without targets."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init; residual projections scaled by depth
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                std = 0.02 / math.sqrt(2 * c.n_layer) if residual else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def cosine_lr(it: int, lr: float, warmup: int, decay: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to ``min_lr``, then flat."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / max(1, decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=100, help="train until this iteration")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="nanogpt_ckpt.pt", help="checkpoint path")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig(
        block_size=args.seq,
        n_layer=args.layers,
        n_head=4,
        n_embd=args.width,
    )
    model = GPT(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    # fp16 needs loss scaling; bf16 and fp32 do not. Everything else is the same loop.
    transforms = []
    if args.dtype == "fp16":
        transforms.append(ampfn.with_grad_scaling())
    if args.dtype != "fp32":
        transforms.append(
            ampfn.with_autocast(args.dtype, torch.device(args.device).type)
        )

    @ampfn.compose(*transforms)
    def train_step(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        total = torch.zeros((), device=args.device)
        for x, y in micro_batches:
            _, loss = model(x, y)
            assert loss is not None
            loss = loss / len(micro_batches)
            ampfn.backward(loss)
            total += loss.detach()
        # replaces scaler.unscale_(opt) + torch.nn.utils.clip_grad_norm_(...)
        ampfn.clip_grad_norm_(model.parameters(), args.clip, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return total, stepped

    step = torch.compile(train_step) if args.compile else train_step
    it, real_steps, losses, lr = 0, 0, [], args.lr
    if args.resume and os.path.exists(args.out):
        ckpt = torch.load(args.out, map_location=args.device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ampfn.load_state_dict(train_step, ckpt["ampfn"])  # the loss scale, its tracker
        it, real_steps, losses = ckpt["iter"], ckpt["real_steps"], ckpt["losses"]

    g = torch.Generator().manual_seed(1)
    decay = max(args.iters, args.warmup + 1)
    while it < args.iters:
        g.manual_seed(1 + it)  # the data of iteration `it`, resumed or not
        seq = torch.randint(
            0, config.vocab_size, (args.accum, args.batch, args.seq + 1), generator=g
        ).to(args.device)
        lr = cosine_lr(real_steps, args.lr, args.warmup, decay, args.lr / 10)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, stepped = step([(s[:, :-1], s[:, 1:]) for s in seq])
        if stepped:  # a skipped fp16 step does not advance the schedule
            real_steps += 1
        losses.append(float(loss))
        it += 1
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "ampfn": ampfn.state_dict(train_step),
            "iter": it,
            "real_steps": real_steps,
            "losses": losses,
        },
        args.out,
    )
    print(f"iter {it}: loss {losses[-1]:.4f}, {real_steps} real steps, lr {lr:.2e}")
    return {"losses": losses, "real_steps": real_steps, "iter": it, "model": model}


if __name__ == "__main__":
    main()
