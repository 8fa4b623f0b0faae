"""with_autocast and fp32 islands."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ampfn
from helpers import Batch, batches, mlp, params_equal


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [
        (torch.float16, torch.float16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("16-mixed", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("bf16-mixed", torch.bfloat16),
    ],
)
def test_forward_runs_under_autocast(spec: Any, dtype: torch.dtype) -> None:
    lin = nn.Linear(4, 4)

    @ampfn.with_autocast(spec, "cpu")
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return lin(x), torch.is_autocast_enabled("cpu")

    out, enabled = forward(torch.randn(2, 4))
    assert out.dtype == dtype
    assert enabled
    assert lin.weight.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


def _autocast_state() -> tuple[Any, ...]:
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return (
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
        torch.is_autocast_cache_enabled(),
        nesting,
    )


HALVES = st.sampled_from([torch.float16, torch.bfloat16])


@given(
    outer_on=st.booleans(),
    outer_dtype=HALVES,
    outer_cache=st.booleans(),
    dtype=HALVES,
    cache=st.sampled_from([None, True, False]),
    fails=st.booleans(),
)
def test_the_autocast_region_is_torch_autocasts(
    outer_on: bool,
    outer_dtype: torch.dtype,
    outer_cache: bool,
    dtype: torch.dtype,
    cache: bool | None,
    fails: bool,
) -> None:
    """Inside and after the wrapped step, the autocast state is what the identical
    ``with torch.autocast(...)`` gives (ampfn enters it inline in eager code), raising or
    not, whatever the state around it."""

    def body() -> tuple[Any, ...]:
        state = _autocast_state()
        if fails:
            raise KeyError("inside")
        return state

    wrapped = ampfn.with_autocast(dtype, "cpu", cache_enabled=cache)(body)

    def by_hand() -> tuple[Any, ...]:
        kwargs = {} if cache is None else {"cache_enabled": cache}
        with torch.autocast("cpu", dtype=dtype, **kwargs):
            return body()

    results = []
    was_cache = torch.is_autocast_cache_enabled()
    try:
        for run in (wrapped, by_hand):
            with torch.autocast(
                "cpu", dtype=outer_dtype, enabled=outer_on, cache_enabled=outer_cache
            ):
                before = _autocast_state()
                try:
                    inside = run()
                except KeyError:
                    inside = None
                results.append((inside, _autocast_state() == before))
    finally:
        torch.set_autocast_cache_enabled(was_cache)
    assert results[0] == results[1]
    assert results[0][1]


def test_the_autocast_cache_is_dropped_after_each_step() -> None:
    """Autocast caches the half copies of leaf weights until the outermost region exits;
    a step that kept them would compute with the weights of the step before."""
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    forward = ampfn.with_autocast("fp16", "cpu")(lin)
    forward(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    with torch.autocast("cpu", dtype=torch.float16):
        expected = lin(x)
    assert torch.equal(forward(x), expected)


def test_the_autocast_region_under_a_torch_function_mode() -> None:
    """Under a torch function mode (``torch.device`` here) ampfn uses torch.autocast
    itself, which export's pre-dispatch tracing relies on."""
    lin = nn.Linear(4, 4)
    forward = ampfn.with_autocast("bf16", "cpu")(lin)
    with torch.device("cpu"):
        assert forward(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


class MatmulSGD(torch.optim.SGD):
    """An optimizer that multiplies matrices in its step, as Muon and Shampoo do."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)
        self.dtypes: list[torch.dtype] = []

    @torch.no_grad()  # type: ignore[misc]
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.dim() == 2:
                    self.dtypes.append((p.grad @ p.grad.T).dtype)
        return super().step(closure)


@pytest.mark.parametrize(
    "make",
    [
        lambda model, opt: ampfn.with_autocast("bf16", "cpu"),
        lambda model, opt: ampfn.compose(
            ampfn.with_grad_scaling(torch.amp.GradScaler("cpu", init_scale=256.0)),
            ampfn.with_autocast("fp16", "cpu"),
        ),
        lambda model, opt: ampfn.with_apex(
            "O1", model, opt, backend="native", loss_scale=256.0
        ),
    ],
    ids=["bf16", "fp16+scaling", "apex-O1"],
)
def test_the_optimizer_steps_with_autocast_off(make: Any) -> None:
    """Hand-written code steps outside the autocast region: so does ampfn.step."""
    model = mlp()
    opt = MatmulSGD(model.parameters())

    @make(model, opt)
    def train_step(b: Any) -> None:
        ampfn.backward(model(b[0]).float().mean())
        assert torch.is_autocast_enabled("cpu")  # the rest of the step is the forward's
        ampfn.step(opt)
        assert torch.is_autocast_enabled("cpu")
        opt.zero_grad()

    x = torch.randn(8, 8)
    train_step((x,))
    train_step((x,))
    assert opt.dtypes
    assert set(opt.dtypes) == {torch.float32}


def test_a_forward_after_the_step_sees_the_new_weights() -> None:
    """Several updates in one call: each forward uses the weights the last step left,
    not the region's cached half copies of the old ones."""
    data = batches(3)

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    model, opt = make()

    @ampfn.with_autocast("bf16", "cpu")
    def train_steps(bs: list[Batch]) -> list[torch.Tensor]:
        losses = []
        for x, y in bs:
            loss = F.cross_entropy(model(x).float(), y)
            ampfn.backward(loss)
            ampfn.step(opt)
            opt.zero_grad()
            losses.append(loss.detach())
        return losses

    ref_model, ref_opt = make()
    expected = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ref_model(x).float(), y)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        expected.append(loss.detach())
    assert [float(v) for v in train_steps(data)] == [float(v) for v in expected]
    assert params_equal(model, ref_model)


