"""Fine-tune a Hugging Face causal LM with a hand-written loop and ampfn.

The model is built from a config with random weights, so this runs offline. To
fine-tune pretrained weights instead, replace ``AutoModelForCausalLM.from_config(config)``
with ``AutoModelForCausalLM.from_pretrained("gpt2")`` (or any causal LM on the Hub, e.g.
"meta-llama/Llama-3.2-1B"; it downloads once), and feed it tokenized text
(``AutoTokenizer.from_pretrained(...)``) instead of random tokens.

``--precision`` picks the pipeline; the loop is the same for all of them:

- "bf16-mixed", "16-mixed": autocast (fp16 with loss scaling), fp32 weights;
- "bf16-true": bf16 weights with fp32 master weights in the optimizer;
- "O2": Apex's O2 (fp16 weights, fp32 masters, loss scaling);
- "32-true": plain fp32.

Outputs keep their type under every pipeline: ``out.loss`` works on the
``CausalLMOutput`` a cast model returns, and so does ``model.generate``.

    python examples/huggingface.py --model gpt2 --precision bf16-mixed --steps 20
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import ampfn

CONFIGS = {
    "gpt2": lambda a: GPT2Config(
        vocab_size=a.vocab,
        n_positions=a.seq,
        n_embd=a.width,
        n_layer=a.layers,
        n_head=4,
    ),
    "llama": lambda a: LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.width,
        intermediate_size=4 * a.width,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        max_position_embeddings=a.seq,
    ),
}


def pipeline(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
    if name == "O2":
        return ampfn.with_apex("O2", model, opt, backend="native")
    if name == "bf16-true":
        return ampfn.with_policy("bf16-true", model, opt, master_weights=True)
    return ampfn.with_policy(name, model)  # the mixed policies, 32-true


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(CONFIGS), default="gpt2")
    p.add_argument(
        "--precision",
        choices=["bf16-mixed", "16-mixed", "bf16-true", "O2", "32-true"],
        default="bf16-mixed",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    torch.manual_seed(0)
    config = CONFIGS[args.model](args)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    @pipeline(args.precision, model, opt)
    def train_step(micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for ids in micro_batches:
            out = model(input_ids=ids, labels=ids)  # HF shifts the labels itself
            ampfn.backward(out.loss / len(micro_batches))
            total += out.loss.detach().float() / len(micro_batches)
        ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)  # unscales first
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return total

    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(
            0, args.vocab, (args.accum, args.batch, args.seq), generator=g
        )
        losses.append(float(train_step(list(ids.to(device)))))
    model.eval()
    prompt = torch.randint(0, args.vocab, (1, 4), generator=g).to(device)
    sample = model.generate(prompt, max_new_tokens=4, do_sample=False)
    print(
        f"{args.model} {args.precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"generated {sample.tolist()}"
    )
    return {"losses": losses, "sample": sample}


if __name__ == "__main__":
    main()
