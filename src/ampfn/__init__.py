"""ampfn: mixed-precision training in PyTorch by wrapping functions.

Layer 6, the public namespace. Write a training step as a plain function that calls
:func:`backward` and :func:`step` instead of ``loss.backward()`` and
``optimizer.step()``, then wrap it with precision transforms and :func:`compose` them.
Nothing here imports apex, torch_xla, torchao or hypothesis; the transforms that need
them import them when built. The architecture: docs/architecture.md.
"""

from ampfn._apex import with_apex
from ampfn._autocast import with_autocast
from ampfn._checkpoint import load_state_dict, state_dict
from ampfn._effects import backward, clip_grad_norm_, grad, step, unscale_
from ampfn._float8 import with_float8
from ampfn._grad_scaling import with_grad_scaling
from ampfn._inspect import inspect_precision
from ampfn._inspect_report import ModuleReport, PrecisionReport
from ampfn._islands import FP32Island, fp32
from ampfn._policy import Policy, fsdp_mixed_precision, get_policy
from ampfn._scaling import loss_scale
from ampfn._telemetry import StepRecord, with_telemetry
from ampfn._transform import Pipeline, Transform, compose, with_handler
from ampfn._types import Handler
from ampfn._with_policy import with_policy
from ampfn._xla import with_xla_bf16

__version__ = "0.1.0"

__all__ = [
    "FP32Island",
    "Handler",
    "ModuleReport",
    "Pipeline",
    "Policy",
    "PrecisionReport",
    "StepRecord",
    "Transform",
    "backward",
    "clip_grad_norm_",
    "compose",
    "fp32",
    "fsdp_mixed_precision",
    "get_policy",
    "grad",
    "inspect_precision",
    "load_state_dict",
    "loss_scale",
    "state_dict",
    "step",
    "unscale_",
    "with_apex",
    "with_autocast",
    "with_float8",
    "with_grad_scaling",
    "with_handler",
    "with_policy",
    "with_telemetry",
    "with_xla_bf16",
]
