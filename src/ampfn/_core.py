"""The vocabulary: transforms, pipelines and ``compose``.

A *step* is any callable. A *transform* maps a step to a new step; the ``with_*``
factories build :class:`Transform` objects, which record on the wrapped step the
pipeline's tags (for conflict checks) and its stateful parts (for checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import torch

P = ParamSpec("P")
R = TypeVar("R")


class Stateful(Protocol):
    """What a stateful transform exposes for checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


# Tags that may appear once per pipeline, and pairs of tags that exclude each other.
_EXCLUSIVE = {
    "loss_scaling": "two loss-scaling transforms in one pipeline ({names}); keep exactly one",
}
_INCOMPATIBLE = {
    frozenset({"loss_scaling", "xla_bf16"}): (
        "with_xla_bf16 composed with a loss-scaling transform ({names}): bfloat16 has "
        "float32's range and needs no loss scaling; remove the scaling transform"
    ),
}

Tags = tuple[tuple[str, str], ...]  # (tag, transform name)
States = tuple[tuple[str, Stateful], ...]  # (transform name, stateful object)


def compute_tag(dtype: torch.dtype) -> str:
    """The tag recording the lowest precision a transform computes in."""
    return f"compute:{dtype}".replace("torch.", "")


def compute_dtype(wrapped_step: Callable[..., Any]) -> torch.dtype:
    """The lowest-precision dtype the pipeline around ``wrapped_step`` computes in
    (float32 for a plain step): the one with the largest machine epsilon."""
    dtypes = [torch.float32]
    for tag, _ in getattr(wrapped_step, "__ampfn_tags__", ()):
        if tag.startswith("compute:"):
            dtypes.append(getattr(torch, tag.removeprefix("compute:")))
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def check_tags(tags: Tags) -> None:
    """Raise ``ValueError`` if a pipeline's tags conflict."""
    seen: dict[str, list[str]] = {}
    for tag, name in tags:
        seen.setdefault(tag, []).append(name)
    for tag, message in _EXCLUSIVE.items():
        if len(seen.get(tag, ())) > 1:
            raise ValueError("compose: " + message.format(names=", ".join(seen[tag])))
    for pair, message in _INCOMPATIBLE.items():
        if all(t in seen for t in pair):
            names = ", ".join(n for t in sorted(pair) for n in seen[t])
            raise ValueError("compose: " + message.format(names=names))


class Transform:
    """A named step transform built by one of the ``with_*`` factories.

    Calling it on a step returns a new step (the original is never modified) that keeps
    the original's ``__name__``, ``__doc__`` and ``__wrapped__``, and records the
    pipeline's tags (for conflict checks) and stateful parts (for :func:`state_dict`).
    """

    __slots__ = ("_wrap", "name", "state", "tags")

    def __init__(
        self,
        name: str,
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
        *,
        tags: Iterable[str] = (),
        state: Stateful | None = None,
    ) -> None:
        self.name = name
        self._wrap = wrap
        self.tags: Tags = tuple((t, name) for t in tags)
        self.state = state

    def __call__(self, step: Callable[P, R]) -> Callable[P, R]:
        if not callable(step):
            raise TypeError(
                f"{self.name}(step): expected a callable step, got {type(step).__name__}"
            )
        inner_tags: Tags = getattr(step, "__ampfn_tags__", ())
        check_tags(self.tags + inner_tags)
        wrapped = functools.update_wrapper(self._wrap(step), step)
        wrapped.__ampfn_tags__ = self.tags + inner_tags  # type: ignore[attr-defined]
        inner_states: States = getattr(step, "__ampfn_states__", ())
        own: States = ((self.name, self.state),) if self.state is not None else ()
        wrapped.__ampfn_states__ = own + inner_states  # type: ignore[attr-defined]
        return cast(Callable[P, R], wrapped)

    def __repr__(self) -> str:
        return f"<ampfn transform {self.name}>"


class Pipeline:
    """The result of :func:`compose`: applies its transforms in decorator order."""

    __slots__ = ("transforms",)

    def __init__(self, transforms: tuple[Callable[..., Any], ...]) -> None:
        self.transforms = transforms

    def __call__(self, step: Callable[P, R]) -> Callable[P, R]:
        for transform in reversed(self.transforms):
            step = transform(step)
        return step

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self.transforms))})"


def compose(
    *transforms: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Pipeline:
    """Compose transforms in decorator order: ``compose(a, b, c)(f) == a(b(c(f)))``.

    ``compose()`` is the identity (it returns the step itself) and composition is
    associative, so a stack of decorators and a ``compose`` of the same transforms build
    the same pipeline. Any ``Callable[[Step], Step]`` may take part; ampfn's own
    transforms are also checked for conflicts here (two loss scalers, loss scaling with
    XLA bf16). Your own transforms should keep the step's attributes
    (``functools.wraps``): that is how :func:`state_dict` and the conflict checks see
    the transforms inside them.

    Raises:
        TypeError: a transform is not callable (the message names its position).
        ValueError: the pipeline combines transforms that exclude each other.

    Example:
        >>> import torch, ampfn
        >>> pipeline = ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu"))
        >>> train_step = pipeline(lambda batch: batch)
    """
    flat: list[Callable[..., Any]] = []
    for i, t in enumerate(transforms):
        if not callable(t):
            raise TypeError(
                f"compose(*transforms): transform at position {i} is not callable: {t!r}"
            )
        flat.extend(t.transforms if isinstance(t, Pipeline) else (t,))
    check_tags(tuple(tag for t in flat if isinstance(t, Transform) for tag in t.tags))
    return Pipeline(tuple(flat))
