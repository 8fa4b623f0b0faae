"""torch.compile of wrapped steps: no graph-break reason that the identical hand-written
step lacks, no more graphs, no recompiles from one step to the next.

Protocol, the same for ampfn and for the hand-written step: one eager warm-up step
(optimizer state and the loss scale exist afterwards, as in any run after its first
step), then compiled steps with the ``aot_eager`` backend, collecting dynamo's reasons
(``counters["graph_break"]`` and the frames it skipped whole, ``counters["unimplemented"]``,
keyed by their first two lines); then more steps with ``error_on_recompile``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn._guard import guard_suspended
from helpers import Batch, batches, mlp, params_equal

# torch 2.9 (the xla session): behaviours below that only torch 2.13 has
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)

Step = Callable[[Batch], Any]

# The guarantees are checked on torch 2.13 (the default suite's). Older dynamo cannot
# trace a flip of the autocast flag: ampfn nests torch.autocast(enabled=False) around the
# backward and the optimizer step there, which adds two tiny graphs each but no break
# reason, and compiles SGD with
# last-bit differences from eager; test_compiled_steps_match_eager covers those releases.
NEW_DYNAMO = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)

# Warnings dynamo raises from its own internals while tracing (it touches
# torch.jit.script_method in torch.optim, and reads .grad of the tensors it tracks);
# hand-written and ampfn steps alike. Anything else still fails the test.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
    ),
]


def reasons_of(counters: Any) -> set[str]:
    """Dynamo's reasons, without the one break every traced wrapped step has by design:
    the call of its guard, the eager frame that holds its try block (ampfn._traced)."""
    out = set()
    for group in ("graph_break", "unimplemented"):
        for key in counters[group]:
            lines = key.splitlines()
            reason = " | ".join(line.strip() for line in lines[:2])
            if not (reason.startswith(GUARD_BREAK) and "_guarded" in reason):
                out.add(reason)
    return out


GUARD_BREAK = "Skip inlining `torch.compiler.disable()`d function"


@contextlib.contextmanager
def recompiles_are_errors() -> Iterator[None]:
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


REGION = ("_enter_autocast", "_exit_autocast")


def region_only(gm: torch.fx.GraphModule) -> bool:
    """A graph with nothing in it but autocast's enter and exit: dynamo re-enters a
    ``with torch.autocast`` block so in the frame it resumes after a graph break inside
    the block. Hand-written steps leave the region before their backward; a wrapped
    step's region holds the whole step, so it has some."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return all(getattr(n.target, "__name__", "") in REGION for n in calls)


