"""The public namespace: curated, cheap to import, no optional backend pulled in."""

from __future__ import annotations

import subprocess
import sys

import ampfn


def test_all_is_the_public_namespace() -> None:
    assert sorted(ampfn.__all__) == ampfn.__all__
    for name in ampfn.__all__:
        assert getattr(ampfn, name).__module__.startswith("ampfn")
    public = {n for n in vars(ampfn) if not n.startswith("_")}
    submodules = {"demo", "inspect", "testing", "telemetry"}
    assert public - set(ampfn.__all__) - submodules == set()


def test_import_pulls_in_no_optional_backend() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import ampfn, ampfn.demo; "
        "print(sorted(m for m in ('apex', 'torch_xla', 'hypothesis', 'sklearn', 'tqdm', 'torchao', 'matplotlib') "
        "if m in sys.modules and m not in before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_public_function_has_an_example() -> None:
    for name in ampfn.__all__:
        obj = getattr(ampfn, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>>" in (obj.__doc__ or ""), name


def test_the_precision_inspector_is_public() -> None:
    # issue 22: the inspector, its report, and one module's entry in it
    for name in ("inspect_precision", "PrecisionReport", "ModuleReport"):
        assert name in ampfn.__all__
    assert ampfn.inspect_precision.__module__ == "ampfn._inspect"
    assert ampfn.PrecisionReport.__module__ == "ampfn._inspect_report"