def test_autocast_is_back_on_after_a_backward_that_raised() -> None:
    """An error in ampfn.backward (here a bad loss_id, raised while telemetry reads the
    scale) leaves the rest of the step under autocast."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[bool] = []

    @ampfn.compose(
        ampfn.with_telemetry([]),
        ampfn.with_apex("O1", model, opt, backend="native", num_losses=2),
    )
    def train_step(x: torch.Tensor) -> None:
        with pytest.raises(ValueError, match="loss_id is 5"):
            ampfn.backward(model(x).float().sum(), loss_id=5)
        seen.append(torch.is_autocast_enabled("cpu"))

    train_step(torch.randn(4, 8))
    assert seen == [True]


def test_backward_runs_with_autocast_off(device: str, half: torch.dtype) -> None:
    seen: list[bool] = []
    w = torch.ones(3, device=device, requires_grad=True)

    def spy(grad: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled(device))
        return grad

    w.register_hook(spy)

    @ampfn.with_autocast(half, device)
    def train_step(x: torch.Tensor) -> bool:
        ampfn.backward((w * x).sum())
        return torch.is_autocast_enabled(device)

    assert train_step(torch.ones(3, device=device)) is True
    assert seen == [False]


def test_default_device_type() -> None:
    t = ampfn.with_autocast("bf16")
    assert t.name == "with_autocast"


@pytest.mark.parametrize(
    ("dtype", "error", "needle"),
    [
        (torch.int8, ValueError, "got torch.int8"),
        (torch.float64, ValueError, "got torch.float64"),
        (torch.float32, ValueError, "got torch.float32"),
        ("float32", ValueError, "got 'float32'"),
        ("", ValueError, "got ''"),
        (16, TypeError, "got int 16"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_bad_dtype_fails_at_construction(
    dtype: Any, error: type[Exception], needle: str
) -> None:
    with pytest.raises(
        error,
        match=r"with_autocast\(dtype, device_type\): expected torch.float16 or torch.bfloat16",
    ) as e:
        ampfn.with_autocast(dtype, "cpu")
    assert needle in str(e.value)


@pytest.mark.parametrize("name", ["float16", "f16", "fp16", "half", "16-mixed"])
def test_every_dtype_name_get_policy_takes_is_taken(name: str) -> None:
    """with_autocast takes the names of ampfn's one dtype table, as get_policy does
    ("half" was refused here and accepted there)."""
    assert (
        ampfn.get_policy(name if name != "16-mixed" else "16-mixed").compute_dtype
        == torch.float16
    )
    t = ampfn.with_autocast(name, "cpu")
    assert (
        t(
            lambda: torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        )()
        == torch.float16
    )


def test_bad_device_type_fails_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match=r"with_autocast\(dtype, device_type\): .* not available on 'nodevice'",
    ):
        ampfn.with_autocast("bf16", "nodevice")
    with pytest.raises(
        ValueError,
        match=r"with_autocast\(dtype, device_type\): device_type is a device type",
    ):
        ampfn.with_autocast("bf16", "cuda:0")
    with pytest.raises(
        TypeError,
        match=r"with_autocast\(dtype, device_type\): device_type must be a string",
    ):
        ampfn.with_autocast("bf16", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"with_autocast\(dtype, device_type\): cache_enabled must be a bool",
    ):
        ampfn.with_autocast("bf16", "cpu", cache_enabled="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error for an absent CUDA"
)
def test_cuda_without_cuda_fails_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match=r"with_autocast\(dtype, device_type\): torch.float16 autocast is not available on 'cuda'",
    ):
        ampfn.with_autocast("fp16", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.is_bf16_supported(),
    reason="needs a GPU without bf16",
)
def test_bf16_on_a_gpu_without_bf16_fails() -> (
    None
):  # pragma: no cover - needs old hardware
    with pytest.raises(ValueError, match="bfloat16"):
        ampfn.with_autocast("bf16", "cuda")


# --------------------------------------------------------------------------- fp32 islands


def _segment_sum(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, src.shape[1], dtype=src.dtype, device=src.device)
    return out.index_add(0, index, src)


def _scatter_sum(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, src.shape[1], dtype=src.dtype, device=src.device)
    return out.scatter_add(0, index[:, None].expand_as(src), src)


@pytest.mark.parametrize(
    "reduce", [_segment_sum, _scatter_sum], ids=["index_add", "scatter_add"]
)
def test_fp32_island_reduces_in_float32(
    device: str, half: torch.dtype, reduce: Any
) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).to(device)
    x = torch.randn(4096, 8, device=device) * 30
    index = torch.randint(0, 4, (4096,), device=device)
    reference = reduce(lin(x), index, 4)  # plain fp32
    island = ampfn.fp32(reduce)

    @ampfn.with_autocast(half, device)
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = lin(x)
        return h, island(h, index, 4), reduce(h, index, 4)

    h, in_island, in_half = forward(x)
    assert h.dtype == in_half.dtype == half
    assert in_island.dtype == torch.float32
    # The island's input is the half-precision activation; from there on it is plain fp32
    # (bit for bit on the CPU; CUDA's atomic adds sum in any order).
    expected = reduce(h.float(), index, 4)
    if device == "cpu":
        assert torch.equal(in_island, expected)
    else:
        torch.testing.assert_close(in_island, expected, rtol=1e-5, atol=1e-4)
    island_error = (in_island - reference).abs().max().item()
    half_error = (in_half.float() - reference).abs().max().item()
    assert island_error < half_error


def test_fp32_island_module_wraps_in_place_of_it(
    device: str, half: torch.dtype
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), ampfn.fp32(nn.Linear(4, 2))).to(device)
    assert isinstance(model[1], ampfn.FP32Island)

    @ampfn.with_autocast(half, device)
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model[0](x), model(x)

    h, out = forward(torch.randn(3, 4, device=device))
    assert h.dtype == half
    assert out.dtype == torch.float32
    inner = model[1].module
    assert torch.equal(out, inner(h.float()))


def test_fp32_island_keeps_function_identity_and_nested_args() -> None:
    @ampfn.fp32
    def total(parts: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Sum."""
        return sum(t.sum() for t in parts["a"])  # type: ignore[return-value]

    assert total.__name__ == "total"
    assert total.__doc__ == "Sum."
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = total(
            {
                "a": [
                    torch.ones(2, dtype=torch.bfloat16),
                    torch.ones(3, dtype=torch.float16),
                ]
            }
        )
    assert out.dtype == torch.float32
    assert out.item() == 5.0


def test_fp32_rejects_non_callables() -> None:
    with pytest.raises(
        TypeError,
        match=r"fp32\(fn_or_module\): expected a function or an nn.Module, got int",
    ):
        ampfn.fp32(3)  # type: ignore[call-overload]


def test_fp32_island_trains_with_scaling() -> None:
    model = nn.Sequential(mlp(), ampfn.fp32(nn.LogSoftmax(dim=-1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", "cpu"))
    def train_step(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        loss = -out[:, 0].mean()
        ampfn.backward(loss)
        ampfn.step(opt)
        return out

    out = train_step(torch.randn(5, 8))
    assert out.dtype == torch.float32
