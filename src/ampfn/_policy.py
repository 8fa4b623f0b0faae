"""Layer 5, transforms: precision policies, ``Policy``, ``get_policy`` and FSDP2's
``fsdp_mixed_precision`` (``with_policy`` is in ``ampfn._with_policy``).

A policy says in which dtype parameters are kept, the forward computes, and outputs
come back (jmp's three dtypes). It is *mixed* when parameters are fp32 and compute is a
half dtype (autocast does the work), and *true* when parameters are kept in the compute
dtype (the model is cast once). Specs are Lightning's ``precision=`` names or jmp's
strings.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ampfn._dtypes import DTYPES as _DTYPES
from ampfn._dtypes import HALF as _HALF
from ampfn._dtypes import dtype_name as _name
from ampfn._tree import cast_floating

_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Lightning's precision= names; outputs come back in fp32 as its plugins return them
LIGHTNING = {
    "32-true": (_F32, _F32, _F32),
    "32": (_F32, _F32, _F32),
    "64-true": (_F64, _F64, _F64),
    "64": (_F64, _F64, _F64),
    "16-true": (_F16, _F16, _F32),
    "bf16-true": (_BF16, _BF16, _F32),
    "16-mixed": (_F32, _F16, _F32),
    "16": (_F32, _F16, _F32),
    "bf16-mixed": (_F32, _BF16, _F32),
    "bf16": (_F32, _BF16, _F32),
}
# Lightning's fp8 names, and ampfn's pipeline for each
_FP8 = {
    "transformer-engine": "compose(with_autocast('bf16'), with_float8(model))",
    "transformer-engine-float16": (
        "compose(with_grad_scaling(), with_autocast('fp16'), with_float8(model))"
    ),
}
_FIELDS = ("params", "compute", "output")
_KEYS = {"params": 0, "p": 0, "compute": 1, "c": 1, "output": 2, "o": 2}
# the names fsdp_mixed_precision takes
_FSDP_NAMES = ("bf16-mixed", "16-mixed", "bf16-true", "32-true")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes of parameters, compute and outputs (jmp's ``Policy``, for PyTorch).

    Example:
        >>> import torch, ampfn
        >>> p = ampfn.Policy(torch.float32, torch.bfloat16, torch.float32)
        >>> p.is_mixed, str(p)
        (True, 'params=float32,compute=bfloat16,output=float32')
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    output_dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, field)
            if not isinstance(value, torch.dtype) or not value.is_floating_point:
                raise ValueError(
                    f"Policy: {field} must be a floating torch.dtype, got {value!r}"
                )
        if not (self.is_mixed or self.is_true):
            raise ValueError(
                f"Policy: params={_name(self.param_dtype)}, compute={_name(self.compute_dtype)} is "
                "neither mixed (float32 params, float16 or bfloat16 compute) nor true (params in "
                "the compute dtype); computing in a wider dtype than the parameters keep only "
                "costs, and other pairs lose precision both ways"
            )

    @property
    def is_mixed(self) -> bool:
        return self.param_dtype == torch.float32 and self.compute_dtype in _HALF

    @property
    def is_true(self) -> bool:
        return self.param_dtype == self.compute_dtype

    def cast_to_param(self, x: Any) -> Any:
        return cast_floating(x, self.param_dtype)

    def cast_to_compute(self, x: Any) -> Any:
        return cast_floating(x, self.compute_dtype)

    def cast_to_output(self, x: Any) -> Any:
        return cast_floating(x, self.output_dtype)

    def with_output_dtype(self, dtype: torch.dtype) -> Policy:
        return dataclasses.replace(self, output_dtype=dtype)

    def __str__(self) -> str:
        return (
            f"params={_name(self.param_dtype)},compute={_name(self.compute_dtype)},"
            f"output={_name(self.output_dtype)}"
        )


def warn_fp16_eps(optimizer: Any, api: str, fix: str, stacklevel: int) -> None:
    """An Adam-family ``eps`` below fp16's smallest normal number, in an optimizer that
    steps fp16 weights (no fp32 masters), rounds to (nearly) zero: a near-zero second
    moment then divides by ~0 and the update is inf or NaN. Warn, naming the fix."""
    tiny = torch.finfo(
        torch.float16
    ).tiny  # below it fp16 loses precision, then flushes
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if isinstance(eps, float) and 0 < eps < tiny:
            warnings.warn(
                f"{api}: {type(optimizer).__name__} has eps={eps:g}, below fp16's smallest "
                f"normal number ({tiny:.1e}); in fp16 it rounds to "
                f"{float(torch.tensor(eps).half()):g}, and a near-zero second moment then "
                f"gives inf or NaN updates. Use eps=1e-4 or more, or {fix}",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
            return


def _dtype(name: str, spec: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(
            f"get_policy(spec): unknown dtype {name!r} in {spec!r}; valid: {', '.join(_DTYPES)}"
        )
    return _DTYPES[name]


def get_policy(spec: Any) -> Policy:
    """Parse a precision policy.

    - Lightning's ``precision=`` names: "32-true" ("32"), "64-true" ("64"), "16-true",
      "bf16-true", "16-mixed" ("16"), "bf16-mixed" ("bf16"); outputs come back in fp32 (in
      fp64 for "64-true"). Bare "16" and "bf16" mean what they mean in Lightning. Its fp8
      names ("transformer-engine", "transformer-engine-float16") are a ValueError naming
      ampfn's fp8 pipeline (:func:`with_float8`).
    - jmp's strings, long or short: "params=float32,compute=bfloat16,output=float32",
      "p=f32,c=bf16,o=f32". Params default to float32, compute to the params dtype,
      output to the compute dtype. A lone dtype name ("float16") sets all three.
    - A :class:`Policy`, returned as it is.

    Dtype names: float16/f16/fp16/half, bfloat16/bf16, float32/f32/fp32/full/single,
    float64/f64/fp64/double.

    Raises:
        ValueError: an unknown name, key or dtype (the message lists the valid ones), or a
            policy that is neither mixed nor true.
        TypeError: ``spec`` is not a string, an int or a Policy.

    Example:
        >>> import ampfn
        >>> str(ampfn.get_policy("bf16-true"))
        'params=bfloat16,compute=bfloat16,output=float32'
        >>> str(ampfn.get_policy("p=f32,c=f16"))
        'params=float32,compute=float16,output=float16'
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool) and str(spec) in LIGHTNING:
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"get_policy(spec): expected a precision name, a jmp policy string or an ampfn.Policy, "
            f"got {type(spec).__name__}"
        )
    if spec in LIGHTNING:
        return Policy(*LIGHTNING[spec])
    if spec in _FP8:
        raise ValueError(
            f"get_policy(spec): Lightning's {spec!r} is fp8 matmuls through NVIDIA Transformer "
            f"Engine, not a dtype policy; ampfn's fp8 is torchao's: {_FP8[spec]}"
        )
    if "=" not in spec:
        if spec in _DTYPES:
            d = _DTYPES[spec]
            return Policy(d, d, d)
        raise ValueError(
            f"get_policy(spec): unknown precision {spec!r}; valid: {', '.join(map(repr, LIGHTNING))}, "
            "a jmp string such as 'params=float32,compute=bfloat16,output=float32', or a dtype name"
        )
    found: list[torch.dtype | None] = [None, None, None]
    given = [False, False, False]
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        key = key.strip()
        if key not in _KEYS:
            raise ValueError(
                f"get_policy(spec): unknown key {key!r} in {spec!r}; valid: {', '.join(_KEYS)}"
            )
        i = _KEYS[key]
        if given[i]:
            raise ValueError(
                f"get_policy(spec): {spec!r} sets {_FIELDS[i]} twice; give each of params, "
                "compute and output at most once"
            )
        given[i] = True
        found[i] = _dtype(value.strip(), spec)
    params = found[0] or torch.float32
    compute = found[1] or params
    return Policy(params, compute, found[2] or compute)


