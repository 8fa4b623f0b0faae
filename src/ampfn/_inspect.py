"""Layer 5, tool: ``inspect_precision``, where a pipeline loses precision and what to keep in fp32.

One step of the fp32 reference (``make(seed)``'s step, no transform) and one of the
pipeline (the transform on a second ``make(seed)``) run on the same batch under
:class:`~ampfn._inspect_hooks.Capture`; :mod:`ampfn._inspect_compare` turns the two into
a :class:`~ampfn._inspect_report.PrecisionReport`. When it suggests islands, a third
``make(seed)`` with those modules wrapped in :class:`~ampfn._islands.FP32Island` checks
the suggestion.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ampfn._args import is_optimizer
from ampfn._checkpoint import load_state_dict, state_dict
from ampfn._inspect_compare import (
    choose_islands,
    compare_modules,
    relative_error,
    worst_first,
)
from ampfn._inspect_hooks import Capture
from ampfn._inspect_report import PrecisionReport
from ampfn._islands import FP32Island
from ampfn._scaling import loss_scale
from ampfn._transform import BOUND, Pipeline, Transform, compute_dtype

_API = "inspect_precision(make, transform, batch, *, seed, tolerance)"
_TOLERANCE_EPS = (
    4  # a module introducing more than 4 eps of its compute dtype is a problem
)
Made = tuple[Callable[[Any], Any], nn.Module, Any]


def _check_transform(transform: object) -> None:
    if getattr(transform, "__ampfn_factory__", False):
        raise TypeError(
            f"{_API}: transform is the factory {getattr(transform, '__name__', transform)}, "
            "not a transform: call it (ampfn.with_autocast('bf16'), not ampfn.with_autocast)"
        )
    if isinstance(transform, (Transform, Pipeline)):
        bound = _bound(transform)
        if bound is not None:
            raise TypeError(
                f"{_API}: transform holds {bound}, built on your model and optimizer, but "
                "the pipeline runs on a fresh make(seed); pass an object with "
                "build(model, optimizer) -> transform that builds it on the model it gets, "
                "such as ampfn.testing.TrialPipeline('O2', lambda m, o: "
                "ampfn.with_apex('O2', m, o))"
            )
        return
    if callable(getattr(transform, "build", None)) or callable(transform):
        return
    raise TypeError(
        f"{_API}: transform must be a transform (ampfn.compose(...), ampfn.with_*(...)) or "
        f"an object with build(model, optimizer) -> transform (ampfn.testing.TrialPipeline), "
        f"got {type(transform).__name__}"
    )


def _bound(transform: object) -> str | None:
    """The name of a transform in ``transform`` built on a user's model, or None."""
    if isinstance(transform, Pipeline):
        return next(filter(None, map(_bound, transform.transforms)), None)
    if isinstance(transform, Transform):
        return next((name for tag, name in transform.tags if tag == BOUND), None)
    return None


def _check(make: object, transform: object, seed: object, tolerance: object) -> None:
    if not callable(make):
        raise TypeError(
            f"{_API}: make must be a function make(seed) -> (step, model, optimizer), "
            f"got {type(make).__name__}"
        )
    _check_transform(transform)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{_API}: seed must be an int, got {type(seed).__name__}")
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise TypeError(
                f"{_API}: tolerance must be a float or None, got {type(tolerance).__name__}"
            )
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(
                f"{_API}: tolerance must be a finite float >= 0, got {tolerance!r}"
            )


def _made(make: Callable[[int], Any], seed: int) -> Made:
    made = make(seed)
    if not (isinstance(made, tuple) and len(made) == 3):
        raise TypeError(
            f"{_API}: make(seed) must return (step, model, optimizer), got {type(made).__name__}"
        )
    step, model, optimizer = made
    if not callable(step):
        raise TypeError(
            f"{_API}: make(seed)'s step must be callable, got {type(step).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{_API}: make(seed)'s model must be an nn.Module, got {type(model).__name__}"
        )
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not all(is_optimizer(o) for o in optimizers):
        raise TypeError(
            f"{_API}: make(seed)'s optimizer must be a torch.optim.Optimizer (or a list of them), "
            f"got {type(optimizer).__name__}"
        )
    return step, model, optimizer


