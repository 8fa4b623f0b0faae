"""Layer 3, mechanism: the guards that catch torch calls made where ampfn's effects belong.

Installed once per process, by the first pipeline whose plan owns the step (loss
scaling, master weights, stochastic rounding: ``ampfn._engine.Engine``), and free
outside a wrapped step but for one thread-local read:

- **The step guard**, an optimizer step pre-hook for every optimizer
  (``register_optimizer_step_pre_hook``). Inside a call whose plan owns the step, only
  ``ampfn.step`` may step an optimizer: a direct ``optimizer.step()`` is refused before
  it changes anything. Outside any call it asks the registered :data:`LEFT_BEHIND`
  checks (the loss scalers with gradients left scaled by an accumulation call) whether
  this optimizer may step.
- **The clip guard**: ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``
  (and their ``torch.nn.utils.clip_grad`` names) are wrapped. Inside a call with loss
  scaling, clipping gradients that are still multiplied by the loss scale is refused
  (the norm would be the scale times too large, and the update that much too small);
  after ``ampfn.unscale_(optimizer)`` torch's clipping is fine, as in PyTorch's AMP
  recipe. Under fp32 master weights torch's clipping acts on the masters' gradients
  (the model's own have moved there). ``ampfn.clip_grad_norm_`` calls torch's own
  function, unwrapped.

:func:`guard_suspended` removes both for a while (benchmarks/ times hand-written loops
exactly as they run in a process that never imported ampfn).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.nn.utils import clip_grad as _clip_module
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ampfn._runtime import local
from ampfn._types import Optimizer

_CLIPS = ("clip_grad_norm_", "clip_grad_value_", "clip_grad_norm")
_ORIGINALS: dict[str, Callable[..., Any]] = {
    n: getattr(_clip_module, n) for n in _CLIPS
}
# torch's own clipping, which ampfn.clip_grad_norm_ calls
torch_clip_grad_norm_: Callable[..., torch.Tensor] = _ORIGINALS["clip_grad_norm_"]


class LeftBehind(Protocol):
    """A check for a direct ``optimizer.step()`` outside any wrapped step."""

    def check_outside(self, optimizer: Optimizer) -> None: ...


# the checks to ask outside a wrapped step (a scaler registers while it has gradients
# left scaled by an accumulation call)
LEFT_BEHIND: weakref.WeakSet[Any] = weakref.WeakSet()

_HOOK: list[Any] = []  # the step hook's handle, while installed


def _step_guard(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    call = getattr(local, "call", None)
    if call is None:
        if LEFT_BEHIND:
            for check in list(LEFT_BEHIND):
                check.check_outside(optimizer)
        return
    if call.sanctioned:
        call.ran = True
        call.found = getattr(optimizer, "found_inf", None)
        return
    engine = call.plan.engine
    if engine.owner is not None:
        raise RuntimeError(engine.direct_step_error(optimizer))


def _clip_guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        call = getattr(local, "call", None)
        if call is not None:
            engine = call.plan.engine
            sc = engine.scaling
            if sc is not None or engine.masters:
                params = (
                    [parameters]
                    if isinstance(parameters, torch.Tensor)
                    else list(parameters)
                )
                for m in engine.masters:  # the gradients are on the fp32 masters
                    params = m.clip_params(params)
                if sc is not None and not sc.true_gradients(call.scaling, params):
                    raise RuntimeError(
                        f"torch.nn.utils.{name} inside a step wrapped by {sc.api}: the "
                        "gradients are still multiplied by the loss scale, so the norm it "
                        "sees (and clips to) is the scale times too large; call "
                        "ampfn.clip_grad_norm_(parameters, max_norm, optimizer), which "
                        "unscales first, or ampfn.unscale_(optimizer) before torch's clipping"
                    )
                parameters = params
        return fn(parameters, *args, **kwargs)

    clip.__ampfn_guard__ = True  # type: ignore[attr-defined]
    return clip


def _set_clips(functions: dict[str, Callable[..., Any]]) -> None:
    for name, fn in functions.items():
        for module in (_clip_module, torch.nn.utils):
            if hasattr(module, name):
                setattr(module, name, fn)


def install() -> None:
    """Install both guards (once per process; again after :func:`guard_suspended`)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_step_guard))
        _set_clips({n: _clip_guard(n, fn) for n, fn in _ORIGINALS.items()})


@contextlib.contextmanager
def guard_suspended() -> Iterator[None]:
    """Without the guards for a while (benchmarks' hand-written loops, their twins in tests)."""
    installed = bool(_HOOK)
    if installed:
        _HOOK.pop().remove()
        _set_clips(_ORIGINALS)
    try:
        yield
    finally:
        if installed:
            install()
