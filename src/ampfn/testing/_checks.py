"""Layer 7, testing: numerical-stability checks for users' own steps under any ampfn pipeline.

Every check has the shape ``check_NAME(make, transform, batches, **options)``:

- ``make(seed)`` builds a fresh trial and returns ``(step, model, optimizer)``
  (``optimizer`` may be a list), where ``step(batch)`` uses ampfn's effects;
- ``transform`` is any transform or ``compose(...)`` pipeline, or a
  :class:`TrialPipeline` built afresh from each trial's model and optimizer;
- ``batches`` is a hypothesis strategy drawing one batch (the check then runs its own
  ``@given`` with ``settings``) or a sequence of batches (run once, as is: use this
  form inside your own ``@given``).

A check returns None when the property holds and raises ``AssertionError`` saying which
step, which parameter and what value when it does not. It reports the first failing
example it finds: shrinking a failing run of training steps to a minimal one can take
minutes, so it happens only with ``shrink=True``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ampfn._checkpoint import load_state_dict, state_dict
from ampfn._scaling import find_scaler_state
from ampfn._transform import compute_dtype
from ampfn.testing._trial import (
    Make,
    Trial,
    first_difference,
    for_each_example,
    validate,
)


def _f32(x: float) -> float:
    """``x`` rounded as GradScaler's float32 scale tensor rounds it."""
    return float(torch.tensor(x, dtype=torch.float32))


def _scaler_state(pipeline: Callable[..., Any]) -> dict[str, Any] | None:
    return find_scaler_state(state_dict(pipeline))


def check_skips_nonfinite(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    poison_at: Sequence[int] = (1,),
    value: str = "inf",
    resume_steps: int = 4,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """Non-finite gradients are skipped exactly, the scale backs off, then training resumes.

    At each step in ``poison_at`` the first gradient of the optimizers' parameters gets
    ``value`` ("inf", "-inf" or "nan") after backward. Every optimizer whose gradients
    are non-finite (poisoned, or overflowing on their own) must be skipped: ``ampfn.step``
    returns False and its parameters and state stay bit for bit as they were; every other
    optimizer must step (GradScaler skips only the overflowing ones). The scale must back
    off after a step with any non-finite gradient and otherwise follow GradScaler's
    growth law. After the last poisoned step, ``resume_steps`` clean steps must run.
    """
    make = validate(
        "check_skips_nonfinite",
        make,
        transform,
        resume_steps=resume_steps,
        **{f"poison_at[{i}]": at for i, at in enumerate(poison_at)},
    )
    poison = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}.get(value)
    if poison is None:
        raise ValueError(
            f"check_skips_nonfinite: value must be 'inf', '-inf' or 'nan', got {value!r}"
        )
    steps = max(poison_at, default=0) + 1 + resume_steps

    def prop(drawn: list[Any]) -> None:
        trial = Trial(make, transform, seed)
        stepped_after = False
        for i, batch in enumerate(drawn[:steps]):
            before, scale = trial.snapshot(), _scaler_state(trial.pipeline)
            if scale is None:
                raise AssertionError(
                    "check_skips_nonfinite: the pipeline has no dynamic loss scaler (no 'scale' in "
                    "ampfn.state_dict), so nothing skips non-finite steps"
                )
            results = trial.run(batch, poison if i in poison_at else None)
            after = _scaler_state(trial.pipeline)
            assert after is not None
            assert results, f"step {i}: the step never called ampfn.step"
            bad = trial.probe.nonfinite
            what = "poisoned" if i in poison_at else "overflowing"
            for k, stepped in results:
                if k in bad:
                    assert not stepped, (
                        f"step {i}: optimizer {k}'s gradients were {what} (non-finite) but ampfn.step returned True"
                    )
                else:
                    assert stepped, (
                        f"step {i}: optimizer {k}'s gradients were finite but ampfn.step returned False"
                    )
            if bad:
                now = trial.snapshot()
                for k in sorted(bad):
                    diff = first_difference(
                        before["by_optimizer"][k],
                        now["by_optimizer"][k],
                        f"optimizer {k} parameter",
                    )
                    diff = diff or first_difference(
                        before["optimizers"][k],
                        now["optimizers"][k],
                        f"optimizer {k} state",
                    )
                    assert diff is None, f"step {i}: a skipped step changed {diff}"
                if len(bad) == len(trial.optimizers):
                    diff = first_difference(
                        before["params"], now["params"], "parameter"
                    )
                    assert diff is None, f"step {i}: a skipped step changed {diff}"
                expected = _f32(scale["scale"] * scale["backoff_factor"])
                assert after["scale"] == expected, (
                    f"step {i}: the scale went {scale['scale']} -> {after['scale']}, expected a back-off to {expected}"
                )
            else:
                grows = scale["_growth_tracker"] + 1 == scale["growth_interval"]
                expected = (
                    _f32(scale["scale"] * scale["growth_factor"])
                    if grows
                    else scale["scale"]
                )
                assert after["scale"] == expected, (
                    f"step {i}: the scale went {scale['scale']} -> {after['scale']}, expected {expected} "
                    f"(growth tracker {scale['_growth_tracker']} of {scale['growth_interval']})"
                )
                stepped_after = stepped_after or i > max(poison_at, default=-1)
        assert stepped_after or resume_steps == 0, (
            "training never resumed after the poisoned steps"
        )

    for_each_example(prop, batches, steps, settings, shrink)