def _shares(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return a is b or any(id(p) in ids for p in b.parameters())


def _wrap_islands(model: nn.Module, islands: tuple[str, ...]) -> None:
    for name in islands:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FP32Island(parent.get_submodule(child)))


def _run(
    made: Made, transform: object, batch: Any, seed: int
) -> tuple[Capture, Callable[[Any], Any]]:
    step, model, optimizer = made
    if transform is not None and not isinstance(transform, (Transform, Pipeline)):
        build = getattr(transform, "build", None)
        transform = build(model, optimizer) if callable(build) else transform
    wrapped: Callable[[Any], Any] = transform(step) if transform is not None else step  # type: ignore[operator]
    scale = loss_scale(wrapped)
    saved = copy.deepcopy(state_dict(wrapped))  # the caller's scaler, if it holds one
    capture = Capture(model, 1.0 if scale is None else scale)
    _seed(seed)
    try:
        capture.run(wrapped, batch)
    finally:
        load_state_dict(wrapped, saved)
    return capture, wrapped


def _seed(seed: int) -> None:
    """``torch.manual_seed``, without queueing a lazy CUDA seed on a machine that has
    not initialized CUDA (which costs milliseconds a call)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.manual_seed_all(seed)


def _loss_error(pipeline: Capture, reference: Capture) -> float:
    """The losses' relative error; NaN when the step gave ``ampfn.backward`` none."""
    if not reference.losses:
        return math.nan
    return relative_error(
        [torch.tensor(pipeline.losses)], [torch.tensor(reference.losses)]
    )


def _grads(pipeline: Capture, reference: Capture) -> tuple[float, float]:
    """(underflow fraction, relative error) of the true gradients."""
    names = sorted(reference.grads)
    ref = [reference.grads[n] for n in names]
    pipe = [pipeline.grads.get(n, torch.zeros_like(reference.grads[n])) for n in names]
    nonzero = sum(int((r != 0).sum()) for r in ref)
    lost = sum(int(((r != 0) & (p == 0)).sum()) for r, p in zip(ref, pipe, strict=True))
    return (lost / nonzero if nonzero else 0.0), relative_error(pipe, ref)


def _unwrapped_name(name: str, islands: tuple[str, ...]) -> str | None:
    """The reference's name for a module of the re-run (islands hold ``.module``)."""
    for island in islands:
        inner = island + ".module"
        if name == inner:
            return None
        if name.startswith(inner + "."):
            return island + name[len(inner) :]
    return name


