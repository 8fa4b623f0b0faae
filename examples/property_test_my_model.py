"""Property-test your own model's mixed-precision training with ampfn.testing.

Run: python examples/property_test_my_model.py   (or point pytest at it)
"""

import torch
from hypothesis import settings

import ampfn
from ampfn import testing


def make(seed):  # your model, optimizer and step, built fresh for each trial
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        loss = model(batch).float().pow(2).mean()
        ampfn.backward(loss)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def test_fp16_training_is_stable():
    fp16 = testing.TrialPipeline(
        "fp16",
        lambda model, opt: ampfn.compose(
            ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", "cpu")
        ),
    )
    quick = settings(max_examples=5, deadline=None)
    testing.check_never_nonfinite(
        make, fp16, testing.batches((16, 10), probe=torch.float16), settings=quick
    )
    testing.check_skips_nonfinite(make, fp16, testing.batches((16, 10)), settings=quick)
    testing.check_matches_reference(
        make, fp16, testing.batches((16, 10)), settings=quick
    )


if __name__ == "__main__":
    test_fp16_training_is_stable()
    print("fp16 training of this model: stable, skips non-finite steps, tracks fp32")