def compiled_run(
    step: Step, data: list[Batch], *, hand: bool = False
) -> tuple[set[str], int]:
    """Warm up eagerly, compile (aot_eager), run: the reasons and the number of graphs
    with work in them (not :func:`region_only`); then no recompiles."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    aot_eager = lookup_backend("aot_eager")
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(gm)
        return aot_eager(gm, inputs)

    ctx = guard_suspended() if hand else contextlib.nullcontext()
    with ctx:
        step(data[0])
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, backend=backend)
        for b in data[1:3]:
            compiled(b)
        reasons = reasons_of(counters)
        with recompiles_are_errors():
            for b in data[3:]:
                compiled(b)
    return reasons, sum(not region_only(g) for g in graphs)


# --------------------------------------------------------------------------- the pairs


def by_hand(
    model: nn.Module,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    opt: torch.optim.Optimizer,
) -> Step:
    def step(b: Batch) -> torch.Tensor:
        with torch.autocast(
            "cpu", dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            loss = F.cross_entropy(model(b[0]).float(), b[1])
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def with_effects(model: nn.Module, opt: Any) -> Step:
    def step(b: Batch) -> torch.Tensor:
        loss = F.cross_entropy(model(b[0]).float(), b[1])
        ampfn.backward(loss)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


class Island(nn.Module):
    """A model with an fp32 island: the loss head as ampfn.fp32, or written by hand."""

    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.body = mlp()
        self.by_hand = by_hand
        self.head = nn.Linear(3, 3)
        if not by_hand:
            self.island = ampfn.fp32(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.by_hand:
            with torch.autocast("cpu", enabled=False):
                return self.head(h.float())  # type: ignore[no-any-return]
        return self.island(h)  # type: ignore[no-any-return]


def gs() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


PIPELINES: dict[str, Callable[[], tuple[Step, Step]]] = {}


def pipeline(
    name: str,
) -> Callable[[Callable[[], tuple[Step, Step]]], Callable[[], tuple[Step, Step]]]:
    def register(f: Callable[[], tuple[Step, Step]]) -> Callable[[], tuple[Step, Step]]:
        PIPELINES[name] = f
        return f

    return register


@pipeline("autocast bf16")
def _bf16() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    return ampfn.with_autocast("bf16", "cpu")(with_effects(m, sgd(m))), by_hand(
        h, torch.bfloat16, None, sgd(h)
    )


@pipeline("autocast fp16")
def _fp16() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    return ampfn.with_autocast("fp16", "cpu")(with_effects(m, sgd(m))), by_hand(
        h, torch.float16, None, sgd(h)
    )


@pipeline("grad scaling")
def _scaling() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    return ampfn.with_grad_scaling(gs())(with_effects(m, sgd(m))), by_hand(
        h, None, gs(), sgd(h)
    )


@pipeline("fp16 + grad scaling")
def _composed() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    t = ampfn.compose(ampfn.with_grad_scaling(gs()), ampfn.with_autocast("fp16", "cpu"))
    return t(with_effects(m, sgd(m))), by_hand(h, torch.float16, gs(), sgd(h))


@pipeline("fp16 + grad scaling, fp32 island")
def _island() -> tuple[Step, Step]:
    m, h = Island(by_hand=False), Island(by_hand=True)
    t = ampfn.compose(ampfn.with_grad_scaling(gs()), ampfn.with_autocast("fp16", "cpu"))
    return t(with_effects(m, sgd(m))), by_hand(h, torch.float16, gs(), sgd(h))


@pipeline("apex O1")
def _o1() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    o = sgd(m)
    apex_like = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
    return ampfn.with_apex("O1", m, o, backend="native")(with_effects(m, o)), by_hand(
        h, torch.float16, apex_like, sgd(h)
    )


def _fp16_masters_by_hand(h: nn.Module, scaler: torch.amp.GradScaler | None) -> Step:
    masters = [p.detach().clone().requires_grad_(True) for p in h.parameters()]
    opt = torch.optim.SGD(masters, lr=0.05, momentum=0.9)
    h.half()
    halves: list[torch.Tensor] = list(h.parameters())

    def step(b: Batch) -> torch.Tensor:
        loss = F.cross_entropy(h(b[0].half()).float(), b[1])
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        for p, m in zip(halves, masters, strict=True):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        with torch.no_grad():
            torch._foreach_copy_(halves, masters)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pipeline("apex O2")
def _o2() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    o = sgd(m)
    apex_like = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
    return ampfn.with_apex("O2", m, o, backend="native")(
        with_effects(m, o)
    ), _fp16_masters_by_hand(h, apex_like)


@pipeline("apex O3")
def _o3() -> tuple[Step, Step]:
    m, h = mlp(), mlp()
    o = sgd(m)
    ours = ampfn.with_apex("O3", m, o, backend="native")(with_effects(m, o))
    h.half()
    ho = sgd(h)

    def hand(b: Batch) -> torch.Tensor:
        loss = F.cross_entropy(h(b[0].half()).float(), b[1])
        loss.backward()
        ho.step()
        ho.zero_grad(set_to_none=True)
        return loss.detach()

    return ours, hand


@pytest.mark.parametrize("name", list(PIPELINES))
def test_compiled_steps_add_no_graph_break_reason(name: str) -> None:
    ours, hand = PIPELINES[name]()
    data = batches(6)
    hand_reasons, hand_graphs = compiled_run(hand, data, hand=True)
    our_reasons, our_graphs = compiled_run(ours, data)
    assert our_reasons <= hand_reasons, f"added: {our_reasons - hand_reasons}"
    if NEW_DYNAMO:
        assert our_graphs <= hand_graphs
    else:
        assert our_graphs <= hand_graphs + 4  # the nested autocasts' enters and exits


@pytest.mark.parametrize("name", list(PIPELINES))
def test_compiled_steps_match_eager(name: str) -> None:
    """On every supported torch: the compiled step trains as the eager one does."""
    eager, _ = PIPELINES[name]()
    compiled, _ = PIPELINES[name]()
    data = batches(5)
    for b in data[:1]:
        eager(b)
        compiled(b)
    step = torch.compile(compiled, backend="aot_eager")
    for b in data[1:]:
        torch.testing.assert_close(step(b), eager(b), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sync-free


GRADSCALER_REASONS = (
    "GradScaler.scale",
    "GradScaler.step",
    "GradScaler.update",
    "GradScaler.unscale_",
)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
    ],
    ids=["SGD", "Adam"],
)
def test_sync_free_compiles_without_gradscalers_breaks_nor_recompiles_across_a_skip(
    make_opt: Any,
) -> None:
    model, ref = mlp(), mlp()
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    scaler, ref_scaler = gs(), gs()
    poison_at = {4}

    @ampfn.compose(
        ampfn.with_grad_scaling(scaler, sync=False), ampfn.with_autocast("fp16", "cpu")
    )
    def train_step(b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y, overflow = (
            b  # an overflow is data (1.0 or inf), so no recompile is needed
        )
        loss = F.cross_entropy(model(x).float(), y) * overflow
        ampfn.backward(loss)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped  # type: ignore[no-any-return]

    data = [
        (x, y, torch.tensor(float("inf") if i in poison_at else 1.0))
        for i, (x, y) in enumerate(batches(8))
    ]
    reasons, _ = compiled_run(train_step, data)  # type: ignore[arg-type]
    assert not [r for r in reasons if any(g in r for g in GRADSCALER_REASONS)], reasons
    assert not [r for r in reasons if "item()" in r or "__bool__" in r], reasons
    # the same run eagerly with GradScaler: identical parameters, state and scale
    for x, y, overflow in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x).float(), y) * overflow
        ref_scaler.scale(loss).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
    assert (
        scaler.state_dict() == ref_scaler.state_dict()
    )  # the same skips, the same scale
    if isinstance(opt, torch.optim.SGD) and NEW_DYNAMO:
        assert params_equal(model, ref)
    else:  # dynamo's Adam keeps its step count as a tensor (bias correction rounds
        # differently), and older dynamo compiles SGD with last-bit differences
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_compiled_model_inside_a_wrapped_step_keeps_working() -> None:
    model, ref = mlp(), mlp()
    compiled_model: Any = torch.compile(copy.deepcopy(model), backend="aot_eager")
    opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    t = ampfn.compose(ampfn.with_grad_scaling(gs()), ampfn.with_autocast("bf16", "cpu"))
    step, ref_step = t(with_effects(compiled_model, opt)), t(with_effects(ref, ref_opt))
    for b in batches(3):
        torch.testing.assert_close(step(b), ref_step(b))
    assert params_equal(compiled_model, ref)


def test_a_compiled_models_graphs_are_the_hand_written_steps() -> None:
    """No ampfn frame inside the model's graph: ampfn runs around the compiled model,
    never in it, so its graphs are those of the same model in a hand-written step."""
    graphs: dict[str, list[torch.fx.GraphModule]] = {"ours": [], "hand": []}

    def compiled(model: nn.Module, key: str) -> Any:
        def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
            graphs[key].append(gm)
            return gm.forward

        return torch.compile(model, backend=backend)

    m, h = mlp(), mlp()
    cm, ch = compiled(m, "ours"), compiled(h, "hand")
    t = ampfn.compose(ampfn.with_grad_scaling(gs()), ampfn.with_autocast("bf16", "cpu"))
    ours, hand = (
        t(with_effects(cm, sgd(cm))),
        by_hand(ch, torch.bfloat16, gs(), sgd(ch)),
    )
    for b in batches(3):
        ours(b)
        with guard_suspended():
            hand(b)
    assert graphs["ours"]
    assert ampfn_frames(graphs["ours"]) == []
    assert ops_of(graphs["ours"]) == ops_of(graphs["hand"])


# ------------------------------------------------------------ the graphs, op for op

SRC = str(Path(ampfn.__file__).parent)


def recorded_graphs(step: Step, data: list[Batch], *, hand: bool = False) -> list[Any]:
    """The FX graphs dynamo hands the backend, with compiled_run's protocol."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    with guard_suspended() if hand else contextlib.nullcontext():
        step(data[0])
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend)
        for b in data[1:]:
            compiled(b)
    return graphs