def inspect_precision(
    make: Callable[[int], Any],
    transform: Any,
    batch: Any,
    *,
    seed: int = 0,
    tolerance: float | None = None,
) -> PrecisionReport:
    """Find where a pipeline loses precision against fp32, and which modules to keep fp32.

    Runs one step of the fp32 reference (``make(seed)``'s step as it is) and one of the
    pipeline (``transform`` applied to a second ``make(seed)``'s step) on ``batch``,
    capturing every named submodule's output and every parameter's true (unscaled)
    gradient. The global RNG is seeded with ``seed`` before each step and restored
    after; hooks are removed; a scaler inside ``transform`` is put back as it was.

    It costs the two steps and the comparison (about 2-3x one training step on CPU,
    ``benchmarks/inspect_cost.py``), plus a third step when there are islands to
    verify, and holds a copy of every module's inputs and outputs of both steps. A
    gradient is read as autograd accumulates it: exact for a step with one backward, or
    with several accumulating in place; where something moves gradients between
    backwards (Apex's several losses), only the last backward's part is seen.

    Args:
        make: ``make(seed) -> (step, model, optimizer)``, a fresh model each call (the
            ``ampfn.testing`` convention); the step calls ``ampfn.backward`` and
            ``ampfn.step``.
        transform: the pipeline: a transform (``ampfn.compose(...)``), or, for
            transforms built from the model (``with_apex``, ``with_policy``,
            ``with_float8``), an object with ``build(model, optimizer) -> transform``,
            such as ``ampfn.testing.TrialPipeline``.
        batch: the batch both steps get.
        seed: passed to ``make``, and the RNG seed of each step.
        tolerance: the introduced relative error above which a module is a problem;
            None for 4 machine epsilons of the pipeline's compute dtype.

    Returns:
        A :class:`~ampfn.PrecisionReport`; its ``islands`` were re-run wrapped in
        ``ampfn.fp32`` to fill its ``residual_*`` fields.

    Raises:
        TypeError: ``make`` is not callable, ``transform`` is not a transform (or is
            one built on a model of yours, which the fresh ``make(seed)`` models would
            not get), or ``make(seed)`` does not return ``(step, model, optimizer)``.
        ValueError: ``make`` returned the same model (or parameters) twice, or a bad
            ``tolerance``.

    Example:
        >>> import torch, ampfn
        >>> def make(seed):
        ...     torch.manual_seed(seed)
        ...     model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     def step(x):
        ...         ampfn.backward(model(x).square().mean())
        ...         return ampfn.step(opt)
        ...     return step, model, opt
        >>> report = ampfn.inspect_precision(make, ampfn.with_autocast("bf16", "cpu"), torch.randn(4, 8))
        >>> report.islands
        ()
    """
    _check(make, transform, seed, tolerance)
    devices = (
        list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]
    )
    with torch.random.fork_rng(devices=devices):
        ref_made = _made(make, seed)
        pipe_made = _made(make, seed)
        if _shares(ref_made[1], pipe_made[1]):
            raise ValueError(
                f"{_API}: make(seed) returned the same model (or the same parameters) on "
                "two calls; build a fresh model and optimizer inside make"
            )
        reference, _ = _run(ref_made, None, batch, seed)
        pipeline, wrapped = _run(pipe_made, transform, batch, seed)
        dtype = compute_dtype(wrapped)
        tol = (
            _TOLERANCE_EPS * torch.finfo(dtype).eps
            if tolerance is None
            else float(tolerance)
        )
        modules = compare_modules(
            pipeline.records, reference.records, torch.finfo(dtype).max
        )
        float8 = any(
            tag == "float8" for tag, _ in getattr(wrapped, "__ampfn_tags__", ())
        )
        kinds = {m.name: m.type_name for m in modules}
        islands = choose_islands(
            modules,
            tol,
            (lambda n: kinds[n] == "Float8Linear") if float8 else (lambda n: True),
        )
        underflow, grad_error = _grads(pipeline, reference)
        residual: float | None = None
        still: tuple[str, ...] = ()
        if islands:
            made = _made(make, seed)
            _wrap_islands(made[1], islands)
            rerun, _ = _run(made, transform, batch, seed)
            residual = _loss_error(rerun, reference)
            renamed = {}
            for name, rec in rerun.records.items():
                ref_name = _unwrapped_name(name, islands)
                if ref_name is not None:
                    renamed[ref_name] = rec
            again = compare_modules(renamed, reference.records, torch.finfo(dtype).max)
            still = tuple(m.name for m in again if m.nonfinite)
    scale = pipeline.scale if loss_scale(wrapped) is not None else None
    return PrecisionReport(
        pipeline=repr(transform),
        compute_dtype=str(dtype).removeprefix("torch."),
        modules=worst_first(modules),
        islands=islands,
        tolerance=tol,
        loss_error=_loss_error(pipeline, reference),
        loss_scale=scale,
        grad_underflow=underflow,
        grad_error=grad_error,
        residual_loss_error=residual,
        residual_nonfinite=still,
    )
