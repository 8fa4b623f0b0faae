"""The demo runs, prints its table, and explains bad options."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from ampfn import demo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="needs the demo extra"
)


def test_demo_prints_a_row_per_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    pipelines = "fp32,bf16,fp16,apex-O0,apex-O1,apex-O2,apex-O3,bf16-true,16-true,bf16-true+master,bf16-true+sr"
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
    assert rows["apex-O0"][-1] == rows["apex-O3"][-1] == "1"  # their static scale
    assert rows["fp32"][3] == "-"  # vs fp32
    assert rows["bf16"][3].endswith("pt") or rows["bf16"][4] == "pt"


def test_demo_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--pipelines", "--device", "--seed"):
        assert option in out


def test_demo_help_states_the_defaults_parse_args_chooses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    found = re.search(
        r"from (.+?) \(default (\S+)\); with --device xla, from (.+?) \(default (\S+)\)",
        text,
    )
    assert found is not None, text
    cpu_valid, cpu_default, xla_valid, xla_default = found.groups()
    assert cpu_valid.split(", ") == list(demo.PIPELINES)
    assert cpu_default.split(",") == demo.parse_args(["--device", "cpu"]).pipelines
    assert xla_valid.split(", ") == list(demo._XLA_PIPELINES)
    assert xla_default.split(",") == demo.parse_args(["--device", "xla"]).pipelines
    # what the help lists for xla is what --device xla accepts
    assert demo.parse_args(
        ["--device", "xla", "--pipelines", ",".join(demo._XLA_PIPELINES)]
    ).pipelines == list(demo._XLA_PIPELINES)


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
        SystemExit, match=r"--device xla needs torch_xla .*pip install -e '\.\[xla\]'"
    ):
        demo.main(["--device", "xla"])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_demo_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "demo.png", tmp_path / "demo.json"
    args = [
        "--steps",
        "25",
        "--pipelines",
        "fp32,fp16",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert demo.main([*args, "--plot", str(png), "--json", str(out)]) == 0
    inches, dpi = demo.FIGURE_INCHES, demo.FIGURE_DPI
    assert _png_size(png) == (int(inches[0] * dpi), int(inches[1] * dpi))
    saved = json.loads(out.read_text())
    assert [r["pipeline"] for r in saved["table"]] == ["fp32", "fp16"]
    fp16 = saved["history"]["fp16"]
    assert len(fp16["loss"]) == len(fp16["loss_scale"]) == 25
    assert fp16["loss_scale"][0] == 65536.0
    assert saved["history"]["fp32"]["loss_scale"] == [None] * 25
    assert "figure: " in capsys.readouterr().out


def test_demo_help_names_the_command_it_was_run_as(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv0, prog in (
        ("/usr/bin/ampfn-demo", "ampfn-demo"),
        ("/x/ampfn/demo.py", "python -m ampfn.demo"),
    ):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit):
            demo.main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_demo_explains_tpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "tpu"])
    assert e.value.code == 2
    assert (
        "--device tpu: TPUs run through torch_xla; use --device xla"
        in capsys.readouterr().err
    )
