"""benchmarks/ runs: a smoke run of each script (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_compares_every_pipeline_with_its_hand_written_loop() -> None:
    import bench

    out = bench.main(["--quick", "--sizes", "tiny", "--rounds", "3"])
    assert [r["pipeline"] for r in out["results"]] == list(bench.PAIRS)
    for r in out["results"]:
        assert r["ours_us"] > 0
        assert r["hand_us"] > 0
        lo, mid, hi = r["ratio"][1], r["ratio"][0], r["ratio"][2]
        assert lo <= mid <= hi


def test_gpt_benchmark_runs_every_precision_on_a_tiny_config() -> None:
    import gpt

    results = gpt.main(
        [
            "--config",
            "tiny",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert [r["precision"] for r in results] == list(gpt.PRECISIONS)
    assert all(r["ampfn tok/s"] > 0 for r in results)
    assert all(r["by hand tok/s"] > 0 for r in results)


@pytest.mark.filterwarnings(  # dynamo's own, tracing torch.optim (as in test_compile)
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning",
)
def test_compiled_scaling_benchmark_runs_on_a_tiny_config() -> None:
    import compiled_scaling

    args = "--backend aot_eager --rounds 2 --steps 1 --layers 1 --width 32 --seq 8"
    out = compiled_scaling.main([*args.split(), "--optimizer", "fused"])
    names = ["ampfn sync-free", "ampfn syncing", "hand GradScaler"]
    assert list(out["shape"]) == names
    assert all(out["shape"][n]["graphs"] > 0 for n in names)
    assert list(out["times"]) == names


def test_harness_statistics() -> None:
    from harness import Stat, compare

    s = Stat.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.median == 3.0
    assert s.q1 < 3.0 < s.q3
    c = compare({"a": [2.0, 4.0, 6.0, 8.0], "b": [1.0, 2.0, 3.0, 4.0]}, "a", "b")
    assert c.ratio.median == 2.0
    assert c.diff.median == 2.5


# dynamo's own warnings while tracing (as in tests/test_compile.py)
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)
def test_compiled_pairs_never_recompile_between_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Suspending ampfn's optimizer hook around the hand-written rounds changed the
    global hook dict that dynamo guards on: every timed round recompiled both loops,
    until dynamo's recompile limit sent them back to eager. Recompiles during the
    warm-up (optimizer state appearing) are fine; the timed rounds must have none."""
    import bench
    import torch._dynamo

    timed = bench.interleave_with_guard

    def strict(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(error_on_recompile=True):
            return timed(*args, **kwargs)

    monkeypatch.setattr(bench, "interleave_with_guard", strict)
    out = bench.main(
        [
            "--quick",
            "--compile",
            "--backend",
            "aot_eager",
            "--sizes",
            "tiny",
            "--pipelines",
            "autocast fp16 + scaling",
            "--rounds",
            "3",
        ]
    )
    assert [r["pipeline"] for r in out["results"]] == ["autocast fp16 + scaling"]
