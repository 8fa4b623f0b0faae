"""Layer 7, testing: what every check shares: trials built from ``make(seed)``, a probe handler that
records (and injects) what each step does, the eager validation of the contract, and
running a property once per hypothesis example or once on given batches."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import torch
from hypothesis import strategies as st

from ampfn._args import is_optimizer
from ampfn._transform import Transform
from ampfn._types import Handler
from ampfn.testing._strategies import TrialPipeline

Make = Callable[[int], tuple[Callable[[Any], Any], torch.nn.Module, Any]]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP2 shard is a DTensor), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class Probe(Handler):
    """The outermost handler of a checked pipeline: sees every gradient and step result.

    It records, per call, which optimizers (by index) had non-finite gradients after
    backward, and each ``ampfn.step`` result as ``(optimizer index, stepped)``.
    """

    __slots__ = (
        "armed",
        "index",
        "late",
        "nonfinite",
        "optimizers",
        "poison",
        "results",
        "skip",
    )

    def __init__(
        self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
    ) -> None:
        self.optimizers = optimizers
        self.index = {id(o): i for i, o in enumerate(optimizers)}
        self.poison: float | None = (
            None  # inject into a gradient during the next backward
        )
        self.armed = False
        self.late = False  # poison after the backward returns (after DDP's all-reduce)
        self.skip = False  # reference runs: skip the step (the pipeline skipped it)
        self.nonfinite: set[int] = set()
        self.results: list[tuple[int, bool]] = []
        # Poison inside the backward, as a real overflow happens: a scaler that checks
        # each backward as it finishes (Apex's) sees it as well as one that checks at step.
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._poison)  # type: ignore[no-untyped-call]

    def _poison(self, param: torch.Tensor) -> None:
        if self.armed and not self.late and param.grad is not None:
            self.armed = False
            with torch.no_grad():
                local_tensor(param.grad).view(-1)[0] = self.poison  # type: ignore[assignment]

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        self.armed = self.poison is not None
        proceed(loss, kwargs)
        if self.armed and self.late:
            first = next(
                (
                    p
                    for o in self.optimizers
                    for g in o.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ),
                None,
            )
            if first is not None and first.grad is not None:
                with torch.no_grad():
                    local_tensor(first.grad).view(-1)[0] = self.poison  # type: ignore[assignment]
                self.armed = False
        assert not self.armed, "the step's backward produced no gradient to poison"
        for i, o in enumerate(self.optimizers):
            for g in o.param_groups:
                for p in g["params"]:
                    if p.grad is not None and not bool(
                        local_tensor(p.grad).isfinite().all()
                    ):
                        self.nonfinite.add(i)

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        result = False if self.skip else proceed(optimizer, args, kwargs)
        self.results.append((self.index.get(id(optimizer), -1), result))
        return result


_CONTRACT = "make(seed) -> (step, model, optimizer)"


class Maker:
    """A user's ``make``, checked: each call returns ``(step, model, optimizer)`` with a
    model no earlier call of this check returned (trials must be independent: a ``make``
    that hands out one model compares the pipeline with itself), and leaves the default
    dtype as it was."""

    __slots__ = ("api", "make", "seen")

    def __init__(self, api: str, make: Callable[[int], Any]) -> None:
        self.api, self.make = api, make
        self.seen: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def __call__(self, seed: int) -> tuple[Callable[[Any], Any], torch.nn.Module, Any]:
        with default_dtype_kept():
            made = self.make(seed)
        if not isinstance(made, tuple) or len(made) != 3:
            got = (
                f"a tuple of {len(made)}"
                if isinstance(made, tuple)
                else type(made).__name__
            )
            raise TypeError(
                f"{self.api}: make must return (step, model, optimizer) ({_CONTRACT}), got {got}"
            )
        step, model, optimizer = made
        optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
        if not callable(step):
            raise TypeError(
                f"{self.api}: the step make returned is not callable ({_CONTRACT}), got "
                f"{type(step).__name__}"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"{self.api}: the model make returned is not an nn.Module ({_CONTRACT}), "
                f"got {type(model).__name__}"
            )
        if not optimizers or not all(is_optimizer(o) for o in optimizers):
            raise TypeError(
                f"{self.api}: the optimizer make returned is not a torch.optim.Optimizer or "
                f"a list of them ({_CONTRACT}), got {optimizer!r}"[:300]
            )
        if model in self.seen:
            raise TypeError(
                f"{self.api}: make returned the same model object as an earlier call, so the "
                "check would compare the pipeline with itself; build a fresh model, optimizer "
                "and step in every call of make(seed)"
            )
        self.seen.add(model)
        return step, model, optimizer


@contextlib.contextmanager
def default_dtype_kept() -> Iterator[None]:
    """Whatever the user's code does to ``torch.get_default_dtype()``, restore it."""
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


