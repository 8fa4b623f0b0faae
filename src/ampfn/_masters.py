"""Layer 4, building block: fp32 master weights, the one mechanism behind ``with_apex`` O2
and ``with_policy(..., master_weights=True)``.

The optimizers hold fp32 masters in place of the model's low-precision parameters. After
each backward the model's gradients move into the masters' (in fp32, so gradient
accumulation sums in fp32); after each step that may have changed the masters they are
copied into the model; after every step, stepped or skipped, their gradients are cleared
(as Apex clears them, so that zeroing the model's gradients starts the next update
afresh); clipping acts on the masters' gradients. A parameter group added later (``add_param_group``) gets masters at the next
step, as in Apex.
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
        "_groups",
        "_model_of",
        "_pairs",
        "_wanted",
        "api",
        "masters",
        "model_params",
        "optimizers",
    )

    def __init__(
        self, api: str, to_master: Iterable[nn.Parameter], optimizers: Sequence[Any]
    ) -> None:
        self.api = api
        self._wanted = {id(p) for p in to_master}
        self.optimizers = tuple(optimizers)
        self._pairs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._groups: dict[int, int] = {}  # optimizer -> its number of param groups
        self._by_id: dict[int, torch.Tensor] = {}
        self._model_of: dict[int, torch.Tensor] = {}
        self.model_params: list[torch.Tensor] = []
        self.masters: list[torch.Tensor] = []
        for opt in self.optimizers:
            self._adopt(opt)

    def _adopt(self, opt: Any) -> None:
        """Put masters in place of ``opt``'s parameters that have one or should: those
        ``to_master`` named, and those of the model cast later to half precision."""
        model_params, masters = self._pairs.setdefault(id(opt), ([], []))
        for group in opt.param_groups:
            new = []
            for p in group["params"]:
                m = self._by_id.get(id(p))
                if (
                    m is None
                    and (
                        id(p) in self._wanted
                        or (
                            p.is_floating_point()
                            and p.dtype in (torch.float16, torch.bfloat16)
                        )
                    )
                    and id(p) not in self._model_of
                ):
                    m = p.detach().clone().float().requires_grad_(True)
                    if p.grad is not None:
                        m.grad = p.grad.float()
                        p.grad = None
                    self._by_id[id(p)] = m
                    self._model_of[id(m)] = p
                    self.model_params.append(p)
                    self.masters.append(m)
                if m is not None:
                    if p in opt.state:
                        opt.state[m] = opt.state.pop(p)
                    if not any(m is q for q in masters):
                        model_params.append(p)
                        masters.append(m)
                    p = m
                new.append(p)
            group["params"] = new
        self._groups[id(opt)] = len(opt.param_groups)

    def named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s parameter names that have masters, with their masters (every name of
        a tied parameter)."""
        return {
            n: m
            for n, p in model.named_parameters(remove_duplicate=False)
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

    def before_step(self, optimizer: Any, backward_seen: bool) -> None:
        """Before ``optimizer`` steps: masters for parameter groups added since (or for an
        optimizer built after the cast); and, if no ``ampfn.backward`` ran in this call,
        refuse a step whose gradients never reached the masters."""
        if self._groups.get(id(optimizer)) != len(optimizer.param_groups):
            self._adopt(optimizer)
        if not backward_seen:
            pair = self._pairs[id(optimizer)]
            if any(p.grad is not None for p in pair[0]):
                raise RuntimeError(
                    f"ampfn.step(optimizer): under {self.api} with master weights the model's "
                    "gradients are still on the model, not on the fp32 masters the optimizer "
                    "holds, so the step would change nothing (was loss.backward() called "
                    "directly?); call ampfn.backward(loss) instead, which moves them"
                )

    def after_step(self, optimizer: Any, stepped: Any) -> None:
        """Copy ``optimizer``'s masters into the model after a step that may have changed
        them (True, or a tensor in sync-free scaling, where a skip left them unchanged)."""
        if stepped is not False:
            pair = self._pairs.get(id(optimizer))
            if pair is not None and pair[0]:
                with torch.no_grad():
                    torch._foreach_copy_(pair[0], pair[1])

    def release(self, optimizer: Any) -> None:
        """Clear ``optimizer``'s masters' gradients once its step is done (stepped or
        skipped, and seen by telemetry), as Apex does after each step: the backward moved
        the model's gradients into them, so ``model.zero_grad()`` (or the model's
        ``.grad = None``) could not clear them, and the next update would add to them."""
        pair = self._pairs.get(id(optimizer))
        if pair is not None:
            for m in pair[1]:
                m.grad = None

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

    def check_state(self, state: object, /) -> None:
        saved = state.get("masters") if isinstance(state, dict) else None
        if not isinstance(saved, list) or not all(
            isinstance(t, torch.Tensor) for t in saved
        ):
            raise TypeError(
                f"expected {{'masters': [tensor, ...]}}, got {state!r}"[:200]
            )
        if len(saved) != len(self.masters):
            raise ValueError(
                f"{len(saved)} saved master weights, the pipeline has {len(self.masters)}"
            )
        for i, (m, t) in enumerate(zip(self.masters, saved, strict=True)):
            if t.shape != m.shape:
                raise ValueError(
                    f"saved master weight {i} has shape {tuple(t.shape)}, the pipeline's "
                    f"{tuple(m.shape)}"
                )

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], /) -> None:
        for m, s in zip(self.masters, state["masters"], strict=True):
            m.copy_(s)
        self.copy_to_model()
