"""Lightning's precision-plugin tests, ported to ``with_policy`` on the CPU.

Upstream: Lightning-AI/pytorch-lightning ``tests/tests_pytorch/plugins/precision/``.

| upstream test | here |
|---|---|
| ``test_amp.py::test_amp_with_no_grad``, ``test_amp_with_inference_mode`` | ``test_a_no_grad_forward_before_the_training_forward`` |
| ``test_amp.py::test_amp_forward_context_keeps_cache_enabled`` | the same test |
| ``test_half.py::test_convert_module``, ``test_selected_dtype`` | ``test_true_policies_convert_the_module_and_its_inputs`` |
| ``test_half.py::test_forward_context`` | ``test_true_policies_leave_the_default_dtype_alone`` |

Not ported: ``test_amp.py::test_clip_gradients`` and
``test_optimizer_amp_scaling_support_in_step_method`` test Lightning's plugin methods
(ampfn clips a fused optimizer's gradients under a scaler, which Lightning refuses: the
README's differences, tests/test_scaling.py); ``test_amp_autocast_context_manager_disables_cache``,
``test_amp_forward_context_restores_grad_mode_context_managers`` and
``test_half.py::test_module_init_context`` test Lightning's own context managers, which
ampfn has no counterpart for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import ampfn

# torch 2.9 (the xla session): behaviours below that only torch 2.13 has
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)


@pytest.mark.xfail(
    OLD_TORCH,
    strict=True,
    reason="torch < 2.13: a cast that autocast cached under no_grad is reused by the "
    "training forward without a grad_fn (ampfn does not work around it there)",
)
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
def test_a_no_grad_forward_before_the_training_forward(
    policy: str, grad_off: Callable[[], Any]
) -> None:
    """``test_amp_with_no_grad`` / ``test_amp_with_inference_mode``: a forward under
    ``torch.no_grad`` (or ``inference_mode``) inside the step, then the training forward:
    autocast's cast cache (kept enabled, as Lightning's ``forward_context`` keeps it)
    must not hand the training forward a weight cast without autograd history. The
    gradients equal those of the same step without the first forward, bit for bit."""
    torch.manual_seed(0)
    layer = nn.Linear(2, 1)
    twin = copy.deepcopy(layer)
    x = torch.randn(1, 2)
    cache: list[bool] = []

    def make(model: nn.Module, first: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        @ampfn.with_policy(policy, model)
        def step(t: torch.Tensor) -> torch.Tensor:
            cache.append(torch.is_autocast_cache_enabled())
            if first:
                with grad_off():
                    model(t)
            loss = model(t).float().mean()
            assert loss.grad_fn is not None
            ampfn.backward(loss)
            ampfn.unscale_(opt)  # the true gradients, compared below
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
            ampfn.step(opt)
            return grads

        return step

    assert torch.equal(make(layer, True)(x), make(twin, False)(x))
    assert cache == [True, True]


@pytest.mark.parametrize(
    ("policy", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)]
)
def test_true_policies_convert_the_module_and_its_inputs(
    policy: str, dtype: torch.dtype
) -> None:
    """``test_convert_module``: the module's weight and bias are converted; and
    ``test_selected_dtype``'s ``_desired_input_dtype``: its floating inputs arrive in
    that dtype. Lightning converts the step's inputs; ampfn converts them where the
    model's ``forward`` receives them, and the output comes back as fp32."""
    linear = nn.Linear(2, 2)
    module = nn.Sequential(linear)
    assert linear.weight.dtype == linear.bias.dtype == torch.float32
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    seen: list[torch.dtype] = []  # what the layer receives, inside the model's forward
    linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    step = ampfn.with_policy(policy, module, opt)(lambda t: module(t))
    assert linear.weight.dtype == linear.bias.dtype == dtype
    out = step(torch.randn(3, 2))
    assert seen == [dtype]
    assert out.dtype == torch.float32


@pytest.mark.parametrize("policy", ["bf16-true", "16-true"])
def test_true_policies_leave_the_default_dtype_alone(policy: str) -> None:
    """``test_forward_context``: Lightning's ``HalfPrecision`` sets the default dtype to
    the half dtype during the forward, so tensors a forward creates are half. ampfn's
    true policies do not: the step runs with the default dtype it was called with (a
    difference the README lists), and the default is the same after the call."""
    module = nn.Linear(2, 2)
    made: list[torch.dtype] = []

    @ampfn.with_policy(policy, module)
    def step(t: torch.Tensor) -> torch.Tensor:
        made.append(torch.zeros(1).dtype)
        return module(t)

    assert torch.get_default_dtype() == torch.float32
    step(torch.randn(1, 2))
    assert made == [torch.float32]
    assert torch.get_default_dtype() == torch.float32
