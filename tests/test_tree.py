"""Type-preserving container walks (_tree), without transformers: dict subclasses,
namedtuples, dataclasses, pytree-registered types and nested mixes."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from ampfn._tree import cast_floating, floating_devices, map_tensors


class Pair(NamedTuple):
    a: Any
    b: Any


class AttrDict(dict):  # type: ignore[type-arg]
    """A dict subclass with attribute access, as many model outputs are."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass
class Out:
    loss: Any
    logits: Any = None
    extra: int = 3


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: Any
    n: int = dataclasses.field(default=0, init=False)


class Registered(collections.OrderedDict):  # type: ignore[type-arg]
    """Like Hugging Face's ModelOutput: an OrderedDict subclass whose fields are also
    attributes, None fields dropped, registered with torch's pytree."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        for k, v in kwargs.items():
            if v is not None:
                self[k] = v
                object.__setattr__(self, k, v)
        self.built = True


pytree.register_pytree_node(
    Registered,
    lambda o: (list(o.values()), list(o.keys())),
    lambda values, keys: Registered(**dict(zip(keys, values, strict=True))),
)


class Tuple3(tuple):  # type: ignore[type-arg]
    pass


def test_dict_subclass_keeps_its_type_and_attribute_access() -> None:
    out = cast_floating(
        AttrDict(loss=torch.ones(1), ids=torch.ones(1).long()), torch.half
    )
    assert type(out) is AttrDict
    assert out.loss.dtype == torch.float16
    assert out.ids.dtype == torch.long


def test_registered_type_is_rebuilt_by_its_own_unflatten() -> None:
    out = cast_floating(Registered(loss=torch.ones(1), past=None), torch.bfloat16)
    assert type(out) is Registered
    assert out.built
    assert out["loss"].dtype == torch.bfloat16
    assert "past" not in out


def test_dataclasses_are_walked_and_frozen_ones_copied() -> None:
    src = Out(torch.ones(1), [torch.ones(2)])
    out = cast_floating(src, torch.half)
    assert type(out) is Out
    assert out.loss.dtype == out.logits[0].dtype == torch.float16
    assert out.extra == 3
    assert src.loss.dtype == torch.float32  # the input is not mutated
    frozen = cast_floating(Frozen(torch.ones(1)), torch.half)
    assert type(frozen) is Frozen
    assert frozen.x.dtype == torch.float16
    assert frozen.n == 0


def test_namedtuples_structseqs_and_tuple_subclasses_keep_their_types() -> None:
    pair = cast_floating(Pair(torch.ones(1), (torch.ones(1),)), torch.half)
    assert type(pair) is Pair
    assert pair.b[0].dtype == torch.float16
    maxed = cast_floating(torch.ones(2, 2).max(dim=0), torch.half)
    assert type(maxed) is torch.return_types.max
    assert maxed.values.dtype == torch.float16
    assert maxed.indices.dtype == torch.long
    t3 = cast_floating(Tuple3([torch.ones(1)]), torch.half)
    assert type(t3) is Tuple3
    assert t3[0].dtype == torch.float16


def test_defaultdict_keeps_its_factory() -> None:
    d: collections.defaultdict[str, Any] = collections.defaultdict(list)
    d["x"] = torch.ones(1)
    out = cast_floating(d, torch.half)
    assert type(out) is collections.defaultdict
    assert out.default_factory is list
    assert out["x"].dtype == torch.float16


def test_floating_devices_sees_through_every_container() -> None:
    value = Out(AttrDict(a=[Pair(torch.ones(1), 1)]), torch.ones(1).long())
    assert floating_devices(value, set()) == {"cpu"}
    assert floating_devices(Out(torch.ones(1).long()), set()) == set()


# --------------------------------------------------------------------------- the laws

_tensors = st.sampled_from([torch.float32, torch.float16, torch.int64]).map(
    lambda d: torch.ones(2, dtype=d)
)
_leaves = st.one_of(_tensors, st.none(), st.integers(0, 3), st.just("s"))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(["a", "b", "c"])
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.lists(children, max_size=3).map(Tuple3),
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(AttrDict),
        st.dictionaries(keys, children, max_size=3).map(collections.OrderedDict),
        st.dictionaries(keys, children, max_size=3).map(lambda d: Registered(**d)),
        st.builds(Pair, children, children),
        st.builds(Out, children, children),
        st.builds(Frozen, children),
    )


trees = st.recursive(_leaves, _containers, max_leaves=12)


def _same_shape(a: Any, b: Any, dtype: torch.dtype) -> None:
    """``b`` is ``a`` cast: same types and keys at every node, floating tensors in
    ``dtype``, everything else the very same object."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            assert b.dtype == dtype
            assert torch.equal(a.to(dtype), b)
        else:
            assert b is a
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same_shape(a[k], b[k], dtype)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_shape(x, y, dtype)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same_shape(getattr(a, f.name), getattr(b, f.name), dtype)
    else:
        assert b is a


@given(trees, st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
def test_law_casting_preserves_types_and_structure(
    tree: Any, dtype: torch.dtype
) -> None:
    _same_shape(tree, cast_floating(tree, dtype), dtype)


@given(trees)
def test_law_casting_to_the_dtype_it_has_is_the_identity(tree: Any) -> None:
    once = cast_floating(tree, torch.float16)
    assert cast_floating(once, torch.float16) is once


@given(trees)
def test_law_identity_map_returns_the_same_object(tree: Any) -> None:
    assert map_tensors(lambda t: t, tree) is tree