def ops_of(graphs: list[Any]) -> list[list[str]]:
    """Each graph's operations, without autocast's enter and exit (a wrapped step enters
    its region around the user's step, a hand-written step inside it), and without the
    graphs that hold nothing else (:func:`region_only`)."""
    calls = ("call_function", "call_method", "call_module")
    out = []
    for g in graphs:
        names = [
            getattr(n.target, "__name__", str(n.target))
            for n in g.graph.nodes
            if n.op in calls
        ]
        out.append([n for n in names if n not in REGION])
    return [ops for ops in out if ops]  # (no region_only graph)


TORCH_SRC = str(Path(torch.__file__).parent)


def ampfn_frames(graphs: list[Any]) -> list[str]:
    """The operations ampfn's own code put in the graphs: those whose innermost frame
    outside torch is in ampfn's source. (Every operation of a traced wrapped step has
    ampfn's wrapper at the root of its stack.)"""
    calls = ("call_function", "call_method", "call_module")
    out = []
    for g in graphs:
        for n in g.graph.nodes:
            files = re.findall(r'File "([^"]+)"', n.meta.get("stack_trace") or "")
            own = [f for f in files if not f.startswith(TORCH_SRC)]
            if n.op in calls and own and own[-1].startswith(SRC):
                out.append(f"{n.op} {n.target} ({own[-1]})")
    return out