def default_tolerance(dtype: torch.dtype, steps: int) -> float:
    """``16 * eps(dtype) * sqrt(steps)``: rounding errors of size eps, growing like a
    random walk, with a margin of 16. For fp8 (``with_float8``) ``eps(dtype) * sqrt(steps)``:
    fp8's eps (2**-3 for e4m3) is already 16 times bf16's, and with the margin the bound
    would exceed the weights themselves."""
    margin = 1 if dtype.itemsize == 1 else 16
    return margin * torch.finfo(dtype).eps * math.sqrt(max(steps, 1))


def check_matches_reference(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    steps: int = 8,
    rtol: float | None = None,
    atol: float | None = None,
    update_rtol: float | None = None,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """After ``steps`` steps the pipeline's parameters are close to the fp32 run's.

    The reference is the same step with no transform, from ``make(seed)`` again; it skips
    the steps the pipeline skipped (dynamic loss scaling skips a few at first), so both
    take the same updates. A parameter passes when ``|p - ref| <= atol + rtol * |ref|``;
    both default to :func:`default_tolerance` of the pipeline's compute dtype.

    The training as a whole passes when the distance between the optimizers' parameters
    (fp32 master weights where the pipeline keeps them) and the reference's, in norm over
    all of them, is at most ``update_rtol`` times how far the reference moved, plus what
    rounding half-precision parameters can cost over ``steps`` steps (half a unit in the
    last place per element, times ``sqrt(steps)``: stochastic rounding's spread; nothing
    for fp32 parameters). So an update that is wrong by less than the elementwise
    tolerance (a pipeline that never updates, with small steps) still fails. With
    half-precision weights and no master weights, updates within that rounding cannot be
    told from none.
    ``update_rtol`` defaults to ``min(4 * default_tolerance, 0.5)``; ``math.inf`` turns
    this part off.
    """

    make = validate("check_matches_reference", make, transform, steps=steps)
    if update_rtol is not None and (
        isinstance(update_rtol, bool)
        or not isinstance(update_rtol, numbers.Real)
        or not update_rtol >= 0
    ):
        raise ValueError(
            f"check_matches_reference: update_rtol must be a number >= 0, got {update_rtol!r}"
        )

    def prop(drawn: list[Any]) -> None:
        trial, ref = Trial(make, transform, seed), Trial(make, None, seed)
        start = {
            k: t.detach().float().clone() for k, t in _stepped(ref.named_tensors())
        }
        skipped, took_each = 0, []
        for batch in drawn[:steps]:
            took = all(stepped for _, stepped in trial.run(batch))
            skipped += not took
            took_each.append(took)
            ref.run(batch, skip=not took)
        dtype = compute_dtype(trial.pipeline)
        tol = default_tolerance(dtype, steps)
        a, r = (tol if atol is None else atol), (tol if rtol is None else rtol)
        margin = "" if dtype.itemsize == 1 else "16 * "
        how = f"atol={a:.3g}, rtol={r:.3g}" + (
            f" ({margin}eps({dtype}) * sqrt({steps} steps))"
            if atol is None or rtol is None
            else ""
        )
        reference = ref.named_tensors()
        worst: tuple[float, str, float] | None = None
        for name, p in trial.model.named_parameters():
            q = reference[f"model.{name}"].detach().float()
            err = (p.detach().float() - q).abs()
            excess = (err - (a + r * q.abs())).max().item()
            rank = excess if math.isfinite(excess) else math.inf
            if rank > 0 and (worst is None or rank > worst[0]):
                worst = (rank, name, err.max().item())
        if worst is not None:
            _check_reproducible(make, seed, drawn[:steps], took_each, reference)
            raise AssertionError(
                f"check_matches_reference: after {steps} steps ({skipped} skipped) parameter {worst[1]!r} is "
                f"{worst[2]:.3g} away from the fp32 reference, beyond {how}"
            )
        # the training itself: the pipeline's total update against the reference's, in
        # norm over all parameters (elementwise bounds alone pass a pipeline that never
        # updates when the updates are smaller than the tolerance)
        off = moved = rounding = 0.0
        ours = dict(_stepped(trial.named_tensors()))
        for key, theirs in _stepped(reference):
            mine, q = ours[key].detach(), theirs.detach().float()
            off += float((mine.float() - q).pow(2).sum())
            moved += float((q - start[key]).pow(2).sum())
            if mine.dtype != torch.float32 and mine.is_floating_point():
                rounding += steps / 4 * float(_ulp(q, mine.dtype).pow(2).sum())
        bound = min(4 * tol, 0.5) if update_rtol is None else update_rtol
        allowed = bound * math.sqrt(moved) + math.sqrt(rounding)
        if moved > 0 and not math.sqrt(off) <= allowed:
            _check_reproducible(make, seed, drawn[:steps], took_each, reference)
            raise AssertionError(
                f"check_matches_reference: after {steps} steps ({skipped} skipped) the parameters "
                f"are {math.sqrt(off):.3g} (in norm) away from the fp32 reference, which moved "
                f"{math.sqrt(moved):.3g} from the start: beyond update_rtol={bound:.3g} of that "
                f"plus {math.sqrt(rounding):.3g} for rounding the weights (the updates are off by "
                f"{math.sqrt(off / moved):.0%} of their size)"
            )

    for_each_example(prop, batches, steps, settings, shrink)


def _check_reproducible(
    make: Make,
    seed: int,
    drawn: list[Any],
    took: list[bool],
    reference: dict[str, torch.Tensor],
) -> None:
    """Before blaming the tolerance: run the fp32 reference again; if it differs from the
    first run, the reference itself is not reproducible, and that is the cause."""
    again = Trial(make, None, seed)
    for batch, stepped in zip(drawn, took, strict=True):
        again.run(batch, skip=not stepped)
    diff = first_difference(
        {k: t.detach() for k, t in reference.items()},
        {k: t.detach() for k, t in again.named_tensors().items()},
        "parameter",
    )
    if diff is not None:
        raise AssertionError(
            "check_matches_reference: the fp32 reference is not reproducible: two runs of "
            "make(seed) and the unwrapped step on the same batches differ "
            f"({diff[:200]}); make must seed everything it draws (torch.manual_seed(seed) "
            "before building the model), and the step must not draw from the global RNG "
            "(dropout: seed it per step, or use a torch.Generator made in make), or the "
            "comparison with the pipeline means nothing"
        )


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each element of ``x``."""
    exponent = torch.frexp(x).exponent
    return torch.ldexp(torch.full_like(x, torch.finfo(dtype).eps), exponent - 1)


def _stepped(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The optimizers' parameters (fp32 masters where a pipeline keeps them) by position;
    the model's parameters where the optimizer's cannot be named."""
    out = [(k, t) for k, t in tensors.items() if k.startswith("optimizer[")]
    return out or [(k, t) for k, t in tensors.items() if k.startswith("model.")]


def check_never_nonfinite(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    steps: int = 8,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """No parameter (model or optimizer's) ever becomes inf or NaN, whatever the batches."""

    make = validate("check_never_nonfinite", make, transform, steps=steps)

    def prop(drawn: list[Any]) -> None:
        trial = Trial(make, transform, seed)
        for i, batch in enumerate(drawn[:steps]):
            trial.run(batch)
            for name, p in trial.named_tensors().items():
                bad = ~p.detach().isfinite()
                if bool(bad.any()):
                    where = tuple(int(j) for j in bad.nonzero()[0])
                    raise AssertionError(
                        f"check_never_nonfinite: after step {i}, {name}{list(where)} is {p.detach()[where].item()} "
                        f"({int(bad.sum())} non-finite values)"
                    )

    for_each_example(prop, batches, steps, settings, shrink)


def check_state_roundtrip(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    save_at: int = 3,
    steps: int = 6,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """``ampfn.state_dict`` saved after ``save_at`` steps and loaded into a fresh trial
    (with the model's and optimizers' own state dicts) continues identically to ``steps``."""
    make = validate(
        "check_state_roundtrip", make, transform, save_at=save_at, steps=steps
    )
    if not 0 <= save_at <= steps:
        raise ValueError(
            f"check_state_roundtrip: save_at must be in [0, steps], got {save_at} of {steps}"
        )

    def prop(drawn: list[Any]) -> None:
        first = Trial(make, transform, seed)
        for batch in drawn[:save_at]:
            first.run(batch)
        saved = copy.deepcopy(
            (
                state_dict(first.pipeline),
                first.model.state_dict(),
                [o.state_dict() for o in first.optimizers],
            )
        )
        trajectory = []
        for batch in drawn[save_at:steps]:
            first.run(batch)
            trajectory.append((first.snapshot()["params"], state_dict(first.pipeline)))
        second = Trial(
            make, transform, seed + 1
        )  # other initial values: loading must restore them all
        second.model.load_state_dict(saved[1])
        for o, s in zip(second.optimizers, saved[2], strict=True):
            o.load_state_dict(s)
        load_state_dict(second.pipeline, saved[0])
        diff = first_difference(
            saved[0], state_dict(second.pipeline), "ampfn.state_dict"
        )
        assert diff is None, (
            f"check_state_roundtrip: right after loading the state saved at step {save_at}, {diff}"
        )
        for i, (batch, (params, state)) in enumerate(
            zip(drawn[save_at:steps], trajectory, strict=True)
        ):
            second.run(batch)
            diff = first_difference(
                params, second.snapshot()["params"], "parameter"
            ) or first_difference(
                state, state_dict(second.pipeline), "ampfn.state_dict"
            )
            assert diff is None, (
                f"check_state_roundtrip: resumed at step {save_at}, step {save_at + i} differs: {diff}"
            )

    for_each_example(prop, batches, steps, settings, shrink)
