"""Layer 5, tool: the precision inspector's numbers, from two captured steps.

Relative errors are norm-wise, computed in float64: ``||pipeline - fp32|| / ||fp32||``
over the elements where fp32 is finite, inf where the pipeline is inf/NaN and fp32 is
not. A module *introduces* the part of its output's error beyond its input's. The
islands are the innermost modules that introduce a problem (inf/NaN from finite input,
or an introduced error above the tolerance), neither their parents nor the later
modules that only inherit it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ampfn._inspect_hooks import Record
from ampfn._inspect_report import ModuleReport


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


def relative_error(
    pipeline: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> float:
    """The norm-wise relative error of ``pipeline`` against ``reference`` (see above);
    inf when their shapes differ."""
    if [t.shape for t in pipeline] != [t.shape for t in reference]:
        return math.inf
    return _relative(_flat(pipeline), _flat(reference))


def _relative(p: torch.Tensor, r: torch.Tensor) -> float:
    if p.shape != r.shape:
        return math.inf
    if not bool(r.isfinite().all()):  # compare where fp32 is finite (rare: a slow path)
        finite = r.isfinite()
        p, r = p[finite], r[finite]
    if not bool(p.isfinite().all()):
        return math.inf
    diff = float(torch.linalg.vector_norm(p - r))
    if diff == 0.0:
        return 0.0
    norm = float(torch.linalg.vector_norm(r))
    return diff / norm if norm > 0 else math.inf


def _nonfinite(p: torch.Tensor, r: torch.Tensor) -> bool:
    """The pipeline holds inf/NaN where the reference does not."""
    if p.shape != r.shape or bool(p.isfinite().all()):
        return False
    return bool((~p.isfinite() & r.isfinite()).any())


def _stats(
    p: torch.Tensor, r: torch.Tensor, tiny: float, largest: float
) -> tuple[float, float, float]:
    """(max finite |value|, headroom in bits to ``largest``, fraction flushed)."""
    if not p.numel():
        return 0.0, math.inf, 0.0
    a = p.abs()
    top = float(a.max())
    headroom = math.log2(largest / top) if top > 0 else math.inf
    if not math.isfinite(top):  # inf/NaN: no headroom left, and the largest finite one
        finite = a[a.isfinite()]
        top = float(finite.max()) if finite.numel() else 0.0
        headroom = -math.inf
    flushed = 0.0
    if r.shape == p.shape:
        nonzero = r != 0
        count = int(nonzero.sum())
        if count:
            # fp32 values below the output dtype's normal range: in the pipeline they
            # flushed to zero or to subnormals (a ReLU's sign flip is not a flush)
            flushed = int((nonzero & (r.abs() < tiny)).sum()) / count
    return top, headroom, flushed


def compare_modules(
    pipeline: dict[str, Record], reference: dict[str, Record], largest: float
) -> list[ModuleReport]:
    """One report per module that ran in both steps, in the order they first ran."""
    out = []
    for name, rec in pipeline.items():
        ref = reference.get(name)
        if ref is None:
            continue
        p_out, r_out = _flat(rec.outputs), _flat(ref.outputs)
        p_in, r_in = _flat(rec.inputs), _flat(ref.inputs)
        error = _relative(p_out, r_out)
        carried = _relative(p_in, r_in)
        nonfinite = _nonfinite(p_out, r_out)
        made_nonfinite = nonfinite and not _nonfinite(p_in, r_in)
        if math.isinf(error):
            introduced = 0.0 if math.isinf(carried) else math.inf
        else:
            introduced = max(0.0, error - carried) if math.isfinite(carried) else 0.0
        tiny = min((torch.finfo(t.dtype).tiny for t in rec.outputs), default=0.0)
        top, headroom, flushed = _stats(p_out, r_out, tiny, largest)
        dtype = str(rec.outputs[0].dtype).removeprefix("torch.") if rec.outputs else "-"
        out.append(
            ModuleReport(
                name=name,
                type_name=rec.type_name,
                forward_error=error,
                introduced_error=introduced,
                nonfinite=nonfinite,
                introduces_nonfinite=made_nonfinite,
                max_abs=top,
                headroom_bits=headroom,
                flushed=flushed,
                dtype=dtype,
            )
        )
    return out


def _depth(name: str) -> int:
    return name.count(".") + 1


def worst_first(modules: list[ModuleReport]) -> tuple[ModuleReport, ...]:
    """Non-finite makers first, then by introduced error; inner modules first on a tie,
    then the order they ran."""
    order = {m.name: i for i, m in enumerate(modules)}
    return tuple(
        sorted(
            modules,
            key=lambda m: (
                not m.introduces_nonfinite,
                -m.introduced_error,
                -_depth(m.name),
                order[m.name],
            ),
        )
    )


def choose_islands(
    modules: Sequence[ModuleReport],
    tolerance: float,
    candidate: Callable[[str], bool],
) -> tuple[str, ...]:
    """The innermost ``candidate`` modules that introduce a problem, in run order."""
    problems = [
        m.name
        for m in modules
        if candidate(m.name)
        and (m.introduces_nonfinite or m.introduced_error > tolerance)
    ]
    return tuple(
        n for n in problems if not any(o.startswith(n + ".") for o in problems)
    )