def fsdp_mixed_precision(policy: Any) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for an ampfn precision.

    =============== ============== ============== ==============
    policy          param_dtype    reduce_dtype   output_dtype
    =============== ============== ============== ==============
    "bf16-mixed"    bf16           fp32           fp32
    "16-mixed"      fp16           fp32           fp32
    "bf16-true"     bf16           bf16           fp32
    "32-true"       fp32           fp32           (as computed)
    a dtype ``d``   ``d``          fp32           (as computed)
    ampfn.Policy    compute dtype  fp32 if mixed, its output dtype
                                   else params
    =============== ============== ============== ==============

    A name means what :func:`get_policy` makes of it, so a name and its
    ``ampfn.Policy`` give the same FSDP2 policy: outputs in fp32, as ampfn's policies
    return them.

    FSDP2 keeps the sharded parameters in their own dtype (fp32 for an fp32 model) and
    casts them to ``param_dtype`` for the forward and backward, so autocast is optional
    with it; gradients come back in the parameters' dtype. For fp16 compute keep loss
    scaling: ``with_grad_scaling()`` (its default GradScaler handles FSDP2's sharded
    gradients, and all ranks skip together).

    Args:
        policy: one of the names above, a ``torch.dtype``, or an ``ampfn.Policy``.

    Returns:
        ``torch.distributed.fsdp.MixedPrecisionPolicy``, to pass to
        ``fully_shard(module, mp_policy=...)``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
        TypeError: neither a name, a dtype nor a policy.

    Example:
        >>> import ampfn
        >>> mp = ampfn.fsdp_mixed_precision("bf16-mixed")
        >>> mp.param_dtype, mp.reduce_dtype
        (torch.bfloat16, torch.float32)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    api = "fsdp_mixed_precision(policy)"
    output = None
    if isinstance(policy, str):
        if policy not in _FSDP_NAMES:
            raise ValueError(
                f"{api}: expected one of {', '.join(map(repr, _FSDP_NAMES))}, a torch.dtype or an "
                f"ampfn.Policy, got {policy!r}"
            )
        policy = get_policy(policy)
    if isinstance(policy, torch.dtype):
        if not policy.is_floating_point:
            raise ValueError(f"{api}: expected a floating dtype, got {policy}")
        param, reduce = policy, torch.float32
    elif isinstance(policy, Policy):
        param = policy.compute_dtype
        reduce = torch.float32 if policy.is_mixed else policy.param_dtype
        output = (
            policy.output_dtype if policy.output_dtype != policy.compute_dtype else None
        )
    else:
        raise TypeError(
            f"{api}: expected a precision name such as 'bf16-mixed', a torch.dtype or an "
            f"ampfn.Policy, got {type(policy).__name__}"
        )
    return MixedPrecisionPolicy(
        param_dtype=param, reduce_dtype=reduce, output_dtype=output
    )
