"""Numerical-stability checks for users' own steps under any ampfn pipeline.

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
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hypothesis
import torch
from hypothesis import strategies as st

from ampfn._core import Transform, compute_dtype
from ampfn._effects import Handler
from ampfn._scaling import find_scaler_state
from ampfn._state import load_state_dict, loss_scale, state_dict
from ampfn.testing._strategies import TrialPipeline

Make = Callable[[int], tuple[Callable[[Any], Any], torch.nn.Module, Any]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP2 shard is a DTensor), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class _Probe(Handler):
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
                _local(param.grad).view(-1)[0] = self.poison  # type: ignore[assignment]

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
                    _local(first.grad).view(-1)[0] = self.poison  # type: ignore[assignment]
                self.armed = False
        assert not self.armed, "the step's backward produced no gradient to poison"
        for i, o in enumerate(self.optimizers):
            for g in o.param_groups:
                for p in g["params"]:
                    if p.grad is not None and not bool(_local(p.grad).isfinite().all()):
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


class _Trial:
    def __init__(self, make: Make, transform: Any, seed: int) -> None:
        step, self.model, optimizer = make(seed)
        self.optimizers = (
            list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        )
        if isinstance(transform, TrialPipeline):
            transform = transform.build(self.model, optimizer)
        self.pipeline = transform(step) if transform is not None else step
        self.probe = _Probe(self.model, self.optimizers)
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


def _validate(api: str, make: object, transform: object, **counts: int) -> None:
    """Eager checks shared by every check: the contract's types and positive counts."""
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


