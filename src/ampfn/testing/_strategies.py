"""Layer 7, testing: hypothesis strategies, half-precision edge values, batches, loss-scale settings, pipelines."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from hypothesis import strategies as st

import ampfn
from ampfn._transform import Pipeline, Transform

NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def edge_values(probe: torch.dtype = torch.float16) -> st.SearchStrategy[float]:
    """float32 values at the edges of ``probe``'s range.

    Near its largest finite value (fp16: 65504), just above it (finite in fp32, inf in
    ``probe``), its subnormals and below them (underflow to 0), around its epsilon, and
    ordinary magnitudes, with both signs.
    """
    fi = torch.finfo(probe)
    big, normal = float(fi.max), float(fi.smallest_normal)
    subnormal = normal * float(fi.eps)
    f32 = float(torch.finfo(torch.float32).max)

    def band(lo: float, hi: float) -> st.SearchStrategy[float]:
        lo, hi = (float(torch.tensor(v, dtype=torch.float32)) for v in (lo, hi))
        tiny = lo < torch.finfo(torch.float32).smallest_normal
        mag = st.floats(min_value=lo, max_value=hi, width=32, allow_subnormal=tiny)
        return st.tuples(mag, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])

    return st.one_of(
        st.sampled_from(
            [
                0.0,
                -0.0,
                big,
                -big,
                normal,
                -normal,
                subnormal,
                -subnormal,
                float(fi.eps),
            ]
        ),
        band(big / 4, big),  # near the largest finite value
        band(big, min(big * 64, f32)),  # overflows in probe, finite in fp32
        band(subnormal, normal),  # subnormals
        band(
            max(subnormal / 2**10, 2e-45), subnormal / 2
        ),  # underflows to zero in probe
        band(1e-3, 1e3),  # ordinary
    )


def tensors(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    probe: torch.dtype | None = torch.float16,
    nonfinite: str | None = None,
    at: Sequence[int] | None = None,
    max_edges: int = 8,
) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of ``shape`` whose values probe ``probe``'s edges, cast to ``dtype``.

    A tensor is standard-normal noise (from a drawn seed) times a magnitude drawn from
    :func:`edge_values`, with up to ``max_edges`` elements replaced by other edge
    values, so the whole tensor can sit near fp16's max or among its subnormals while a
    few elements stray; this stays cheap to draw and to shrink at any size.

    Args:
        shape: the tensor's shape.
        dtype: the result's dtype (values beyond its range become inf, as a cast does).
        probe: whose edges to probe; None for plain standard-normal values.
        nonfinite: None, "inf", "-inf", "nan" or "any": inject that value...
        at: ...at these flat positions; None draws one position.
        max_edges: how many single elements may take their own edge value.

    Example:
        >>> from hypothesis import given
        >>> from ampfn.testing import tensors
        >>> @given(tensors((2, 3), nonfinite="nan", at=[0]))
        ... def test_first_is_nan(t):
        ...     assert t.shape == (2, 3) and t[0, 0].isnan()
        >>> test_first_is_nan()
    """
    api = "tensors(shape, ...)"
    if nonfinite is not None and nonfinite not in (*NONFINITE, "any"):
        raise ValueError(
            f"{api}: nonfinite must be None, 'inf', '-inf', 'nan' or 'any', got {nonfinite!r}"
        )
    numel = math.prod(int(n) for n in shape)
    if at is not None and any(not 0 <= i < numel for i in at):
        raise ValueError(
            f"{api}: positions {list(at)} are outside a tensor of {numel} elements"
        )
    seeds = st.integers(0, 2**32 - 1)
    if probe is None or numel == 0:
        magnitude: st.SearchStrategy[float] = st.just(1.0)
        edges: st.SearchStrategy[list[tuple[int, float]]] = st.just([])
    else:
        magnitude = st.one_of(st.just(1.0), edge_values(probe).map(abs))
        edges = st.lists(
            st.tuples(st.integers(0, numel - 1), edge_values(probe)),
            max_size=min(numel, max_edges),
        )
    if nonfinite is None or numel == 0:
        kinds: st.SearchStrategy[str | None] = st.none()
    else:
        kinds = (
            st.sampled_from(sorted(NONFINITE))
            if nonfinite == "any"
            else st.just(nonfinite)
        )
    where = (
        st.just(list(at))
        if at is not None
        else st.integers(0, max(numel - 1, 0)).map(lambda i: [i])
    )

    def build(
        drawn: tuple[int, float, list[tuple[int, float]], str | None, list[int]],
    ) -> torch.Tensor:
        seed, mag, overrides, kind, positions = drawn
        flat = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * mag
        for i, v in overrides:
            flat[i] = v
        if kind is not None:
            flat[positions] = NONFINITE[kind]
        return flat.reshape(tuple(shape)).to(dtype)

    return st.tuples(seeds, magnitude, edges, kinds, where).map(build)