# pipelines whose work is all torch's (autocast, GradScaler); the others cast inputs or
# keep master weights, which puts ampfn's own ops in the graph as the hand-written twin's
TORCHS_WORK_ONLY = [
    "autocast bf16",
    "autocast fp16",
    "grad scaling",
    "fp16 + grad scaling",
    "apex O1",
]


@pytest.mark.skipif(
    not NEW_DYNAMO, reason="older dynamo traces ampfn's nested autocast"
)
@pytest.mark.parametrize("name", TORCHS_WORK_ONLY)
def test_compiled_steps_graphs_are_the_hand_written_ones_op_for_op(name: str) -> None:
    """No ampfn frame inside the compiled graphs, and no op the hand-written step lacks."""
    ours, hand = PIPELINES[name]()
    data = batches(4)
    our_graphs = recorded_graphs(ours, data)
    assert ampfn_frames(our_graphs) == []
    assert ops_of(our_graphs) == ops_of(recorded_graphs(hand, data, hand=True))


def _fp8_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def test_a_compiled_fp8_step_adds_no_break_beyond_hand_written_torchao() -> None:
    pytest.importorskip("torchao", reason="the fp8 extra (torchao) is not installed")
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    data = [(torch.randn(8, 32), torch.randint(0, 16, (8,))) for _ in range(6)]
    m = _fp8_model()
    o = sgd(m)
    ours = ampfn.compose(
        ampfn.with_autocast("bf16", "cpu"), ampfn.with_float8(m, emulate=True)
    )(with_effects(m, o))
    h = _fp8_model()
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True
    )
    convert_to_float8_training(h, config=config)
    hand = by_hand(h, torch.bfloat16, None, sgd(h))
    hand_reasons, hand_graphs = compiled_run(hand, data, hand=True)
    our_reasons, our_graphs = compiled_run(ours, data)
    assert our_reasons <= hand_reasons, f"added: {our_reasons - hand_reasons}"
    assert our_graphs <= hand_graphs


