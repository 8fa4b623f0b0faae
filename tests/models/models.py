"""The real models of the suite, tiny and randomly initialised (nothing is downloaded):
Hugging Face's GPT-2 and Llama from configs, and the nanoGPT-style GPT of
examples/nanogpt.py. Each comes with its loss, as its own training code computes it."""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB, SEQ, WIDTH, LAYERS, HEADS = 64, 16, 32, 2, 2


@functools.cache
def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def nanogpt() -> nn.Module:
    ex = load_example("nanogpt")
    config = ex.GPTConfig(
        block_size=SEQ, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH
    )
    return ex.GPT(config)  # type: ignore[no-any-return]


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch[0], labels=batch[1]).loss  # type: ignore[no-any-return]


def nanogpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    _, loss = model(batch[0][:, :-1], batch[1][:, 1:])  # next-token targets
    return loss  # type: ignore[no-any-return]


MODELS: dict[str, tuple[Callable[[], nn.Module], LossFn]] = {
    "nanogpt": (nanogpt, nanogpt_loss),
    "gpt2": (gpt2, hf_loss),
    "llama": (llama, hf_loss),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, LossFn]:
    make, loss = MODELS[name]
    torch.manual_seed(seed)
    return make(), loss


def data(n: int, seed: int = 1, batch: int = 2) -> list[Batch]:
    """Random token sequences; HF models shift the labels themselves, nanoGPT does not."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        out.append((seq, seq))
    return out


def finite(values: list[Any]) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
