"""Layer 5, transform: ``with_policy``, training under a precision policy.

Mixed policies are autocast (with loss scaling for fp16); true policies cast the model
once, keeping norm layers fp32 where asked, with fp32 master weights or stochastic
rounding as remedies for the updates low-precision weights lose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ampfn._args import is_optimizer
from ampfn._autocast_region import autocast_fragment, check_autocast
from ampfn._casting import (
    cast_module,
    castable_parameters,
    check_keep_fp32,
    compute_in_fp32,
    is_norm,
    keep_rule,
    patch_forward,
)
from ampfn._grad_scaling import with_grad_scaling
from ampfn._masters import MasterWeights
from ampfn._policy import Policy, get_policy, warn_fp16_eps
from ampfn._rounding import StochasticRounding
from ampfn._runtime import default_device_type
from ampfn._transform import BOUND, Parts, Transform, compose, factory, precision_tags
from ampfn._types import Fragment, Stateful
from ampfn._undo import Snapshot


def _check_eps(
    optimizer: Any, policy: Policy, master_weights: bool, shown: str
) -> None:
    """16-true with an Adam-family eps that fp16 rounds to zero divides by ~0 (NaNs)."""
    if policy.param_dtype != torch.float16 or master_weights or optimizer is None:
        return
    # the user's with_policy call, through ampfn's factory
    warn_fp16_eps(
        optimizer,
        f"with_policy({shown})",
        "master_weights=True (the optimizer then works in fp32)",
        stacklevel=4,
    )


def _check_args(
    policy: Policy,
    shown: str,
    model: Any,
    optimizer: Any,
    master_weights: object,
    stochastic_rounding: object,
    keep: object,
) -> None:
    api = "with_policy(policy, model, optimizer)"
    for name, value in (
        ("master_weights", master_weights),
        ("stochastic_rounding", stochastic_rounding),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{api}: {name} must be a bool, got {type(value).__name__}")
    if keep is not None and not isinstance(keep, bool):
        raise TypeError(
            f"{api}: keep_norm_fp32 must be a bool or None, got {type(keep).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"{api}: model must be an nn.Module, got {type(model).__name__}"
        )
    if optimizer is not None and not is_optimizer(optimizer):
        raise TypeError(
            f"{api}: optimizer must be the model's torch.optim.Optimizer (one, built on "
            "model.parameters()), got "
            f"{type(optimizer).__name__} {optimizer!r}"[:300]
        )
    if master_weights and stochastic_rounding:
        raise ValueError(
            f"{api}: master_weights and stochastic_rounding both keep small updates; choose one "
            "(masters cost an fp32 copy of the weights, rounding costs random bits per step)"
        )
    if stochastic_rounding and not (
        policy.is_true and policy.param_dtype == torch.bfloat16
    ):
        raise ValueError(
            f"{api}: stochastic_rounding rounds into bfloat16 weights, and {shown} keeps {policy.param_dtype}; "
            "use 'bf16-true'"
        )
    if (master_weights or stochastic_rounding) and not policy.is_true:
        raise ValueError(
            f"{api}: master_weights and stochastic_rounding are for true policies, whose weights "
            f"are low precision; {shown} is mixed (its weights stay float32); drop the remedy, or "
            "use a true policy ('bf16-true', '16-true')"
        )
    if (master_weights or stochastic_rounding) and (optimizer is None or model is None):
        raise ValueError(
            f"{api}: master_weights and stochastic_rounding need the model and its optimizer"
        )
    if policy.is_true and policy.param_dtype != torch.float32 and model is None:
        raise ValueError(
            f"{api}: {shown} casts the model to {policy.param_dtype} once, so it needs it: "
            "with_policy(policy, model, optimizer)"
        )


def _seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def _mixed(policy: Policy, model: Any) -> Any:
    first = next(model.parameters(), None) if model is not None else None
    device = first.device.type if first is not None else default_device_type()
    dtype = policy.compute_dtype
    check_autocast(device, dtype, "with_policy(policy)")
    autocast = Transform(
        "with_policy",
        fragment=autocast_fragment("with_policy", device, dtype, None),
        tags=precision_tags(dtype),
    )
    if dtype == torch.float16:  # as with_apex O1: fp16 autocast needs loss scaling
        return compose(with_grad_scaling(torch.amp.GradScaler(device)), autocast)
    return autocast


@factory()
def with_policy(
    policy: Any,
    model: nn.Module | None = None,
    optimizer: Any = None,
    *,
    master_weights: bool = False,
    stochastic_rounding: bool = False,
    keep_norm_fp32: bool | None = None,
    keep_fp32: tuple[type[nn.Module], ...] = (),
) -> Any:
    """Train under a precision policy: Lightning's ``precision=`` values, jmp's strings.

    **Mixed** policies ("bf16-mixed", "16-mixed") become :func:`with_autocast` in the
    compute dtype on the model's device type; for fp16 they add
    ``with_grad_scaling()``, as ``with_apex("O1")`` does. ``model`` is only used for
    its device type.

    **True** policies ("bf16-true", "16-true", "64-true") cast the model once, here:
    parameters and buffers go to the param dtype (norm layers stay fp32 with
    ``keep_norm_fp32``, computing in fp32 between half layers; ``fp32`` islands stay as
    they are); ``model.forward`` casts floating inputs to the compute dtype and outputs
    to the output dtype. You keep your own model and optimizer objects;
    ``model.state_dict()`` stays in the param dtype, as you chose. "32-true" does
    nothing. Compose with ``with_grad_scaling()`` for "16-true" (with master weights,
    whose fp32 gradients GradScaler can unscale).

    Low-precision weights lose small updates (any update below half an ulp of the
    weight: bf16 has 8 bits of mantissa). Two remedies, for true policies:

    - ``master_weights=True``: the optimizer holds fp32 masters (``with_apex`` O2's
      mechanism): gradients accumulate in fp32, the step updates the masters, which are
      copied into the model after each real step. Memory: an fp32 copy of the weights
      (plus fp32 gradients during the step); the optimizer's state is fp32. Time: per
      step, each gradient is copied into its fp32 master's gradient, and after a real step
      each master is copied (cast) into its model weight: two elementwise passes over the
      weights, on top of an optimizer step in fp32.
    - ``stochastic_rounding=True`` (bf16 weights): the optimizer computes each step in
      fp32 from the bf16 weights, and the result is rounded up or down at random so that
      the expected weight is the fp32 one. No fp32 copy is kept: only a transient one
      during the step; the optimizer's state is fp32. Time: random bits for every weight
      per step. Reproducible under ``torch.manual_seed``; its generator is in
      ``ampfn.state_dict``.

    Args:
        policy: a name, a jmp string or a :class:`Policy` (see :func:`get_policy`).
        model: the model (true policies need it; mixed ones use it for the device type).
        optimizer: the model's optimizer (master weights and stochastic rounding need it;
            with "16-true" it is checked for an Adam eps that fp16 flushes to zero).
        master_weights, stochastic_rounding: see above; not both.
        keep_norm_fp32: keep norm layers (batch, instance, layer, group, RMS; torch's
            classes and any leaf module whose class name ends in ``Norm``, such as
            ``LlamaRMSNorm``: see ``is_norm`` in ``_casting``) in fp32; None: for fp16
            params (as Apex O2), not for bf16 or fp64.
        keep_fp32: more module classes kept fp32 (computing in fp32) whatever
            ``keep_norm_fp32`` says. Non-persistent floating buffers (Llama's rotary
            ``inv_freq``) always stay fp32.

    Returns:
        A transform (stateful with master weights or stochastic rounding). If the first
        pipeline it joins is refused (fp16 weights without masters under
        ``with_grad_scaling``), the model and optimizer are put back as they were.

    Raises:
        ValueError: a bad policy, a true half or fp64 policy without ``model``, both
            remedies, stochastic rounding of anything but bf16 weights, a remedy without
            the model and optimizer.
        TypeError: arguments of the wrong type (an ``optimizer`` that is not one).

    Warns:
        UserWarning: "16-true" with an Adam-family ``eps`` that fp16 flushes to zero.

    Example:
        >>> import torch, ampfn
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> step = ampfn.with_policy("bf16-true", model, opt, master_weights=True)(lambda x: model(x))
        >>> model.weight.dtype, step(torch.randn(3, 4)).dtype
        (torch.bfloat16, torch.float32)
    """
    shown = repr(policy) if isinstance(policy, (str, int)) else str(policy)
    policy = get_policy(policy)
    _check_args(
        policy,
        shown,
        model,
        optimizer,
        master_weights,
        stochastic_rounding,
        keep_norm_fp32,
    )
    extra = check_keep_fp32("with_policy(policy, model, optimizer)", keep_fp32)
    if policy.is_mixed:
        return _mixed(policy, model)
    param = policy.param_dtype
    _check_eps(optimizer, policy, master_weights, shown)
    if model is None:  # 32-true: nothing to do
        return Transform(
            "with_policy",
            fragment=Fragment("with_policy"),
            tags=precision_tags(param),
        )
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(
                f"with_policy(policy, model): parameter {name!r} is {p.dtype}; pass the model in "
                "float32, with_policy casts it"
            )
    keep = (param == torch.float16) if keep_norm_fp32 is None else keep_norm_fp32
    keep_fn = keep_rule(is_norm if keep else None, extra)
    parts: dict[str, Stateful] = {}
    masters = rounding = None
    before = Snapshot([model], [optimizer] if optimizer is not None else [])
    if master_weights:
        masters = MasterWeights(
            "with_policy", castable_parameters(model, keep=keep_fn), [optimizer]
        )
        parts["master_weights"] = masters
    if stochastic_rounding:
        rounding = StochasticRounding(_seed(), optimizer)
        parts["stochastic_rounding"] = rounding
    if param != torch.float32:
        cast_module(model, param, keep=keep_fn)
        if keep_fn is not None:
            compute_in_fp32(model, keep_fn)
        patch_forward(model, policy.compute_dtype, policy.output_dtype)
    tags = [*precision_tags(policy.compute_dtype), BOUND]
    if param == torch.float16 and not master_weights:
        tags.append("fp16_grads")
    return Transform(
        "with_policy",
        fragment=Fragment("with_policy", masters=masters, rounding=rounding),
        tags=tags,
        state=Parts(**parts) if parts else None,
        undo=before.restore,
    )
