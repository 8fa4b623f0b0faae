"""Layer 4, building block: type-preserving walks over the containers a step's inputs and
outputs are.

:func:`map_tensors` applies a function to every tensor nested in a value and rebuilds each
container with its own type; :func:`cast_floating` casts the floating tensors with it, and
:func:`floating_devices` collects their device types. The containers walked:

- ``tuple``, ``list`` and ``dict`` themselves, and namedtuples (rebuilt with ``_make``);
- every type registered with ``torch.utils._pytree`` (``OrderedDict``, ``defaultdict``,
  ``deque``, torch's structseqs, and Hugging Face's ``ModelOutput`` subclasses, which
  transformers registers: they are rebuilt by their own unflatten, so ``out.loss`` and
  the ``None`` fields behave as a fresh output of the model's);
- any other dict, list or tuple subclass: a shallow copy of the value, of its own type,
  with the changed items set through the subclass's own ``__setitem__`` (a tuple subclass
  is called with the new items);
- dataclass instances: a shallow copy with the changed fields set (frozen ones
  included, ``__init__`` and ``__post_init__`` are not run again).

Nothing is ever rebuilt as a plain ``dict`` or ``tuple``. A container in which nothing
changed is returned as it is (the same object), so casting to the dtype the tensors
already have is the identity. Anything else (a Hugging Face ``Cache``, a string) is a leaf.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def map_tensors(fn: TensorFn, obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor nested in it, each container rebuilt with
    its own type (see the module docstring); ``obj`` itself if nothing changed."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    kind = type(obj)
    if kind is tuple or kind is list:
        items = [map_tensors(fn, o) for o in obj]
        if _unchanged(items, obj):
            return obj
        return tuple(items) if kind is tuple else items
    if kind is dict:
        new = {k: map_tensors(fn, v) for k, v in obj.items()}
        return obj if all(new[k] is v for k, v in obj.items()) else new
    if isinstance(obj, tuple) and pytree.is_namedtuple_instance(obj):
        items = [map_tensors(fn, o) for o in obj]
        if _unchanged(items, obj):
            return obj
        return obj._make(items)  # type: ignore[attr-defined]
    node = pytree.SUPPORTED_NODES.get(kind)
    if node is not None:
        children, context = node.flatten_fn(obj)
        new_children = [map_tensors(fn, c) for c in children]
        if _unchanged(new_children, children):
            return obj
        return node.unflatten_fn(new_children, context)
    if isinstance(obj, (dict, list)):
        keys = obj.keys() if isinstance(obj, dict) else range(len(obj))
        changed = [(k, n) for k in keys if (n := map_tensors(fn, obj[k])) is not obj[k]]
        if not changed:
            return obj
        copied = copy.copy(obj)
        for k, n in changed:
            copied[k] = n
        return copied
    if isinstance(obj, tuple):
        items = [map_tensors(fn, o) for o in obj]
        if _unchanged(items, obj):
            return obj
        return kind(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [
            (f.name, old, new)
            for f in dataclasses.fields(obj)
            if (new := map_tensors(fn, old := getattr(obj, f.name))) is not old
        ]
        if not fields:
            return obj
        shallow = copy.copy(obj)
        for name, _, new in fields:
            object.__setattr__(shallow, name, new)
        return shallow
    return obj


def _unchanged(new: list[Any], old: Any) -> bool:
    return all(n is o for n, o in zip(new, old, strict=True))


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor nested in ``obj`` to ``dtype``, keeping container types."""
    if isinstance(obj, torch.Tensor):  # the common case, in one frame
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    return map_tensors(_Cast(dtype), obj)


class _Cast:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (
            t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t
        )


def floating_devices(obj: Any, found: set[str]) -> set[str]:
    """The device types of the floating tensors in ``obj`` (nested as for
    :func:`map_tensors`), added to ``found``."""

    def see(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            found.add(t.device.type)
        return t

    map_tensors(see, obj)
    return found
