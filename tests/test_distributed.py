"""Two real processes on loopback (gloo, CPU): DDP, FSDP2, FSDP1, checkpoints.

Each worker runs a group of scenarios once per module (starting processes costs seconds)
and leaves its results in a file; the tests read them. Each rank compares itself with a
single-process reference trained on the same global batch, and with the other rank.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn import testing
from helpers import Batch, batches, mlp

WORLD = 2
STEPS = 5
POISON_AT = 2
# fp16 compute on half batches, averaged by the all-reduce, rounds differently from the
# full batch's mean: 5 steps differ by about 1e-5
TOL = {"rtol": 1e-4, "atol": 1e-4}

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)


# --------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # the CUDA scenarios use NCCL when each rank has a GPU of its own, else gloo
    nccl = name == "_cuda_scenarios" and torch.cuda.device_count() >= world
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    code, results = 0, {}
    try:
        results = globals()[name](rank, world, Path(out))
    except BaseException:
        code, results = 1, {"error": traceback.format_exc()}
    finally:
        torch.save(results, Path(out) / f"{name}.{rank}.pt")
        gc.collect()  # before destroying the group: avoids an abort at exit after FSDP2
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(name: str, out: Path, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Run ``name(rank, world, out)`` in WORLD fresh processes; their results, by rank."""
    ctx = mp.start_processes(
        _entry,
        args=(WORLD, _free_port(), name, str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    with contextlib.suppress(mp.ProcessExitedException):
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{name}: the ranks did not finish in {timeout} s")
    results = []
    for rank in range(WORLD):
        path = out / f"{name}.{rank}.pt"
        assert path.exists(), f"{name}: rank {rank} left no results"
        r = torch.load(path, weights_only=False)
        assert "error" not in r, f"{name}: rank {rank} failed:\n{r['error']}"
        results.append(r)
    return results


# --------------------------------------------------------------------------- shared pieces


def global_batches(n: int, poison_row_at: int | None = None) -> list[Batch]:
    data = batches(n, size=8 * WORLD)
    if poison_row_at is not None:
        x, y = data[poison_row_at]
        x = x.clone()
        x[8 * WORLD - 1, 0] = float("inf")  # a row of rank 1's half
        data[poison_row_at] = (x, y)
    return data


def shard(batch: Batch, rank: int) -> Batch:
    return batch[0][8 * rank : 8 * (rank + 1)], batch[1][8 * rank : 8 * (rank + 1)]


def gs() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def reference(data: list[Batch], micro: int = 1) -> tuple[nn.Module, list[bool], float]:
    """The single-process run on the global batches, hand-written: fp16 autocast + GradScaler."""
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = gs()
    stepped = []
    for i in range(0, len(data), micro):
        for x, y in data[i : i + micro]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y) / micro
            s.scale(loss).backward()
        before = s.get_scale()
        s.step(opt)
        s.update()
        stepped.append(s.get_scale() >= before)
        opt.zero_grad(set_to_none=True)
    return model, stepped, s.get_scale()


def step_fn(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    micro: int = 1,
    sync: Callable[[], Any] | None = None,
) -> Callable[[list[Batch]], Any]:
    def train_step(micro_batches: list[Batch]) -> Any:
        for j, (x, y) in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            ctx = contextlib.nullcontext() if last or sync is None else sync()
            with ctx:
                ampfn.backward(
                    F.cross_entropy(model(x).float(), y) / len(micro_batches)
                )
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    return train_step


def agreement(make: Any, transform: Any, local: list[Batch]) -> str:
    """``check_ranks_agree`` over 4 steps: "agree", or what differed."""
    try:
        testing.check_ranks_agree(make, transform, local, steps=4)
    except AssertionError as e:
        return str(e)
    return "agree"


def gathered(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def full_params(model: Any) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float
) -> float | bool:
    """True when within the tolerance, else the largest difference (for the message)."""
    if all(torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol) for k in a):
        return True
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --------------------------------------------------------------------------- DDP


