"""Layer 4, loss scaling: what every scaler keeps, per call and between calls.

- :class:`ScalingCall`, the per-call state (``call.scaling``): the backward seen, the
  optimizers unscaled and stepped in this call, their found-inf flags.
- :class:`ScalerBase`, the long-lived bookkeeping and the call protocol: ``begin``
  refuses a call while the scaler serves another (another thread), and makes the
  per-call state; ``finish`` commits it (the scaler's update; whether a backward is
  pending; optimizers unscaled in a call that did not step) or, when the call raised,
  discards it and puts back what the call changed: gradients it unscaled are scaled
  again, GradScaler's per-optimizer stages are reset, Apex's scales restored.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from typing import Any

import torch

from ampfn import _distributed as distributed
from ampfn._args import grads_of, optimizer_params
from ampfn._guard import LEFT_BEHIND
from ampfn._scaling._misuse import (
    BACKWARD_AFTER_UNSCALE,
    LeftScaled,
    check_gradients,
    check_shared,
)
from ampfn._types import Call, Grads, Kwargs, Optimizer, Stepped


class ScalingCall:
    """One call's loss-scaling state: made by ``begin``, committed or dropped by ``finish``.

    Attributes:
        call: the call it belongs to (for the step guard's handshake).
        backward: an ``ampfn.backward`` ran since the last update (in this call, or in an
            earlier call that did not step).
        unscaled: the optimizers unscaled in this call, by id.
        steps: the optimizers stepped in this call, by id.
        stepped: a scaler step that recorded its inf checks ran (the scale updates).
        founds: per optimizer, its found-inf flag (sync-free and Apex's scaler).
        agreed: the optimizers whose skip decision is final in this update.
        locked: this call holds the scaler (it was not traced).
        saved: what Apex's scaler restores if the call fails.
    """

    __slots__ = (
        "agreed",
        "backward",
        "call",
        "founds",
        "locked",
        "saved",
        "stash",
        "stepped",
        "steps",
        "unscaled",
    )

    def __init__(self, call: Call, backward: bool, locked: bool) -> None:
        self.call = call
        self.backward = backward
        self.unscaled: dict[int, Optimizer] = {}
        self.steps: set[int] = set()
        self.stepped = False
        self.founds: dict[int, torch.Tensor] = {}
        self.agreed: set[int] = set()
        self.locked = locked
        self.saved: Any = None
        self.stash: list[torch.Tensor | None] = []


def _graph_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose gradients a backward of ``loss`` accumulates."""
    leaves: list[torch.Tensor] = []
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves


class ScalerBase(ABC):
    """The bookkeeping of every scaler (see the module docstring).

    Between calls: ``pending`` (a backward ran since the last update), ``stale`` (the
    optimizers unscaled in a call that did not step: the next call may step them, or
    clear their gradients to start afresh), ``known`` (the optimizers seen stepping).
    """

    per_backward = False  # Apex's scaler unscales after each backward
    sync_free = False

    def __init__(
        self, api: str, sync_ranks: bool | None, optimizers: tuple[Any, ...] = ()
    ) -> None:
        self.api = api
        self.sync_ranks = sync_ranks
        self.pending = False
        self.stale: dict[int, Optimizer] = {}
        self.known: weakref.WeakValueDictionary[int, Any] = (
            weakref.WeakValueDictionary()
        )
        for o in optimizers:
            self.known[id(o)] = o
        self._checked: dict[int, int] = {}  # optimizer -> param groups when checked
        self._disjoint: set[tuple[int, ...]] = set()
        self._learned: list[weakref.ref[torch.Tensor]] = []
        self._left = LeftScaled(api)
        self._lock = threading.Lock()
        self._owner: int | None = None

    # --- what each scaler implements (``ampfn._types.Scaler``, ``Stateful``) --------

    @abstractmethod
    def scale(
        self, st: ScalingCall, loss: torch.Tensor, loss_id: int
    ) -> torch.Tensor: ...

    @abstractmethod
    def after_backward(self, st: ScalingCall, loss_id: int) -> None: ...

    @abstractmethod
    def grad(
        self, st: ScalingCall, outputs: Any, inputs: Any, loss_id: int, kwargs: Kwargs
    ) -> Grads: ...

    @abstractmethod
    def unscale(self, st: ScalingCall, optimizer: Optimizer) -> None: ...

    @abstractmethod
    def step(
        self,
        st: ScalingCall,
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> Stepped: ...

    @abstractmethod
    def loss_scale(self, loss_id: int = 0) -> float: ...

    @abstractmethod
    def commit(self, st: ScalingCall) -> None:
        """A call ended well: the scaler's update, then ``settle`` (the bookkeeping)."""

    @abstractmethod
    def discard(self, st: ScalingCall) -> None:
        """A call raised: put back what it changed; nothing is committed."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def check_state(self, state: object, /) -> None: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], /) -> None: ...

    # --- the call protocol ------------------------------------------------------

    def begin(self, call: Call) -> None:
        locked = False
        if not torch.compiler.is_dynamo_compiling():
            if not self._lock.acquire(blocking=False):
                raise RuntimeError(
                    f"{self.api}: this pipeline is running a call in another thread "
                    f"(thread {self._owner}); a pipeline with loss scaling runs one call at a "
                    "time, since its scaler's state is shared; build one pipeline (and "
                    "scaler) per thread"
                )
            self._owner = threading.get_ident()
            locked = True
            if self._left.marks:
                LEFT_BEHIND.discard(self._left)
                self._left.marks.clear()
        call.scaling = ScalingCall(call, self.pending, locked)

    def finish(self, call: Call, failed: bool) -> None:
        st: ScalingCall = call.scaling
        try:
            if failed:
                self.discard(st)
            else:
                self.commit(st)
        finally:
            if st.locked:
                self._owner = None
                self._lock.release()

    def settle(self, st: ScalingCall, updated: bool) -> None:
        if updated:
            self.pending = False
            self.stale.clear()
            return
        self.pending = st.backward
        self.stale.update(st.unscaled)
        if self.pending and not torch.compiler.is_dynamo_compiling():
            self._mark_left_scaled()

    def _mark_left_scaled(self) -> None:
        params: list[torch.Tensor] = []
        for o in list(self.known.values()):
            first = next((p for p in optimizer_params(o) if p.grad is not None), None)
            if first is not None:
                params.append(first)
        if not params:
            params = [p for r in self._learned if (p := r()) is not None]
        self._left.mark(params)
        if self._left.marks:
            LEFT_BEHIND.add(self._left)

    # --- shared checks ----------------------------------------------------------

    def before_backward(self, st: ScalingCall, loss: torch.Tensor) -> None:
        """A backward must not mix scaled gradients with unscaled ones; learn which
        parameters it reaches while no optimizer is known."""
        if st.unscaled:
            raise RuntimeError(BACKWARD_AFTER_UNSCALE)
        for optimizer in list(self.stale.values()):
            grads = grads_of(optimizer)
            if not grads:
                self.restart(optimizer)
                continue
            if all(not bool(g.any()) for g in grads):
                raise RuntimeError(
                    "ampfn.backward(loss): this optimizer's gradients were unscaled (by "
                    "ampfn.unscale_ or ampfn.clip_grad_norm_) in an earlier call that did not "
                    "step, and they were zeroed in place since, not cleared, so ampfn cannot "
                    "tell a fresh update from gradients to accumulate; clear them with "
                    "optimizer.zero_grad(set_to_none=True), or call ampfn.step(optimizer) in "
                    "the call that unscales"
                )
            raise RuntimeError(
                "ampfn.backward(loss): this optimizer's gradients were unscaled (by "
                "ampfn.unscale_ or ampfn.clip_grad_norm_) in an earlier call that did not "
                "step, and this backward would add scaled gradients to them; step that "
                "optimizer first, or clear its gradients (optimizer.zero_grad()) to start a "
                "fresh update"
            )
        st.backward = True
        if not self.known and not torch.compiler.is_dynamo_compiling():
            self._learned = [weakref.ref(t) for t in _graph_leaves(loss)]

    def restart(self, optimizer: Optimizer) -> None:
        """A fresh update for an optimizer unscaled in an earlier call that did not step,
        whose gradients were cleared since."""
        self.stale.pop(id(optimizer), None)

    def check_unscale(
        self, st: ScalingCall, optimizer: Optimizer, scaler: Any = None
    ) -> None:
        """Before unscaling ``optimizer``: gradients the scaler can unscale, and no
        parameter shared with another optimizer of this update."""
        groups = len(optimizer.param_groups)
        if self._checked.get(id(optimizer)) != groups:
            check_gradients(
                self.api,
                optimizer,
                scaler,
                allow_fp16=getattr(self, "allow_fp16", False),
                sync_free=self.sync_free,
            )
            self._checked[id(optimizer)] = groups
        others = [
            o
            for o in (*st.unscaled.values(), *self.stale.values())
            if o is not optimizer
        ]
        if others:
            key = (id(optimizer), groups, *sorted(id(o) for o in others))
            if key not in self._disjoint:
                check_shared(self.api, optimizer, others)
                self._disjoint.add(key)

    def true_gradients(self, st: ScalingCall, params: list[torch.Tensor]) -> bool:
        """Whether every gradient of ``params`` is unscaled in this update."""
        held = {
            id(p)
            for o in (*st.unscaled.values(), *self.stale.values())
            for p in optimizer_params(o)
        }
        return all(id(p) in held for p in params if p.grad is not None)

    def ranks(self) -> bool:
        """Whether skip decisions are all-reduced across ranks (decided once, lazily)."""
        if self.sync_ranks is None:
            self.sync_ranks = distributed.world_size() > 1
            if self.sync_ranks:
                self.check_ranks()
        return self.sync_ranks

    def check_ranks(self) -> None:  # noqa: B027 (an optional hook)
        """Raise if this scaler cannot be made to agree across ranks."""


def has_grads(optimizer: Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


def rescale(grads: list[torch.Tensor], scale: torch.Tensor | float) -> None:
    """Multiply unscaled gradients by the scale again (a failed call's unscale undone)."""
    with torch.no_grad():
        for g in grads:
            g.mul_(scale.to(g.device) if isinstance(scale, torch.Tensor) else scale)
