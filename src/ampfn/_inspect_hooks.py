"""Layer 5, tool: what the precision inspector captures while one step runs.

:class:`Capture` hooks every named submodule of a model (its floating inputs and
outputs, cloned, so later in-place ops cannot change them) and every parameter (its
gradient as autograd accumulates it, before master weights or a scaler move or unscale
it), and, as the outermost :class:`~ampfn.Handler`, sees the loss each
``ampfn.backward`` gets before it is scaled. :meth:`Capture.run` removes every hook it
added, whatever happens, so a captured model is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ampfn._transform import Transform
from ampfn._types import Handler, Kwargs


def floating_leaves(obj: Any) -> list[torch.Tensor]:
    """The floating tensors nested in ``obj`` (tuples, lists, dicts, dataclass-free)."""
    return [
        t.detach().clone()
        for t in tree_leaves(obj)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


class Record:
    """What one module did in one step: its inputs and outputs, one list per call."""

    __slots__ = ("inputs", "outputs", "type_name")

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []


class Capture(Handler):
    """Records one step of ``model``: per module name a :class:`Record`, per parameter
    name its true gradient (divided by ``scale``, the loss scale of this step), and the
    losses given to ``ampfn.backward``."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        self.model = model
        self.scale = scale
        self.records: dict[str, Record] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    # -- the Handler: the loss before any scaling ----------------------------------------

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: Kwargs
    ) -> None:
        self.losses.append(float(loss.detach().float().sum()))
        proceed(loss, kwargs)

    # -- the hooks -----------------------------------------------------------------------

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            record = self.records.get(name)
            if record is None:
                record = self.records[name] = Record(type(module).__name__)
            record.inputs.extend(floating_leaves((args, kwargs)))
            record.outputs.extend(floating_leaves(out))

        return hook

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                # the latest accumulation is the whole gradient of the step so far
                self.grads[name] = param.grad.detach().float() / self.scale

        return hook

    def run(self, step: Callable[[Any], Any], batch: Any) -> Any:
        """Run ``step(batch)`` under this capture, then remove every hook."""
        handles: list[Any] = []
        try:
            for name, module in self.model.named_modules():
                if name:  # the root is the whole model, never an island
                    handles.append(
                        module.register_forward_hook(
                            self._forward_hook(name), with_kwargs=True
                        )
                    )
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    handles.append(
                        param.register_post_accumulate_grad_hook(self._grad_hook(name))  # type: ignore[no-untyped-call]
                    )
            wrapped = Transform("inspect_precision", handler=self)(step)
            return wrapped(batch)
        finally:
            for handle in handles:
                handle.remove()
