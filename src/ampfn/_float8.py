"""Layer 5, transform: ``with_float8``, fp8 matmuls in training, through torchao's float8 conversion.

torchao's ``convert_to_float8_training`` swaps a model's ``nn.Linear`` layers for
``Float8Linear``, whose forward and backward matmuls run in fp8 (e4m3 operands, e5m2
gradients, dynamic scales), with everything else (weights, optimizer, other layers) in
the precision it was. torchao is an optional extra, imported when the transform is built.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ampfn._islands import is_fp32_island
from ampfn._transform import BOUND, Transform, compute_tag, factory
from ampfn._types import Fragment

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_API = "with_float8(model, *, recipe, module_filter, emulate)"
_LOG = logging.getLogger("ampfn")
_MULTIPLE = 16  # fp8 matmuls need both dimensions divisible by 16


def _import_torchao() -> ModuleType:
    """``torchao.float8``, with torchao's import-time log lines kept quiet."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise ImportError(
            f"{_API}: torchao is not installed ({e}); install the fp8 extra: pip install -e '.[fp8]' "
            "(torchao 0.18 needs torch 2.11 or newer)"
        ) from e
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return float8  # type: ignore[no-any-return]


@functools.cache
def _real_fp8(device: torch.device) -> str | None:
    """None where ``torch._scaled_mm`` runs fp8 on ``device``, else why not."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"CUDA compute capability {major}.{minor} has no fp8 matmul (8.9 or newer does)"
        return None
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except Exception as e:  # the build or the device has no kernel
        return f"torch._scaled_mm does not run on {device.type} here ({str(e).splitlines()[0]})"
    return None


def _eligible(
    module_filter: Callable[[nn.Module, str], bool] | None,
) -> Callable[[nn.Module, str], bool]:
    def keep(module: nn.Module, fqn: str) -> bool:
        if type(module) is not nn.Linear:  # not an already converted Float8Linear
            return False
        if module.in_features % _MULTIPLE or module.out_features % _MULTIPLE:
            _LOG.debug(
                "with_float8: %r (%d -> %d) stays as it is: fp8 matmuls need both dimensions "
                "divisible by %d",
                fqn,
                module.in_features,
                module.out_features,
                _MULTIPLE,
            )
            return False
        return module_filter is None or bool(module_filter(module, fqn))

    return keep


def _islands(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_fp32_island(m)]


def _cpu_autocast_input(
    module: nn.Module, args: tuple[Any, ...]
) -> tuple[Any, ...] | None:
    """Float8Linear casts its input to the autocast dtype under CUDA autocast only: do the
    same under CPU autocast, so its backward sees matching dtypes (the rowwise_with_gw_hp
    recipe's high-precision weight-gradient matmul otherwise fails)."""
    x = args[0] if args else None
    if (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
    ):
        dtype = torch.get_autocast_dtype("cpu")
        if x.is_floating_point() and x.dtype != dtype:
            return (x.to(dtype), *args[1:])
    return None


@factory()
def with_float8(
    model: nn.Module,
    *,
    recipe: str = "tensorwise",
    module_filter: Callable[[nn.Module, str], bool] | None = None,
    emulate: bool | None = None,
    fsdp_float8_all_gather: bool = False,
) -> Transform:
    """Train ``model``'s linear layers with fp8 matmuls (torchao's float8 training).

    At construction the eligible ``nn.Linear`` layers are converted in place to torchao's
    ``Float8Linear``: their weights and your optimizer stay as they are, their matmuls
    (forward, input gradient, weight gradient) run in fp8 with dynamic scales. Layers
    whose dimensions are not divisible by 16 stay as they are (a debug message on the
    "ampfn" logger names them), and so do ``fp32`` islands.

    Compose it with ``with_autocast("bf16")`` or ``with_policy("bf16-true")`` to run the
    rest of the model in bf16 (the usual recipe), or with fp16 autocast and loss
    scaling. After each step that may have changed the weights it runs what torchao needs
    (``precompute_float8_dynamic_scale_for_fsdp`` with ``fsdp_float8_all_gather``).

    Args:
        model: the model whose linear layers to convert (not itself an ``nn.Linear``).
        recipe: torchao's recipe: "tensorwise" (one scale per tensor), "rowwise" (per
            row), or "rowwise_with_gw_hp" (per row; the weight gradient in high precision).
        module_filter: ``module_filter(module, fqn) -> bool`` picks the layers to convert
            (torchao's ``module_filter_fn`` order), among the eligible ones.
        emulate: None uses real fp8 matmuls where ``torch._scaled_mm`` runs them for the
            model's device (CUDA with compute capability 8.9 or newer; the CPU in recent
            torch), else raises; True emulates them in higher precision on any device.
        fsdp_float8_all_gather: FSDP2 all-gathers the weights in fp8 (tensorwise only);
            then the scales are precomputed after each step.

    Returns:
        A transform.

    Raises:
        ImportError: torchao is missing (install the ``fp8`` extra).
        ValueError: an unknown recipe, a model that is an ``nn.Linear`` or has no layer to
            convert, fp8 matmuls unavailable without ``emulate=True``, FSDP fp8 all-gather
            with a rowwise recipe.
        TypeError: arguments of the wrong type.

    Example:
        >>> import torch, ampfn
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> t = ampfn.with_float8(model, emulate=True)  # doctest: +SKIP
        >>> type(model[0]).__name__  # doctest: +SKIP
        'Float8Linear'
    """
    if recipe not in RECIPES:
        raise ValueError(
            f"{_API}: recipe must be one of {', '.join(map(repr, RECIPES))}, got {recipe!r}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{_API}: model must be an nn.Module, got {type(model).__name__}"
        )
    if isinstance(model, nn.Linear):
        raise ValueError(
            f"{_API}: the model is itself an nn.Linear, which cannot be converted in place; "
            "pass the module that holds it (wrap it in nn.Sequential)"
        )
    if module_filter is not None and not callable(module_filter):
        raise TypeError(
            f"{_API}: module_filter must be a function (module, fqn) -> bool"
        )
    for name, value in (
        ("emulate", emulate),
        ("fsdp_float8_all_gather", fsdp_float8_all_gather),
    ):
        if value is not None and not isinstance(value, bool):
            raise TypeError(
                f"{_API}: {name} must be a bool, got {type(value).__name__}"
            )
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError(
            f"{_API}: fsdp_float8_all_gather works with the tensorwise recipe only, got {recipe!r}"
        )
    float8 = _import_torchao()
    if any(isinstance(m, float8.float8_linear.Float8Linear) for m in model.modules()):
        raise ValueError(
            f"{_API}: the model was already converted by with_float8 (it holds Float8Linear "
            "layers); convert a model once, and reuse that transform"
        )
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if emulate is None:
        reason = _real_fp8(device)
        if reason is not None:
            raise ValueError(
                f"{_API}: {reason}; pass emulate=True to run torchao's emulation instead"
            )
        emulate = False
    config = dataclasses.replace(
        float8.Float8LinearConfig.from_recipe_name(recipe),
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_float8_all_gather,
    )
    islands = _islands(model)
    eligible = _eligible(module_filter)

    def keep(module: nn.Module, fqn: str) -> bool:
        if any(fqn == i or fqn.startswith(i + ".") for i in islands):
            return False
        return eligible(module, fqn)

    before = {id(m) for m in model.modules()}
    float8.convert_to_float8_training(model, module_filter_fn=keep, config=config)
    converted = [m for m in model.modules() if id(m) not in before]
    if not converted:
        raise ValueError(
            f"{_API}: the model has no nn.Linear layer to convert (fp8 matmuls need both "
            "dimensions divisible by 16; module_filter and fp32 islands exclude layers too)"
        )
    for m in converted:
        m.register_forward_pre_hook(_cpu_autocast_input)
    after_step = None
    if fsdp_float8_all_gather:

        def after_step(optimizer: Any) -> None:
            float8.precompute_float8_dynamic_scale_for_fsdp(model)

    return Transform(
        "with_float8",
        fragment=Fragment("with_float8", after_step=after_step),
        tags=("float8", compute_tag(torch.float8_e4m3fn), BOUND),
    )