def batches(
    shape: Sequence[int],
    *,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
    probe: torch.dtype | None = None,
    device: str = "cpu",
) -> st.SearchStrategy[Any]:
    """One batch: an input tensor of ``shape``, with class targets when ``num_classes``.

    Returns ``x``, or ``(x, y)`` with ``y`` of shape ``shape[0]`` in ``[0, num_classes)``.
    The inputs are standard-normal; ``probe=torch.float16`` draws them like
    :func:`tensors` instead, at the edges of fp16.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            f"batches(shape, ...): num_classes must be a positive int or None, got {num_classes!r}"
        )
    if not shape:
        raise ValueError("batches(shape, ...): shape needs a batch dimension, got ()")
    x = tensors(shape, dtype, probe=probe).map(lambda t: t.to(device))
    if num_classes is None:
        return x
    y = st.lists(st.integers(0, num_classes - 1), min_size=shape[0], max_size=shape[0])
    return st.tuples(
        x, y.map(lambda v: torch.tensor(v, dtype=torch.long, device=device))
    )


class LossScaleSettings(NamedTuple):
    """Settings of a dynamic loss scaler; :meth:`grad_scaler` builds one."""

    init_scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: int

    def grad_scaler(self, device: str = "cpu") -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device, **self._asdict())


def loss_scale_settings(max_interval: int = 8) -> st.SearchStrategy[LossScaleSettings]:
    """Valid ``torch.amp.GradScaler`` settings: powers of two, short growth intervals."""
    if (
        isinstance(max_interval, bool)
        or not isinstance(max_interval, int)
        or max_interval < 1
    ):
        raise ValueError(
            f"loss_scale_settings(max_interval): expected a positive int, got {max_interval!r}"
        )
    return st.builds(
        LossScaleSettings,
        init_scale=st.integers(0, 24).map(lambda k: 2.0**k),
        growth_factor=st.sampled_from([1.5, 2.0, 4.0]),
        backoff_factor=st.sampled_from([0.25, 0.5, 0.75]),
        growth_interval=st.integers(1, max_interval),
    )


@dataclasses.dataclass(frozen=True)
class TrialPipeline:
    """A pipeline built afresh for each trial from the trial's model and optimizer.

    Checks accept it wherever they accept a transform; use it for transforms that hold
    state (a scaler) or change the model (``with_apex`` O2/O3).
    """

    name: str
    build: Callable[
        [torch.nn.Module, Any], Callable[[Callable[..., Any]], Callable[..., Any]]
    ]
    skips_nonfinite: bool = False

    def __repr__(self) -> str:
        return f"TrialPipeline({self.name!r})"


def _autocast_ok(device: str, dtype: torch.dtype) -> bool:
    try:
        ampfn.with_autocast(dtype, device)
    except (ValueError, TypeError):
        return False
    return True


def available_pipelines(
    device: str = "cpu", *, skipping: bool | None = None
) -> list[TrialPipeline]:
    """Every pipeline ampfn can build on ``device`` here, as :class:`TrialPipeline` s.

    ``skipping=True`` keeps those that skip non-finite steps (dynamic loss scaling),
    ``False`` the others, None all.
    """
    out: list[TrialPipeline] = []
    if device == "xla":
        if importlib.util.find_spec("torch_xla") is not None:
            out.append(TrialPipeline("xla-bf16", _xla))
    else:
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            if _autocast_ok(device, dtype):
                out.append(
                    TrialPipeline(
                        f"autocast-{name}", functools.partial(_autocast, dtype, device)
                    )
                )
                out.append(
                    TrialPipeline(
                        f"scaling+autocast-{name}",
                        functools.partial(_scaled_autocast, dtype, device),
                        skips_nonfinite=True,
                    )
                )
        if _autocast_ok(device, torch.float16):
            out.append(
                TrialPipeline(
                    "sync-free-scaling+autocast-fp16",
                    functools.partial(
                        _scaled_autocast, torch.float16, device, sync=False
                    ),
                    skips_nonfinite=True,
                )
            )
            for level in ("O1", "O2", "O3"):
                build = functools.partial(_apex, level)
                out.append(
                    TrialPipeline(f"apex-{level}", build, skips_nonfinite=level != "O3")
                )
        for name, kwargs in _POLICIES.items():
            out.append(
                TrialPipeline(
                    name,
                    functools.partial(_policy, kwargs),
                    skips_nonfinite="scaling" in name,
                )
            )
    return [p for p in out if skipping is None or p.skips_nonfinite == skipping]


_POLICIES: dict[str, dict[str, Any]] = {
    "bf16-true": {"policy": "bf16-true"},
    "bf16-true+master": {"policy": "bf16-true", "master_weights": True},
    "bf16-true+sr": {"policy": "bf16-true", "stochastic_rounding": True},
    "16-true+master+scaling": {"policy": "16-true", "master_weights": True},
}


def _policy(kwargs: dict[str, Any], model: Any, optimizer: Any) -> Any:
    options = dict(kwargs)
    transform = ampfn.with_policy(options.pop("policy"), model, optimizer, **options)
    if kwargs["policy"] == "16-true":
        scaler = torch.amp.GradScaler(
            _device(model), init_scale=2.0**10, growth_interval=4
        )
        return ampfn.compose(ampfn.with_grad_scaling(scaler), transform)
    return transform


def _device(model: Any) -> str:
    return next(model.parameters()).device.type  # type: ignore[no-any-return]


def _autocast(dtype: torch.dtype, device: str, model: Any, optimizer: Any) -> Transform:
    return ampfn.with_autocast(dtype, device)


def _scaled_autocast(
    dtype: torch.dtype, device: str, model: Any, optimizer: Any, sync: bool = True
) -> Pipeline:
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=4)
    return ampfn.compose(
        ampfn.with_grad_scaling(scaler, sync=sync), ampfn.with_autocast(dtype, device)
    )


def _apex(level: str, model: Any, optimizer: Any) -> Transform:
    return ampfn.with_apex(level, model, optimizer, backend="native")


def _xla(model: Any, optimizer: Any) -> Transform:
    return ampfn.with_xla_bf16()


def pipelines(
    device: str = "cpu", *, skipping: bool | None = None
) -> st.SearchStrategy[TrialPipeline]:
    """Draw one of :func:`available_pipelines`."""
    return st.sampled_from(available_pipelines(device, skipping=skipping))
