"""The README's example and the examples/ scripts run as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_readme_first_pipeline_runs_and_is_as_long_as_it_says() -> None:
    text = (ROOT / "README.md").read_text()
    heading, section = text.split("## A first pipeline (", 1)[1].split("\n", 1)
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    code_lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert heading == f"{len(code_lines)} lines of code)"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    assert "checkpoint" in namespace


def test_readme_setup_is_two_commands_and_ci_runs_the_test_one() -> None:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", setup, re.S)
    assert block is not None
    commands = [
        line.split("#")[0].strip()
        for line in block.group(1).splitlines()
        if line.strip()
    ]
    assert len(commands) == 2
    assert commands[0].endswith("python -m ampfn.demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_property_testing_example_runs() -> None:
    module = runpy.run_path(str(ROOT / "examples" / "property_test_my_model.py"))
    module["test_fp16_training_is_stable"]()  # type: ignore[operator]


def _torchrun(script: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ddp_example_runs_on_two_processes() -> None:
    assert "loss scale on every rank: [65536.0, 65536.0]" in _torchrun("ddp.py")


def test_fsdp2_example_resumes_bit_for_bit() -> None:
    assert "bit for bit the same as the uninterrupted run: True" in _torchrun(
        "fsdp2.py"
    )


def test_readme_counts_the_property_example_truly() -> None:
    text = (ROOT / "README.md").read_text()
    lines = len(
        (ROOT / "examples" / "property_test_my_model.py").read_text().splitlines()
    )
    assert f"of its own ({lines} lines, comments included)" in text


def test_readme_and_errors_install_from_a_checkout() -> None:
    text = (ROOT / "README.md").read_text()
    assert "pip install 'ampfn[" not in text
    assert 'pip install "ampfn[' not in text
    assert (ROOT / "LICENSE").exists()


def _python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_recipes_run_as_written() -> None:
    """Accumulation, the schedule that follows real steps, and evaluation, in order,
    after the first pipeline's set-up (its model and optimizer)."""
    import torch

    accumulate, schedule, evaluate = _python_blocks("Recipes")
    torch.manual_seed(0)
    ns: dict[str, Any] = {}
    exec(
        "import torch, torch.nn as nn, torch.nn.functional as F, ampfn\n"
        "model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))\n"
        "opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n",
        ns,
    )
    before = [p.detach().clone() for p in ns["model"].parameters()]
    exec(compile(accumulate, "README.md", "exec"), ns)
    micro = [(torch.randn(8, 20), torch.randint(0, 4, (8,))) for _ in range(4)]
    ns["batch"] = micro
    ns["scheduler"] = torch.optim.lr_scheduler.StepLR(ns["opt"], step_size=1)
    exec(compile(schedule, "README.md", "exec"), ns)
    assert ns["stepped"] is True
    assert ns["scheduler"].last_epoch == 1
    after = list(ns["model"].parameters())
    assert not any(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    ns["x_test"] = torch.randn(5, 20)
    exec(compile(evaluate, "README.md", "exec"), ns)
    assert ns["predictions"].shape == (5,)