# --------------------------------------------------------------------------- clipping


@pytest.mark.xfail(
    OLD_TORCH,
    strict=True,
    reason="torch < 2.13: dynamo breaks the graph on a torch op returning a non-tensor in "
    "clipping",
)
@pytest.mark.parametrize("sync", [True, False], ids=["syncing", "sync-free"])
def test_clipping_a_parameter_list_adds_no_graph_break_reason(sync: bool) -> None:
    """``ampfn.clip_grad_norm_(list(model.parameters()), ...)`` under compile adds no
    reason to the compiled sync-free step, and no host read; to the syncing step only
    the skipped ``GradScaler.unscale_`` that hand-written clipping calls too; nor does
    ``model.parameters()`` (a generator), with the same numbers."""

    def run(clip: str | None) -> tuple[set[str], nn.Module]:
        model = mlp()
        opt = sgd(model)

        @ampfn.compose(
            ampfn.with_grad_scaling(gs(), sync=sync), ampfn.with_autocast("fp16", "cpu")
        )
        def train_step(b: Batch) -> Any:
            ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
            if clip == "list":
                ampfn.clip_grad_norm_(list(model.parameters()), 1.0, opt)
            elif clip == "generator":
                ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return stepped

        reasons, _ = compiled_run(train_step, batches(5))
        return reasons, model

    plain, _ = run(None)
    listed, m_list = run("list")
    generated, m_gen = run("generator")
    extra = {r for r in listed - plain if "`GradScaler.unscale_`" not in r or not sync}
    assert not extra, extra
    assert generated <= listed, generated - listed
    if not sync:
        assert not [r for r in listed if "item()" in r or "__bool__" in r], listed
    assert params_equal(m_list, m_gen)


# ------------------------------------------- sync-free: no eager frame, no host read


