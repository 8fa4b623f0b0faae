"""Layer 4, building block: taking back what a transform factory did to models and optimizers.

``with_policy`` and ``with_apex`` convert the model and its optimizers when they are
called (cast in place, ``forward`` patched, hooks registered, fp32 masters put into
``param_groups``). When the pipeline they were built for is then refused (``compose``
finds two loss scalers, or fp16 weights without masters under ``with_grad_scaling``),
nothing may have changed: :class:`Snapshot`, taken before the conversion, puts every
model and optimizer back as it was: parameters' data and gradients, buffers, instance
attributes (a patched ``forward``), hooks, ``param_groups`` and optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _hooks(obj: object) -> dict[str, set[Any]]:
    """The keys of each hook dictionary of a module or an optimizer (``_forward_hooks``,
    ``_state_dict_hooks``, ``_optimizer_load_state_dict_pre_hooks``, ...)."""
    return {
        name: set(value)
        for name, value in vars(obj).items()
        if "hook" in name and isinstance(value, dict)
    }


def _remove_new_hooks(obj: object, saved: dict[str, set[Any]]) -> None:
    for name, keys in saved.items():
        hooks = getattr(obj, name)
        for key in [k for k in hooks if k not in keys]:
            del hooks[key]


class _ModuleState:
    __slots__ = ("attrs", "buffers", "hooks", "module", "params")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attrs = dict(vars(module))
        self.buffers = dict(module._buffers)
        self.params = [
            (p, p.data, p.grad) for p in module._parameters.values() if p is not None
        ]
        self.hooks = _hooks(module)

    def restore(self) -> None:
        module = self.module
        for p, data, grad in self.params:
            p.data = data
            p.grad = grad
        module._buffers.clear()
        module._buffers.update(self.buffers)
        _remove_new_hooks(module, self.hooks)
        for name in [n for n in vars(module) if n not in self.attrs]:
            delattr(module, name)
        if "forward" in self.attrs:  # the user's own, which a conversion wrapped
            object.__setattr__(module, "forward", self.attrs["forward"])
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
                _hooks(opt),
            )
            for opt in dict.fromkeys(optimizers)
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for state in self.modules:
            state.restore()
        for opt, groups, saved, hooks in self.optimizers:
            for group, params, items in groups:
                params[:] = items
                group["params"] = params
            opt.state.clear()
            opt.state.update(saved)
            _remove_new_hooks(opt, hooks)
