"""The demo runs, prints its table, and explains bad options."""

from __future__ import annotations

import importlib.util

import pytest

from ampfn import demo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="needs the demo extra"
)


def test_demo_prints_a_row_per_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    pipelines = "fp32,bf16,fp16,apex-O1,apex-O2,apex-O3"
    assert (
        demo.main(
            [
                "--steps",
                "30",
                "--pipelines",
                pipelines,
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    assert header[:2] == ["pipeline", "final"]
    rows = {line.split()[0]: line.split() for line in out[3:]}
    assert list(rows) == pipelines.split(",")
    for name, row in rows.items():
        loss, acc = float(row[1]), float(row[2])
        assert 0 < loss < 2.5, name
        assert acc > 0.5, name  # 30 steps already beat chance (0.1) by far
    assert rows["fp32"][-1] == "-"
    assert rows["fp16"][-1] == "65536"


def test_demo_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--pipelines", "--device", "--seed"):
        assert option in out


def test_demo_rejects_unknown_pipelines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--pipelines", "fp8"])
    assert e.value.code == 2
    assert "--pipelines: 'fp8' is not one of fp32" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed"
)
def test_demo_on_xla_without_torch_xla_says_how_to_get_it() -> None:
    with pytest.raises(
        SystemExit, match=r"--device xla needs torch_xla .*ampfn\[xla\]"
    ):
        demo.main(["--device", "xla"])