@contextlib.contextmanager
def frames_run_eagerly() -> Iterator[list[str]]:
    """The frames dynamo set out to compile and ran eagerly instead (after a graph break
    it cannot resume after, such as one inside a try block): dynamo logs each as "WON'T
    CONVERT <function> <file> line <n>". Each entry is that line."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    found: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = record.getMessage().split("\n")[0]
            if line.startswith("WON'T CONVERT"):
                found.append(line)

    handler, level = Record(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def ours(frames: list[str]) -> list[str]:
    """The frames of ampfn's source and of this file (the user's steps)."""
    return [f for f in frames if SRC in f or __file__ in f]


def host_reads(fn: Callable[[], Any]) -> int:
    """How many times ``fn`` reads a tensor back to the host (``.item()``, ``bool()``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    reads = ("aten::_local_scalar_dense", "aten::item")
    return sum(e.count for e in prof.key_averages() if e.key in reads)


def test_the_eager_frame_record_sees_a_frame_that_dynamo_runs_eagerly() -> None:
    def breaks_in_a_try_block(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        try:
            torch._dynamo.graph_break()
        finally:
            y = y * 2
        return y

    torch._dynamo.reset()
    with frames_run_eagerly() as frames:
        torch.compile(breaks_in_a_try_block, backend="aot_eager")(torch.ones(2))
    assert [f.split()[2] for f in ours(frames)] == ["breaks_in_a_try_block"]


OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


def clipped_step(
    model: nn.Module, opt: torch.optim.Optimizer, sync: bool, generator: bool
) -> Step:
    @ampfn.compose(
        ampfn.with_grad_scaling(gs(), sync=sync), ampfn.with_autocast("fp16", "cpu")
    )
    def train_step(b: Batch) -> Any:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
        params = model.parameters() if generator else list(model.parameters())
        ampfn.clip_grad_norm_(params, 1.0, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    return train_step  # type: ignore[no-any-return]


@pytest.mark.skipif(not NEW_DYNAMO, reason="the guarantee is made on torch 2.13")
@pytest.mark.parametrize("generator", [False, True], ids=["list", "generator"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_sync_free_runs_no_frame_eagerly_and_reads_nothing_back(
    name: str, generator: bool
) -> None:
    """After the eager warm-up step, dynamo compiles every frame of a sync-free step
    (ampfn's and the user's: none runs eagerly) and nothing is read back to the host;
    clipping takes the parameters as a list or as model.parameters()."""
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    step = clipped_step(model, opt, sync=False, generator=generator)
    data = batches(6)
    step(data[0])
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    with frames_run_eagerly() as frames:
        for b in data[1:3]:
            compiled(b)
    assert ours(frames) == []
    with recompiles_are_errors():
        reads = host_reads(lambda: [compiled(b) for b in data[3:]])
    assert reads == optimizers_own_reads(name, steps=len(data[3:]))


def optimizers_own_reads(name: str, steps: int) -> int:
    """The host reads of a fused optimizer's own steps, given ``found_inf``: torch's
    fused CPU kernels read it on the host (per tensor; the CUDA ones do not). None for
    the others, whose compiled steps read nothing."""
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return 0
    opt.found_inf = torch.zeros(())  # type: ignore[attr-defined]

    def run() -> None:
        for b in batches(steps):
            F.cross_entropy(model(b[0]), b[1]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run()  # the first step makes the state
    return host_reads(run)


def test_the_host_read_count_sees_the_syncing_steps_reads() -> None:
    model = mlp()
    step = torch.compile(
        clipped_step(model, sgd(model), sync=True, generator=False), backend="aot_eager"
    )
    data = batches(3)
    step(data[0])
    assert host_reads(lambda: [step(b) for b in data[1:]]) >= 2  # GradScaler.step's


def sync_free_by_hand(
    model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> Step:
    """The sync-free update written out in one frame, with the kernels ampfn uses: the
    fewest graphs the optimizer allows (its step breaks the graph)."""
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scale, growth = scaler._scale, scaler._growth_tracker
    assert scale is not None
    assert growth is not None

    def step(b: Batch) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(b[0]).float(), b[1])
        (loss * scale).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        found = torch.zeros((), dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(
            [p.grad for p in params if p.grad is not None],
            found,
            scale.double().reciprocal().float(),
        )
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        if any(p not in opt.state for p in params):  # the first step makes the state
            if not bool(found):
                opt.step()
        else:
            old = [p.detach().clone() for p in params]
            state = [(opt.state[p], dict(opt.state[p])) for p in params]
            old_state = [{k: v.clone() for k, v in s.items()} for _, s in state]
            opt.step()
            with torch.no_grad():
                bad = found > 0
                for p, o in zip(params, old, strict=True):
                    torch.where(bad, o, p, out=p)
                for (now, _), saved in zip(state, old_state, strict=True):
                    for k, o in saved.items():
                        torch.where(bad, o, now[k], out=now[k])
        torch._amp_update_scale_(scale, growth, found.clone(), 2.0, 0.5, 2)
        opt.zero_grad(set_to_none=True)
        return found == 0

    return step


@pytest.mark.skipif(not NEW_DYNAMO, reason="the guarantee is made on torch 2.13")
def test_compiled_sync_free_has_the_graphs_of_the_same_update_written_by_hand() -> None:
    """Unscale, clip, the masked step and the scale update compile into no more graphs
    than the same update written out in one frame, and train bit for bit like it."""
    model, ref = mlp(), mlp()
    opt, ref_opt = sgd(model), sgd(ref)
    ours = clipped_step(model, opt, sync=False, generator=False)
    hand = sync_free_by_hand(ref, ref_opt, gs())
    data = batches(6)
    hand_reasons, hand_graphs = compiled_run(hand, data, hand=True)
    our_reasons, our_graphs = compiled_run(ours, data)
    assert our_graphs <= hand_graphs
    assert our_reasons <= hand_reasons, f"added: {our_reasons - hand_reasons}"
    assert params_equal(model, ref)


@pytest.mark.skipif(not NEW_DYNAMO, reason="compared bit for bit on torch 2.13")
@pytest.mark.parametrize("sync", [True, False], ids=["syncing", "sync-free"])
def test_a_compiled_step_that_raises_ends_its_call_as_an_eager_one_does(
    sync: bool,
) -> None:
    """A compiled step that raises after unscaling (the guard's failure path) leaves the
    pipeline as the same eager step leaves it: no call left active, the gradients scaled
    again, the scaler unchanged; the next steps train alike."""
    from ampfn._runtime import current_call

    def make() -> tuple[Step, nn.Module, torch.amp.GradScaler, list[bool]]:
        model, scaler, fail = mlp(), gs(), [False]
        opt = sgd(model)

        @ampfn.compose(
            ampfn.with_grad_scaling(scaler, sync=sync),
            ampfn.with_autocast("fp16", "cpu"),
        )
        def train_step(b: Batch) -> Any:
            ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
            ampfn.clip_grad_norm_(list(model.parameters()), 1.0, opt)
            if fail[0]:
                raise RuntimeError("the user's step failed")
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return stepped

        return train_step, model, scaler, fail

    eager, eager_model, eager_scaler, eager_fail = make()
    step, model, scaler, fail = make()
    compiled = torch.compile(step, backend="aot_eager")
    data = batches(6)
    eager(data[0])
    step(data[0])
    for i, b in enumerate(data[1:]):
        fail[0] = eager_fail[0] = i == 2
        if fail[0]:
            with pytest.raises(RuntimeError, match="the user's step failed"):
                eager(b)
            with pytest.raises(RuntimeError, match="the user's step failed"):
                compiled(b)
            assert current_call() is None
            for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
                assert p.grad is not None
                assert q.grad is not None
                assert torch.equal(p.grad, q.grad)  # scaled again, as eagerly
            assert scaler.state_dict() == eager_scaler.state_dict()
        else:
            eager(b)
            compiled(b)
    assert params_equal(model, eager_model)
    assert scaler.state_dict() == eager_scaler.state_dict()


@pytest.mark.skipif(
    not NEW_DYNAMO,
    reason="without nested graph breaks (torch < 2.13) ampfn's effects compile as frames "
    "of their own, whose code all pipelines share",
)
def test_more_compiled_pipelines_than_dynamos_recompile_limit_all_compile() -> None:
    """Dynamo keeps at most recompile_limit (8) compiled versions per code object and
    runs the code eagerly after that: every pipeline has code objects of its own, so the
    ninth compiled pipeline compiles as the first did."""
    limit = int(torch._dynamo.config.recompile_limit)
    data = batches(2)
    torch._dynamo.reset()
    for _ in range(limit + 2):
        model = mlp()
        user_step = with_effects(model, sgd(model))
        user_step.__code__ = (
            user_step.__code__.replace()
        )  # the user's: one per pipeline
        compiled = torch.compile(
            ampfn.with_autocast("bf16", "cpu")(user_step), backend="aot_eager"
        )
        with frames_run_eagerly() as frames:
            for b in data:
                compiled(b)
        assert ours(frames) == []