def _ddp_scenarios(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, Any] = {}

    def build(sync_ranks: bool | None = None) -> tuple[Any, nn.Module, Any]:
        model = DDP(mlp(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        t = ampfn.compose(
            ampfn.with_grad_scaling(gs(), sync_ranks=sync_ranks),
            ampfn.with_autocast("fp16", "cpu"),
        )
        return t(step_fn(model, opt, sync=model.no_sync)), model, opt

    # an inf in one rank's input reaches every rank through the all-reduce
    data = global_batches(STEPS, poison_row_at=POISON_AT)
    step, model, _ = build()
    stepped = [step([shard(b, rank)]) for b in data]
    ref, ref_stepped, ref_scale = reference(data)
    res["reference"] = {
        "stepped": stepped,
        "ref_stepped": ref_stepped,
        "scale": ampfn.loss_scale(step),
        "ref_scale": ref_scale,
        "close": close(full_params(model.module), full_params(ref), **TOL),
        "ranks_equal": all(
            torch.equal(mine, theirs[k])
            for theirs in gathered(full_params(model.module))
            for k, mine in full_params(model.module).items()
        ),
        "state_dicts_equal": len({repr(x) for x in gathered(ampfn.state_dict(step))})
        == 1,
    }

    # gradient accumulation: micro-steps in no_sync() call only ampfn.backward
    data = global_batches(3 * 3)
    step, model, _ = build()
    for i in range(0, len(data), 3):
        step([shard(b, rank) for b in data[i : i + 3]])
    ref, _, ref_scale = reference(data, micro=3)
    res["no_sync"] = {
        "close": close(full_params(model.module), full_params(ref), **TOL),
        "scale": ampfn.loss_scale(step),
        "ref_scale": ref_scale,
    }

    # an inf in one rank's gradient after the all-reduce: the check, with and without sync_ranks
    def make_for(
        sync_ranks: bool | None,
    ) -> Callable[[int], tuple[Any, nn.Module, Any]]:
        def make(seed: int) -> tuple[Any, nn.Module, Any]:
            torch.manual_seed(seed)
            model = DDP(mlp(seed))
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

            def step(b: Batch) -> Any:
                ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
                stepped = ampfn.step(opt)
                opt.zero_grad(set_to_none=True)
                return stepped

            return step, model, opt

        return make

    local = [shard(b, rank) for b in global_batches(4)]
    for sync_ranks in (None, False):
        t = ampfn.compose(
            ampfn.with_grad_scaling(gs(), sync_ranks=sync_ranks),
            ampfn.with_autocast("fp16", "cpu"),
        )
        res[f"check sync_ranks={sync_ranks}"] = agreement(
            make_for(sync_ranks), t, local
        )
    # the same for the sync-free mode and for with_apex
    sync_free = ampfn.compose(
        ampfn.with_grad_scaling(gs(), sync=False), ampfn.with_autocast("fp16", "cpu")
    )
    res["check sync-free"] = agreement(make_for(None), sync_free, local)

    def make_apex(
        level: str, losses: int = 1, **kw: Any
    ) -> Callable[[int], tuple[Any, nn.Module, Any]]:
        def make(seed: int) -> tuple[Any, nn.Module, Any]:
            torch.manual_seed(seed)
            inner = mlp(seed)
            opt = torch.optim.SGD(inner.parameters(), lr=0.05, momentum=0.9)
            apex = ampfn.with_apex(
                level, inner, opt, backend="native", num_losses=losses, **kw
            )  # cast before DDP wraps it
            model = DDP(inner)

            @apex
            def step(b: Batch) -> Any:
                for loss_id in range(losses):
                    loss = F.cross_entropy(model(b[0]).float(), b[1])
                    ampfn.backward(loss, loss_id=loss_id)
                stepped = ampfn.step(opt)
                opt.zero_grad(set_to_none=True)
                return stepped

            return step, model, opt

        return make

    # the native GradScaler (O2), and Apex's per-loss scaler (ApexScaling): several
    # losses, and fp16 gradients (O2 without master weights)
    for name, make_it in {
        "apex-O2": make_apex("O2"),
        "apex-O1 num_losses=2": make_apex("O1", 2),
        "apex-O2 master_weights=False": make_apex(
            "O2", master_weights=False, sync_ranks=True
        ),
    }.items():
        res[f"check {name}"] = agreement(make_it, ampfn.compose(), local)
    return res


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("_ddp_scenarios", tmp_path_factory.mktemp("ddp"))


def test_ddp_matches_the_single_process_reference_and_skips_together(
    ddp: list[dict[str, Any]],
) -> None:
    for r in ddp:
        ref = r["reference"]
        assert (
            ref["stepped"]
            == ref["ref_stepped"]
            == [i != POISON_AT for i in range(STEPS)]
        )
        assert ref["scale"] == ref["ref_scale"]
        assert ref["close"] is True, ref["close"]
        assert ref["ranks_equal"]


def test_ddp_state_dict_is_identical_on_every_rank(ddp: list[dict[str, Any]]) -> None:
    assert all(r["reference"]["state_dicts_equal"] for r in ddp)


def test_ddp_gradient_accumulation_with_no_sync(ddp: list[dict[str, Any]]) -> None:
    for r in ddp:
        assert r["no_sync"]["close"] is True, r["no_sync"]["close"]
        assert r["no_sync"]["scale"] == r["no_sync"]["ref_scale"]


def test_ddp_ranks_agree_after_a_rank_local_inf_only_with_sync_ranks(
    ddp: list[dict[str, Any]],
) -> None:
    for r in ddp:
        assert r["check sync_ranks=None"] == "agree"
        assert r["check sync-free"] == "agree"
        assert r["check apex-O2"] == "agree"
        assert r["check apex-O1 num_losses=2"] == "agree"
        assert r["check apex-O2 master_weights=False"] == "agree"
        # without it GradScaler lets rank 0 step while rank 1 skips: the check catches it
        assert (
            "after step 2, rank 1's ampfn.step results [(0, False)] differ from rank 0's [(0, True)]"
            in r["check sync_ranks=False"]
        )


# --------------------------------------------------------------------------- FSDP2


def _fsdp2_model(policy: str, seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = mlp(seed)
    fully_shard(model, mp_policy=ampfn.fsdp_mixed_precision(policy))
    return model


def _fsdp2_scenarios(rank: int, world: int, out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # fp32 sharding with fp16 autocast against the single-process reference
    data = global_batches(STEPS, poison_row_at=POISON_AT)
    model = _fsdp2_model("32-true")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = ampfn.compose(
        ampfn.with_grad_scaling(gs()), ampfn.with_autocast("fp16", "cpu")
    )(step_fn(model, opt))
    stepped = [step([shard(b, rank)]) for b in data]
    ref, ref_stepped, ref_scale = reference(data)
    res["reference"] = {
        "stepped": stepped,
        "ref_stepped": ref_stepped,
        "scale": ampfn.loss_scale(step),
        "ref_scale": ref_scale,
        "close": close(full_params(model), full_params(ref), **TOL),
    }

    # an inf in one rank's shard: every rank skips (default scaler, sync and sync-free)
    def make(seed: int) -> tuple[Any, nn.Module, Any]:
        model = _fsdp2_model("16-mixed", seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step(b: Batch) -> Any:
            ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return stepped

        return step, model, opt

    local = [shard(b, rank) for b in global_batches(4)]
    for name, t in {
        "default": lambda: ampfn.with_grad_scaling(),
        "sync-free": lambda: ampfn.with_grad_scaling(gs(), sync=False),
        "no sync_ranks": lambda: ampfn.with_grad_scaling(gs(), sync_ranks=False),
    }.items():
        res[f"check {name}"] = agreement(make, t(), local)

    # the same runs by hand: the poisoned step reports a skip on every rank, and no
    # parameter moves there
    for name, t in {
        "default": lambda: ampfn.with_grad_scaling(),
        "sync-free": lambda: ampfn.with_grad_scaling(gs(), sync=False),
        "no sync_ranks": lambda: ampfn.with_grad_scaling(gs(), sync_ranks=False),
    }.items():
        step, model, opt = make(0)
        poison = LatePoison(opt)
        run = ampfn.compose(ampfn.with_handler(poison), t())(step)
        seen = []
        for i, b in enumerate(local):
            poison.armed = rank == 1 and i == POISON_AT
            before = full_params(model)
            did_step = bool(run(b))
            moved = not all(
                torch.equal(v, full_params(model)[k]) for k, v in before.items()
            )
            seen.append((did_step, moved))
        res[f"by hand {name}"] = seen

    # no loss scaling at all, bf16: the inf becomes NaN parameters, the same on every
    # rank (identical NaNs agree)
    res["check no scaling"] = agreement(make, ampfn.with_autocast("bf16", "cpu"), local)

    # fp16 parameters sharded: GradScaler cannot unscale them, and says what to do
    half = mlp(0).half()
    from torch.distributed.fsdp import fully_shard

    fully_shard(half)
    half_opt = torch.optim.SGD(half.parameters(), lr=0.05)
    half_step = ampfn.with_grad_scaling(gs())(step_fn(half, half_opt))
    try:
        half_step(
            [
                (
                    shard(global_batches(1)[0], rank)[0].half(),
                    shard(global_batches(1)[0], rank)[1],
                )
            ]
        )
        res["fp16 shards"] = "no error"
    except ValueError as e:
        res["fp16 shards"] = str(e)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    for name, scaler in (
        ("GradScaler", gs()),
        ("ShardedGradScaler", ShardedGradScaler("cpu", init_scale=2.0**10)),
    ):
        sync_free = ampfn.with_grad_scaling(scaler, sync=False)(step_fn(half, half_opt))
        try:
            sync_free(
                [
                    (
                        shard(global_batches(1)[0], rank)[0].half(),
                        shard(global_batches(1)[0], rank)[1],
                    )
                ]
            )
            res[f"fp16 shards sync-free {name}"] = "no error"
        except ValueError as e:
            res[f"fp16 shards sync-free {name}"] = str(e)

    # one optimizer over sharded and plain parameters of the same dtype
    mixed = mlp(0)
    fully_shard(mixed[0])
    mixed_opt = torch.optim.SGD(mixed.parameters(), lr=0.05)
    before = full_params(mixed)
    try:
        ampfn.with_grad_scaling(gs())(step_fn(mixed, mixed_opt))(
            [shard(global_batches(1)[0], rank)]
        )
        res["mixed shards"] = "no error"
    except ValueError as e:
        res["mixed shards"] = str(e)
    res["mixed unchanged"] = all(
        torch.equal(v, full_params(mixed)[k]) for k, v in before.items()
    )

    # a sharded checkpoint: torch.distributed.checkpoint for the model and optimizer,
    # ampfn's pipeline state beside them; the resumed run (other processes) continues
    # bit for bit
    res["dcp straight"] = _dcp_run(rank, out, save_at=None)
    _dcp_run(rank, out, save_at=3)
    return res


def _float8_run(rank: int, all_gather: bool) -> dict[str, Any]:
    """FSDP2 over torchao's Float8Linear layers, fp8 all-gather or not; same data."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    fp8 = ampfn.with_float8(model, emulate=True, fsdp_float8_all_gather=all_gather)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = fp8(step_fn(model, opt))
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(STEPS):
        x, y = (
            torch.randn(16, 32, generator=g),
            torch.randint(0, 16, (16,), generator=g),
        )
        with torch.no_grad():
            losses.append(float(F.cross_entropy(model(x).float(), y)))
        step([(x, y)])
    scales = [
        getattr(layer.weight._local_tensor, "_precomputed_scale", None)  # type: ignore[union-attr]
        for layer in (model[0], model[2])
    ]
    return {
        "losses": losses,
        "params": full_params(model),
        "precomputed": all(s is not None for s in scales),  # ampfn's after-step effect
    }


def _float8_scenarios(rank: int, world: int, out: Path) -> dict[str, Any]:
    return {name: _float8_run(rank, name == "fp8") for name in ("plain", "fp8")}


class LatePoison(ampfn.Handler):
    """Makes one entry of this rank's first gradient inf after the backward, when armed."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.armed = opt, False

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        proceed(loss, kwargs)
        if self.armed:
            grads = [p.grad for g in self.opt.param_groups for p in g["params"]]
            g = next(g for g in grads if g is not None)
            local = g.to_local() if hasattr(g, "to_local") else g
            with torch.no_grad():
                local.view(-1)[0] = float("inf")
            self.armed = False


def _dcp_build(rank: int) -> tuple[Any, nn.Module, Any]:
    model = _fsdp2_model("bf16-mixed")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = ampfn.with_grad_scaling(gs())(step_fn(model, opt))
    return step, model, opt


def _dcp_data(rank: int) -> list[Batch]:
    return [shard(b, rank) for b in global_batches(6, poison_row_at=1)]


def _dcp_run(rank: int, out: Path, save_at: int | None) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step, model, opt = _dcp_build(rank)
    data = _dcp_data(rank)
    for i, b in enumerate(data):
        if i == save_at:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))
            torch.save(
                ampfn.state_dict(step), out / f"ampfn.{rank}.pt"
            )  # the same on every rank
            return {}
        step([b])
    return full_params(model)


def _dcp_resume(rank: int, world: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    step, model, opt = _dcp_build(rank)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))  # in place
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    ampfn.load_state_dict(
        step, torch.load(out / f"ampfn.{rank}.pt", weights_only=False)
    )
    for b in _dcp_data(rank)[3:]:
        step([b])
    return {"resumed": full_params(model)}


@pytest.fixture(scope="module")
def fsdp2(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("fsdp2")
    return launch("_fsdp2_scenarios", out), out


def test_fsdp2_matches_the_single_process_reference(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    for r in fsdp2[0]:
        ref = r["reference"]
        assert (
            ref["stepped"]
            == ref["ref_stepped"]
            == [i != POISON_AT for i in range(STEPS)]
        )
        assert ref["scale"] == ref["ref_scale"]
        assert ref["close"] is True, ref["close"]


def test_fsdp2_every_rank_skips_an_inf_in_one_shard(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    for r in fsdp2[0]:
        assert r["check default"] == "agree"
        assert r["check sync-free"] == "agree"
        assert (
            r["check no sync_ranks"] == "agree"
        )  # GradScaler's DTensor path agrees by itself
        for name in ("default", "sync-free", "no sync_ranks"):
            # every rank skips the poisoned step, and no parameter moves there
            assert r[f"by hand {name}"] == [
                (i != POISON_AT, i != POISON_AT) for i in range(4)
            ], name


def test_fsdp2_ranks_with_identical_nan_parameters_agree(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    for r in fsdp2[0]:
        assert r["check no scaling"] == "agree"


def test_fsdp2_fp16_shards_are_a_clear_error(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    for r in fsdp2[0]:
        assert (
            "sharded gradients are fp16, which torch.amp.GradScaler refuses"
            in r["fp16 shards"]
        )
        assert "fsdp_mixed_precision('16-mixed')" in r["fp16 shards"]
        for name in ("GradScaler", "ShardedGradScaler"):
            message = r[f"fp16 shards sync-free {name}"]
            assert message.startswith(
                "with_grad_scaling(sync=False): the FSDP-sharded gradients are fp16"
            ), message
            assert "GradScaler refuses to unscale fp16 gradients" in message
            assert "fsdp_mixed_precision('16-mixed')" in message
            assert "sync=True with a ShardedGradScaler" in message


def test_fsdp2_sharded_and_plain_gradients_in_one_optimizer_are_a_clear_error(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    for r in fsdp2[0]:
        assert r["mixed shards"].startswith(
            "with_grad_scaling: this optimizer holds both FSDP-sharded (DTensor) and plain "
            "gradients of the same dtype"
        ), r["mixed shards"]
        assert "fully_shard the modules that own them" in r["mixed shards"]
        assert r["mixed unchanged"]


def test_fsdp2_sharded_checkpoint_resumes_bit_for_bit(
    fsdp2: tuple[list[dict[str, Any]], Path],
) -> None:
    results, out = fsdp2
    resumed = launch("_dcp_resume", out)
    for r, straight in zip(resumed, results, strict=True):
        assert all(
            torch.equal(r["resumed"][k], straight["dcp straight"][k])
            for k in r["resumed"]
        )


# --------------------------------------------------------------------------- FSDP1


def _fsdp1_scenarios(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    def make(seed: int) -> tuple[Any, nn.Module, Any]:
        model = FSDP(mlp(seed), device_id=torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step(b: Batch) -> Any:
            ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return stepped

        return step, model, opt

    local = [shard(b, rank) for b in global_batches(4)]
    res: dict[str, Any] = {}
    for name, t in {
        "ShardedGradScaler": lambda: ampfn.with_grad_scaling(
            ShardedGradScaler("cpu", init_scale=2.0**10)
        ),
        "GradScaler": lambda: ampfn.with_grad_scaling(
            gs()
        ),  # ampfn's all-reduce makes it agree
    }.items():
        res[name] = agreement(make, t(), local)
    return res


def test_fsdp1_with_sharded_grad_scaler_or_grad_scaler(tmp_path: Path) -> None:
    for r in launch("_fsdp1_scenarios", tmp_path):
        assert r == {"ShardedGradScaler": "agree", "GradScaler": "agree"}


def test_fsdp2_float8_all_gather_trains_as_the_plain_fp8_run(tmp_path: Path) -> None:
    """with_float8(fsdp_float8_all_gather=True) under real FSDP2: weights all-gathered
    in fp8 with the scales ampfn precomputes after each step give the run that gathers
    them in fp32 and casts after (tensorwise: one amax over the whole weight)."""
    pytest.importorskip("torchao")
    for r in launch("_float8_scenarios", tmp_path):
        plain, gathered = r["plain"], r["fp8"]
        assert gathered["precomputed"]
        assert not plain["precomputed"]
        assert gathered["losses"][-1] < gathered["losses"][0]
        torch.testing.assert_close(gathered["losses"], plain["losses"])
        for name, value in plain["params"].items():
            torch.testing.assert_close(gathered["params"][name], value)


# --------------------------------------------------------------------------- CUDA


def _cuda_scenarios(rank: int, world: int, out: Path) -> dict[str, Any]:
    """DDP on CUDA tensors: NCCL with a GPU per rank, else gloo (ranks share one GPU)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)

    def make(seed: int) -> tuple[Any, nn.Module, Any]:
        torch.manual_seed(seed)
        model = DDP(mlp(seed, device="cuda"), device_ids=[device.index])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

        def step(b: Batch) -> Any:
            ampfn.backward(
                F.cross_entropy(model(b[0].to(device)).float(), b[1].to(device))
            )
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return stepped

        return step, model, opt

    local = [shard(b, rank) for b in global_batches(4)]
    res: dict[str, Any] = {}
    for name, t in {
        "sync": lambda: ampfn.compose(
            ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", "cuda")
        ),
        "sync-free": lambda: ampfn.compose(
            ampfn.with_grad_scaling(sync=False), ampfn.with_autocast("fp16", "cuda")
        ),
    }.items():
        res[name] = agreement(make, t(), local)
    return res


@pytest.mark.cuda
def test_ddp_on_cuda_tensors_agrees(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for r in launch("_cuda_scenarios", tmp_path):
        assert r == {"sync": "agree", "sync-free": "agree"}


# --------------------------------------------------------------------------- one process


def test_fsdp_mixed_precision_maps_the_precision_names() -> None:
    f32 = torch.float32
    table = {
        "bf16-mixed": (torch.bfloat16, f32, f32),
        "16-mixed": (torch.float16, f32, f32),
        "bf16-true": (torch.bfloat16, torch.bfloat16, f32),
        "32-true": (f32, f32, None),
        torch.float16: (torch.float16, f32, None),
    }
    for name, dtypes in table.items():
        mp_policy = ampfn.fsdp_mixed_precision(name)
        got = (mp_policy.param_dtype, mp_policy.reduce_dtype, mp_policy.output_dtype)
        assert got == dtypes
        if isinstance(name, str):  # a name and its ampfn.Policy agree
            assert ampfn.fsdp_mixed_precision(ampfn.get_policy(name)) == mp_policy
    with pytest.raises(
        ValueError,
        match=r"expected one of 'bf16-mixed', '16-mixed', 'bf16-true', '32-true'",
    ):
        ampfn.fsdp_mixed_precision("fp8")
    with pytest.raises(TypeError, match="expected a precision name"):
        ampfn.fsdp_mixed_precision(16)


def test_sync_ranks_needs_a_process_group() -> None:
    with pytest.raises(
        ValueError,
        match=r"sync_ranks=True needs an initialized torch.distributed process group",
    ):
        ampfn.with_grad_scaling(sync_ranks=True)
    with pytest.raises(TypeError, match="sync_ranks must be a bool or None"):
        ampfn.with_grad_scaling(sync_ranks="yes")  # type: ignore[arg-type]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for num_losses in (1, 2):
        with pytest.raises(
            ValueError,
            match=r"with_apex.*sync_ranks=True needs an initialized torch.distributed "
            "process group",
        ):
            ampfn.with_apex(
                "O1",
                model,
                opt,
                backend="native",
                sync_ranks=True,
                num_losses=num_losses,
            )


def test_check_ranks_agree_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="none is initialized"):
        testing.check_ranks_agree(
            lambda s: (lambda b: b, mlp(), None), ampfn.with_grad_scaling(), [1]
        )


# --------------------------------------------------------------------------- collectives


@pytest.fixture
def one_rank_group(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A process group of one rank in this process, and the shapes all-reduced in it."""
    import ampfn._distributed

    calls: list[tuple[int, ...]] = []
    real = ampfn._distributed.all_reduce_max

    def counting(found: torch.Tensor) -> None:
        calls.append(tuple(found.shape))
        real(found)

    monkeypatch.setattr(ampfn._distributed, "all_reduce_max", counting)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield calls
    finally:
        dist.destroy_process_group()


def _two_optimizer_step(
    transform: Callable[..., Any], clip: bool, losses: int = 1
) -> Callable[[torch.Tensor], Any]:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 1)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)

    @transform(a, b, oa, ob)
    def step(x: torch.Tensor) -> Any:
        for loss_id in range(losses):
            ampfn.backward(b(a(x)).pow(2).mean(), loss_id=loss_id)
        if clip:
            ampfn.clip_grad_norm_(a.parameters(), 1.0, oa)
            ampfn.clip_grad_norm_(b.parameters(), 1.0, ob)
        ampfn.step(oa)
        ampfn.step(ob)
        oa.zero_grad(set_to_none=True)
        ob.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_with_grad_scaling_all_reduces_once_per_step_of_an_optimizer_not_agreed_on(
    one_rank_group: list[tuple[int, ...]], sync: bool
) -> None:
    calls = one_rank_group
    # one optimizer: one all-reduce per update
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = ampfn.with_grad_scaling(gs(), sync=sync, sync_ranks=True)
    step = t(step_fn(model, opt))
    for b in batches(3):
        step([b])
    assert len(calls) == 3
    for clip, expected in ((True, [(2,)]), (False, [(1,), (1,)])):
        calls.clear()
        step2 = _two_optimizer_step(
            lambda *_: ampfn.with_grad_scaling(gs(), sync=sync, sync_ranks=True), clip
        )
        step2(torch.randn(8, 4))
        # both unscaled (clipped) before the first step: one collective for both;
        # stepped without unscaling first: one per optimizer
        assert calls == expected, (clip, calls)


def test_with_apex_all_reduces_once_per_update_and_once_per_backward_of_its_own_scaler(
    one_rank_group: list[tuple[int, ...]],
) -> None:
    calls = one_rank_group

    def apex(losses: int) -> Callable[..., Any]:
        return lambda a, b, oa, ob: ampfn.with_apex(
            "O1",
            nn.ModuleList([a, b]),
            [oa, ob],
            backend="native",
            sync_ranks=True,
            num_losses=losses,
        )

    _two_optimizer_step(apex(1), clip=False)(torch.randn(8, 4))
    assert calls == [(2,)]  # a GradScaler: every optimizer together, once
    calls.clear()
    _two_optimizer_step(apex(2), clip=False, losses=2)(torch.randn(8, 4))
    assert calls == [(), (), ()]  # Apex's scaler: one per backward, one per update
    # whether a rank all-reduces must not depend on its data: a backward that gives
    # this rank's parameters no gradient still takes part in the step's collective
    calls.clear()
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    scaled = apex(2)(a, b, oa, ob)

    @scaled
    def no_gradients(x: torch.Tensor) -> None:
        ampfn.backward((x * torch.ones(4, requires_grad=True)).sum())
        ampfn.step(oa)

    no_gradients(torch.randn(8, 4))
    assert calls == [(), ()]


def test_with_apex_auto_takes_the_native_path_when_ranks_must_agree(
    one_rank_group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend='auto' with apex.amp importable and CUDA present picks apex.amp, which
    decides each rank's skips alone; sync_ranks=True must pick the native path."""
    import types

    class Used(Exception):
        pass

    class Amp(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            raise Used(f"apex.amp.{name} was used")

    fake = types.ModuleType("apex")
    fake.amp = Amp("apex.amp")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "apex", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Used):  # the fake is what 'auto' would use
        ampfn.with_apex("O1", model, opt)
    t = ampfn.with_apex("O1", model, opt, sync_ranks=True)
    step = t(step_fn(model, opt))
    assert step([batches(1)[0]]) is True
    # sync_ranks=None: native as soon as a group of several ranks is initialized
    monkeypatch.setattr("ampfn._distributed.world_size", lambda: 2)
    step = ampfn.with_apex("O1", model, opt)(step_fn(model, opt))
    assert step([batches(1)[0]]) is True
    with pytest.raises(Used):  # opting out leaves the choice to 'auto'
        ampfn.with_apex("O1", model, opt, sync_ranks=False)


def test_apex_per_loss_scaler_with_synced_ranks_skips_as_one_process_does(
    one_rank_group: Any,
) -> None:
    """Two losses stepped in turn (a GAN's order). The optimizer whose loss overflowed
    keeps its stale inf gradients until it zeroes them before its next backward; the
    check before the other optimizer's step must not count them (it did: every overflow
    of one loss then skipped the next update of both)."""

    def run(sync: bool) -> list[tuple[bool, bool]]:
        torch.manual_seed(0)
        a, b = nn.Linear(4, 1), nn.Linear(4, 1)
        oa = torch.optim.SGD(a.parameters(), lr=0.1)
        ob = torch.optim.SGD(b.parameters(), lr=0.1)
        apex = ampfn.with_apex(
            "O1", [a, b], [oa, ob], num_losses=2, backend="native", sync_ranks=sync
        )

        @apex
        def step(x: torch.Tensor, poison: bool) -> tuple[bool, bool]:
            oa.zero_grad()
            ampfn.backward(a(x).pow(2).mean(), loss_id=0)
            sa = ampfn.step(oa)
            ob.zero_grad()
            lb = b(x).pow(2).mean() * (float("inf") if poison else 1.0)
            ampfn.backward(lb, loss_id=1)
            return bool(sa), bool(ampfn.step(ob))

        x = torch.randn(8, 4)
        return [step(x, i == 1) for i in range(4)]

    alone = run(False)
    assert alone[1] == (True, False)  # only b's loss overflowed
    assert run(True) == alone
