"""Layer 4, building block: taking back what a transform factory did to models and optimizers.

``with_policy`` and ``with_apex`` convert the model and its optimizers when they are
called (cast in place, ``forward`` patched, hooks registered, fp32 masters put into
``param_groups``). When the pipeline they were built for is then refused (``compose``
finds two loss scalers, or fp16 weights without masters under ``with_grad_scaling``),
nothing may have changed: :class:`Snapshot`, taken before the conversion, puts every
model and optimizer back as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# the hook dictionaries of an nn.Module that a conversion may add to
_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class _ModuleState:
    __slots__ = ("attrs", "buffers", "hooks", "module", "params")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attrs = dict(vars(module))
        self.buffers = dict(module._buffers)
        self.params = [
            (p, p.data, p.grad) for p in module._parameters.values() if p is not None
        ]
        self.hooks = {
            name: set(getattr(module, name)) for name in _HOOKS if hasattr(module, name)
        }

    def restore(self) -> None:
        module = self.module
        for p, data, grad in self.params:
            p.data = data
            p.grad = grad
        module._buffers.clear()
        module._buffers.update(self.buffers)
        for name, keys in self.hooks.items():
            hooks = getattr(module, name)
            for key in [k for k in hooks if k not in keys]:
                del hooks[key]
        for name in [n for n in vars(module) if n not in self.attrs]:
            delattr(module, name)
        for name in ("forward",):  # instance attributes a conversion replaces
            if name in self.attrs:
                object.__setattr__(module, name, self.attrs[name])
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()


class Snapshot:
    """The models and optimizers as they are now, to restore with :meth:`restore`."""

    __slots__ = ("modules", "optimizers")

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[Any]) -> None:
        self.modules = [_ModuleState(m) for model in models for m in model.modules()]
        self.optimizers = [
            (
                opt,
                [(g, g["params"], list(g["params"])) for g in opt.param_groups],
                dict(opt.state),
            )
            for opt in dict.fromkeys(optimizers)
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for state in self.modules:
            state.restore()
        for opt, groups, saved in self.optimizers:
            for group, params, items in groups:
                params[:] = items
                group["params"] = params
            opt.state.clear()
            opt.state.update(saved)
