"""The examples users copy run, with tiny settings: the Hugging Face fine-tuning loop
under each pipeline, and the nanoGPT loop with its checkpoint and resume."""

from __future__ import annotations

import math
import pathlib

import pytest

pytest.importorskip("transformers")

import torch

from models import load_example

TINY = [
    "--steps",
    "2",
    "--accum",
    "2",
    "--batch",
    "2",
    "--seq",
    "16",
    "--vocab",
    "64",
    "--width",
    "32",
]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true", "O2"])
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_huggingface_example_trains_and_generates(model: str, precision: str) -> None:
    result = load_example("huggingface").main(
        ["--model", model, "--precision", precision, *TINY]
    )
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["sample"].shape == (1, 8)


NANO = [
    "--accum",
    "2",
    "--batch",
    "2",
    "--layers",
    "2",
    "--width",
    "32",
    "--seq",
    "16",
    "--warmup",
    "2",
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_nanogpt_example_resumes_where_it_stopped(
    dtype: str, tmp_path: pathlib.Path
) -> None:
    ex = load_example("nanogpt")
    ckpt = str(tmp_path / "ckpt.pt")
    straight = ex.main(
        ["--dtype", dtype, "--iters", "4", "--out", str(tmp_path / "a.pt"), *NANO]
    )
    ex.main(["--dtype", dtype, "--iters", "2", "--out", ckpt, *NANO])
    resumed = ex.main(
        ["--dtype", dtype, "--iters", "4", "--out", ckpt, "--resume", *NANO]
    )
    assert resumed["iter"] == 4
    assert resumed["losses"] == straight["losses"]
    assert resumed["real_steps"] == straight["real_steps"]
    for p, q in zip(
        resumed["model"].parameters(), straight["model"].parameters(), strict=True
    ):
        assert torch.equal(p, q)
    names = [t["name"] for t in torch.load(ckpt)["ampfn"]["transforms"]]
    assert names == (["with_grad_scaling"] if dtype == "fp16" else [])


def test_nanogpt_schedule_warms_up_then_decays_to_min_lr() -> None:
    ex = load_example("nanogpt")
    lrs = [ex.cosine_lr(i, 1.0, 2, 10, 0.1) for i in range(12)]
    assert lrs[0] < lrs[1] < lrs[2]  # warm-up
    assert lrs[2] > lrs[6] > lrs[10]  # cosine decay
    assert lrs[11] == 0.1