def _for_each_example(
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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
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


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two nested states differ (None when they are equal bit for bit, NaN equal to
    NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and _same_tensor(a, b)
        )
        return None if ok else f"{path or 'value'}: {a!r} != {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}[{k!r}]")
            if d is not None:
                return d
        return None
    if (
        isinstance(a, (list, tuple))
        and isinstance(b, (list, tuple))
        and len(a) == len(b)
    ):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
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
    _validate(
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
        trial = _Trial(make, transform, seed)
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
                    diff = _first_difference(
                        before["by_optimizer"][k],
                        now["by_optimizer"][k],
                        f"optimizer {k} parameter",
                    )
                    diff = diff or _first_difference(
                        before["optimizers"][k],
                        now["optimizers"][k],
                        f"optimizer {k} state",
                    )
                    assert diff is None, f"step {i}: a skipped step changed {diff}"
                if len(bad) == len(trial.optimizers):
                    diff = _first_difference(
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

    _for_each_example(prop, batches, steps, settings, shrink)


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

    The training as a whole passes when the distance to the reference, in norm over all
    parameters, is at most ``update_rtol`` times how far the reference moved, plus the
    rounding of the model's own weights (``eps(param dtype) * sqrt(steps)`` times their
    norm; nothing for fp32 weights). So an update that is wrong by less than the
    elementwise tolerance (a pipeline that never updates, with small steps) still fails.
    ``update_rtol`` defaults to ``min(4 * default_tolerance, 0.5)``; ``math.inf`` turns
    this part off.
    """

    _validate("check_matches_reference", make, transform, steps=steps)
    if update_rtol is not None and (
        isinstance(update_rtol, bool)
        or not isinstance(update_rtol, (int, float))
        or not update_rtol >= 0
    ):
        raise ValueError(
            f"check_matches_reference: update_rtol must be a number >= 0, got {update_rtol!r}"
        )

    def prop(drawn: list[Any]) -> None:
        trial, ref = _Trial(make, transform, seed), _Trial(make, None, seed)
        start = {n: p.detach().float().clone() for n, p in ref.model.named_parameters()}
        skipped = 0
        for batch in drawn[:steps]:
            took = all(stepped for _, stepped in trial.run(batch))
            skipped += not took
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
            raise AssertionError(
                f"check_matches_reference: after {steps} steps ({skipped} skipped) parameter {worst[1]!r} is "
                f"{worst[2]:.3g} away from the fp32 reference, beyond {how}"
            )
        # the training itself: the pipeline's total update against the reference's, in
        # norm over all parameters (elementwise bounds alone pass a pipeline that never
        # updates when the updates are smaller than the tolerance)
        off = moved = rounding = 0.0
        for name, p in trial.model.named_parameters():
            q = reference[f"model.{name}"].detach().float()
            off += float((p.detach().float() - q).pow(2).sum())
            moved += float((q - start[name]).pow(2).sum())
            if p.dtype != torch.float32 and p.is_floating_point():
                eps = torch.finfo(p.dtype).eps * math.sqrt(steps)
                rounding += eps**2 * float(q.pow(2).sum())
        bound = min(4 * tol, 0.5) if update_rtol is None else update_rtol
        allowed = bound * math.sqrt(moved) + math.sqrt(rounding)
        if moved > 0 and not math.sqrt(off) <= allowed:
            raise AssertionError(
                f"check_matches_reference: after {steps} steps ({skipped} skipped) the parameters "
                f"are {math.sqrt(off):.3g} (in norm) away from the fp32 reference, which moved "
                f"{math.sqrt(moved):.3g} from the start: beyond update_rtol={bound:.3g} of that "
                f"plus {math.sqrt(rounding):.3g} for rounding the weights (the updates are off by "
                f"{math.sqrt(off / moved):.0%} of their size)"
            )

    _for_each_example(prop, batches, steps, settings, shrink)


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

    _validate("check_never_nonfinite", make, transform, steps=steps)

    def prop(drawn: list[Any]) -> None:
        trial = _Trial(make, transform, seed)
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

    _for_each_example(prop, batches, steps, settings, shrink)


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
    _validate("check_state_roundtrip", make, transform, save_at=save_at, steps=steps)
    if not 0 <= save_at <= steps:
        raise ValueError(
            f"check_state_roundtrip: save_at must be in [0, steps], got {save_at} of {steps}"
        )

    def prop(drawn: list[Any]) -> None:
        first = _Trial(make, transform, seed)
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
        second = _Trial(
            make, transform, seed + 1
        )  # other initial values: loading must restore them all
        second.model.load_state_dict(saved[1])
        for o, s in zip(second.optimizers, saved[2], strict=True):
            o.load_state_dict(s)
        load_state_dict(second.pipeline, saved[0])
        diff = _first_difference(
            saved[0], state_dict(second.pipeline), "ampfn.state_dict"
        )
        assert diff is None, (
            f"check_state_roundtrip: right after loading the state saved at step {save_at}, {diff}"
        )
        for i, (batch, (params, state)) in enumerate(
            zip(drawn[save_at:steps], trajectory, strict=True)
        ):
            second.run(batch)
            diff = _first_difference(
                params, second.snapshot()["params"], "parameter"
            ) or _first_difference(
                state, state_dict(second.pipeline), "ampfn.state_dict"
            )
            assert diff is None, (
                f"check_state_roundtrip: resumed at step {save_at}, step {save_at + i} differs: {diff}"
            )

    _for_each_example(prop, batches, steps, settings, shrink)


def check_ranks_agree(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    steps: int = 4,
    poison_rank: int = 1,
    poison_at: int = 2,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """Every rank takes the same skip decisions and keeps the same parameters and scale,
    even when one rank's gradients go non-finite after the backward (after DDP's
    all-reduce: a rank-local hook, a local clip, a hardware fault).

    Every rank of an initialized ``torch.distributed`` process group calls it, with its
    own ``make`` (which may wrap the model in DDP or shard it with FSDP2) and its own
    batches. After ``ampfn.backward`` at step ``poison_at``, one gradient entry of
    ``poison_rank``'s first optimizer is made inf, on that rank only (its local shard,
    under FSDP2). After every step the ranks exchange (``all_gather_object``) their skip
    flags, loss scale and full parameters; a difference raises ``AssertionError`` on
    every rank. A strategy as ``batches`` is drawn derandomized, so that every rank
    draws the same examples.

    Raises:
        ValueError: no process group is initialized, or ``poison_rank``/``poison_at`` is
            out of range.
    """
    api = "check_ranks_agree"
    _validate(
        api, make, transform, steps=steps, poison_rank=poison_rank, poison_at=poison_at
    )
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{api}: every rank of an initialized torch.distributed process group calls it, and "
            "none is initialized (torch.distributed.init_process_group)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if poison_rank >= world:
        raise ValueError(
            f"{api}: poison_rank must be below the world size {world}, got {poison_rank}"
        )
    if poison_at >= steps:
        raise ValueError(
            f"{api}: poison_at must be below steps ({steps}), got {poison_at}"
        )
    if isinstance(batches, st.SearchStrategy):
        settings = hypothesis.settings(
            settings if settings is not None else hypothesis.settings.default,
            derandomize=True,
            database=None,
        )

    def prop(drawn: list[Any]) -> None:
        trial = _Trial(make, transform, seed)
        for i, batch in enumerate(drawn[:steps]):
            poisoned = rank == poison_rank and i == poison_at
            results = trial.run(batch, float("inf") if poisoned else None, late=True)
            scale = loss_scale(trial.pipeline)
            params = _full_params(trial.model)
            mine = (results, scale, params)
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, mine)
            first = everyone[0]
            for r, theirs in enumerate(everyone[1:], start=1):
                if theirs[0] != first[0]:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r}'s ampfn.step results {theirs[0]} differ from "
                        f"rank 0's {first[0]} (poisoned rank {poison_rank} at step {poison_at})"
                    )
                if theirs[1] != first[1]:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r}'s loss scale {theirs[1]} differs from rank 0's {first[1]}"
                    )
                diff = _first_difference(first[2], theirs[2], "parameter")
                if diff is not None:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r} differs from rank 0: {diff}"
                    )

    _for_each_example(prop, batches, steps, settings, shrink)


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters, on the CPU: FSDP2's sharded ones are gathered, and so are
    FSDP1's flat shards (collectives, which every rank runs)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None and isinstance(model, fsdp1):
        with fsdp1.summon_full_params(model, writeback=False):
            return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[n] = (full() if callable(full) else p).detach().cpu()
    return out
