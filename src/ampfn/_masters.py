"""fp32 master weights: the one mechanism behind ``with_apex`` O2 and ``with_policy(...,
master_weights=True)``.

The optimizers hold fp32 masters in place of the model's low-precision parameters. After
each backward the model's gradients move into the masters' (in fp32, so gradient
accumulation sums in fp32); after each step that may have changed the masters they are
copied into the model; clipping acts on the masters' gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class MasterWeights:
    """Masters for the parameters in ``to_master`` that ``optimizers`` hold.

    Create it while the model is still fp32: the masters start from the exact fp32
    values (Apex copies the already-rounded half ones). Cast the model afterwards.
    """

    __slots__ = (
        "_by_id",
        "_model_of",
        "_pairs",
        "masters",
        "model_params",
        "optimizers",
    )

    def __init__(
        self, to_master: Iterable[nn.Parameter], optimizers: Sequence[Any]
    ) -> None:
        wanted = {id(p) for p in to_master}
        self.optimizers = tuple(optimizers)
        self._pairs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        swap: dict[int, torch.Tensor] = {}
        for opt in self.optimizers:
            model_params: list[torch.Tensor] = []
            masters: list[torch.Tensor] = []
            for group in opt.param_groups:
                new = []
                for p in group["params"]:
                    if id(p) in wanted and id(p) not in swap:
                        m = p.detach().clone().float().requires_grad_(True)
                        swap[id(p)] = m
                        model_params.append(p)
                        masters.append(m)
                        if p in opt.state:
                            opt.state[m] = opt.state.pop(p)
                    new.append(swap.get(id(p), p))
                group["params"] = new
            self._pairs[id(opt)] = (model_params, masters)
        self._by_id = swap
        self._model_of = {
            id(m): p
            for ps, ms in self._pairs.values()
            for p, m in zip(ps, ms, strict=True)
        }
        self.model_params = [p for ps, _ in self._pairs.values() for p in ps]
        self.masters = [m for _, ms in self._pairs.values() for m in ms]

    def named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s parameter names that have masters, with their masters."""
        return {
            n: m
            for n, p in model.named_parameters()
            if (m := self._by_id.get(id(p))) is not None
        }

    def model_param_of(self, master: torch.Tensor) -> torch.Tensor | None:
        """The model parameter a master stands for (None for other tensors)."""
        return self._model_of.get(id(master))

    def collect(self) -> None:
        """Move the model's gradients into the masters' (accumulating in fp32)."""
        for p, m in zip(self.model_params, self.masters, strict=True):
            g = p.grad
            if g is not None:
                if m.grad is None:
                    m.grad = g.float()
                else:
                    m.grad.add_(g)
                p.grad = None

    def after_step(self, optimizer: Any, stepped: Any) -> None:
        """Copy ``optimizer``'s masters into the model after a step that may have changed
        them (True, or a tensor in sync-free scaling, where a skip left them unchanged)."""
        if stepped is not False:
            pair = self._pairs.get(id(optimizer))
            if pair is not None and pair[0]:
                with torch.no_grad():
                    torch._foreach_copy_(pair[0], pair[1])

    def clip_params(self, parameters: Any) -> list[torch.Tensor]:
        params = (
            [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        )
        return [self._by_id.get(id(p), p) for p in params]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if self.masters:
            torch._foreach_copy_(self.model_params, self.masters)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], /) -> None:
        saved = state["masters"]
        if len(saved) != len(self.masters):
            raise ValueError(
                f"ampfn.load_state_dict: {len(saved)} saved master weights, the pipeline has {len(self.masters)}"
            )
        for m, s in zip(self.masters, saved, strict=True):
            m.copy_(s)
        self.copy_to_model()
