"""Layer 7, on top: the demo. One training step, several precision pipelines, one table
and one figure.

Trains a small network on scikit-learn's bundled digits (1,797 8x8 images, shipped
inside the package: nothing is downloaded) under each pipeline, from the same initial
weights and the same batches, and prints final loss, test accuracy (and how far it ends
from fp32), steps/s, skipped steps and the final loss scale. ``with_telemetry`` records
each step's loss scale and skips; ``--plot`` draws them, ``--json`` writes them::

    python -m ampfn.demo --steps 400 --pipelines fp32,bf16,fp16,bf16-true --plot demo.png
"""

from ampfn.demo._cli import main, parse_args
from ampfn.demo._data import build_model, load_digits
from ampfn.demo._pipelines import (
    _DEFAULT,
    _XLA_DEFAULT,
    _XLA_PIPELINES,
    PIPELINES,
    make_pipeline,
)
from ampfn.demo._report import FIGURE_DPI, FIGURE_INCHES, plot, table
from ampfn.demo._train import run

__all__ = [
    "_DEFAULT",
    "_XLA_DEFAULT",
    "_XLA_PIPELINES",
    "FIGURE_DPI",
    "FIGURE_INCHES",
    "PIPELINES",
    "build_model",
    "load_digits",
    "main",
    "make_pipeline",
    "parse_args",
    "plot",
    "run",
    "table",
]
