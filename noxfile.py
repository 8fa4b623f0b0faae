"""Sessions: tests (default), lint, typecheck, xla, models, properties, bench, demo."""

from __future__ import annotations

import nox

# The torch CI tests. PyPI's wheel is the CUDA build (several GB): for the CPU one, run nox
# with PIP_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_EXTRA_INDEX_URL=https://pypi.org/simple
TORCH = "torch==2.13.0"
# Pinned: a new release of either may change formatting or find new errors in CI.
RUFF, MYPY = "ruff==0.17.6", "mypy==2.4.1"
# torch_xla pins its own torch: the newest pair that installs here.
XLA = ("torch==2.9.0", "torch_xla==2.9.0")
# The real models of tests/models: Hugging Face transformers, pinned with its torch.
TRANSFORMERS = "transformers==5.23.0"

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite on CPU (hypothesis profile 'ci'), fp8 (torchao) included."""
    session.install(TORCH, "-e", ".[test,demo,fp8]")
    session.run("pytest", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def properties(session: nox.Session) -> None:
    """The property tests with many more examples (hypothesis profile 'thorough')."""
    session.install(TORCH, "-e", ".[test,demo]")
    session.run(
        "pytest",
        "tests",
        "-k",
        "property or law or check",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "thorough"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install(RUFF)
    session.run("ruff", "check", *(session.posargs or ["."]))
    session.run("ruff", "format", "--check", *(session.posargs or ["."]))


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[test]", MYPY)
    session.run("mypy", "--strict", "src", *session.posargs)
    session.run("mypy", "tests", "benchmarks", "examples", *session.posargs)


@nox.session
def xla(session: nox.Session) -> None:
    """The whole suite on torch 2.9 with real torch_xla on XLA's CPU backend: tests/xla runs,
    and the rest shows ampfn works on this older torch too (7 GB, about 2 minutes to install)."""
    session.install(*XLA, "-e", ".[test,demo]")
    env = {"PJRT_DEVICE": "CPU", "HYPOTHESIS_PROFILE": "ci"}
    # Two processes: autograd's engine must start after torch_xla registers its device.
    session.run("pytest", "tests/xla", *session.posargs, env=env)
    # (the benchmarks' own tests time nothing torch-version specific: the default run has them)
    session.run(
        "pytest",
        "tests",
        "--ignore=tests/xla",
        "--ignore=tests/test_benchmarks.py",
        *session.posargs,
        env=env,
    )


@nox.session
def models(session: nox.Session) -> None:
    """tests/models: GPT-2, Llama (transformers, from configs) and the nanoGPT-style GPT
    under every pipeline, and the examples (not collected by the default run)."""
    session.install(TORCH, TRANSFORMERS, "-e", ".[test,fp8]")
    session.run(
        "pytest", "tests/models", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Each pipeline against the identical hand-written torch.amp loop: median ratios."""
    session.install(TORCH, "-e", ".")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[demo]")
    session.run("python", "-m", "ampfn.demo", *session.posargs)