class Trial:
    def __init__(self, make: Make, transform: Any, seed: int) -> None:
        step, self.model, optimizer = make(seed)
        self.optimizers = (
            list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        )
        if isinstance(transform, TrialPipeline):
            transform = transform.build(self.model, optimizer)
        self.pipeline = transform(step) if transform is not None else step
        self.probe = Probe(self.model, self.optimizers)
        self.step = Transform("ampfn.testing", handler=self.probe)(self.pipeline)

    def run(
        self,
        batch: Any,
        poison: float | None = None,
        skip: bool = False,
        late: bool = False,
    ) -> list[tuple[int, bool]]:
        probe = self.probe
        probe.poison, probe.skip, probe.late, probe.nonfinite, probe.results = (
            poison,
            skip,
            late,
            set(),
            [],
        )
        with default_dtype_kept():
            self.step(batch)
        return probe.results

    def named_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            f"model.{n}": p for n, p in self.model.named_parameters()
        }
        for i, o in enumerate(self.optimizers):
            for j, g in enumerate(o.param_groups):
                for k, p in enumerate(g["params"]):
                    out.setdefault(f"optimizer[{i}].param_groups[{j}][{k}]", p)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "params": {n: t.detach().clone() for n, t in self.named_tensors().items()},
            "by_optimizer": [
                [p.detach().clone() for g in o.param_groups for p in g["params"]]
                for o in self.optimizers
            ],
            "optimizers": [
                copy.deepcopy(o.state_dict()["state"]) for o in self.optimizers
            ],
        }


def validate(api: str, make: object, transform: object, **counts: int) -> Maker:
    """Eager checks shared by every check: the contract's types and positive counts.
    Returns ``make``, checked at each call (:class:`Maker`)."""
    if not callable(make):
        raise TypeError(
            f"{api}: make must be a function make(seed) -> (step, model, optimizer), got {type(make).__name__}"
        )
    if not (callable(transform) or isinstance(transform, TrialPipeline)):
        raise TypeError(
            f"{api}: transform must be a transform or a TrialPipeline, got {type(transform).__name__}"
        )
    for name, value in counts.items():
        least = 1 if name == "steps" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{api}: {name} must be an int >= {least}, got {value!r}")
    return Maker(api, make)


def for_each_example(
    prop: Callable[[list[Any]], None],
    batches: Any,
    steps: int,
    settings: Any,
    shrink: bool = False,
) -> None:
    if isinstance(batches, st.SearchStrategy):
        base: Any = settings if settings is not None else hypothesis.settings.default
        # Shrinking a failing run of training steps can take minutes: report the first
        # failing example unless a minimal one is asked for (shrink=True).
        phases = [p for p in base.phases if shrink or p != hypothesis.Phase.shrink]
        chosen = hypothesis.settings(
            base,
            phases=phases,
            deadline=None,
            suppress_health_check=[
                hypothesis.HealthCheck.too_slow,
                hypothesis.HealthCheck.large_base_example,
            ],
        )

        @chosen
        @hypothesis.given(st.lists(batches, min_size=steps, max_size=steps))
        def check(drawn: list[Any]) -> None:
            prop(drawn)

        check()
    else:
        listed = list(batches)
        if not listed:
            raise ValueError("ampfn.testing: batches is an empty sequence")
        prop(list(itertools.islice(itertools.cycle(listed), max(steps, len(listed)))))


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit in shape, dtype and value, a NaN equal to a NaN in the same place
    (ranks that all went NaN together agree)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(
        a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    )


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two nested states differ (None when they are equal bit for bit, NaN equal to
    NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and same_tensor(a, b)
        )
        return None if ok else f"{path or 'value'}: {a!r} != {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{path}[{k!r}]")
            if d is not None:
                return d
        return None
    if (
        isinstance(a, (list, tuple))
        and isinstance(b, (list, tuple))
        and len(a) == len(b)
    ):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    same = a == b or (
        isinstance(a, float)
        and isinstance(b, float)
        and math.isnan(a)
        and math.isnan(b)
    )
    return None if same else f"{path or 'value'}: {a!r} != {b!r}"
