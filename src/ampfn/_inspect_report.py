"""Layer 5, tool: the precision inspector's report, :class:`PrecisionReport`.

A frozen value: one :class:`ModuleReport` per module that ran (worst first), the
suggested fp32 islands and what re-running with them left, the gradients' underflow and
the loss's error. ``str(report)`` is a table for a terminal, :meth:`PrecisionReport.to_dict`
plain JSON data, :meth:`PrecisionReport.plot` a figure (matplotlib, from the ``demo``
extra, imported only there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

_PLOT_API = "PrecisionReport.plot(path)"


@dataclasses.dataclass(frozen=True)
class ModuleReport:
    """One module of the inspected step, compared with the fp32 reference.

    Attributes:
        name: the module's qualified name in the model.
        type_name: its class name.
        forward_error: the relative error of its output against fp32 (norm-wise; inf
            where the pipeline's output is inf/NaN and the reference's is not).
        introduced_error: ``forward_error`` beyond the error its input already carried
            (0 for a module that only inherits an error).
        nonfinite: the pipeline's output holds inf/NaN where the reference's does not.
        introduces_nonfinite: ``nonfinite`` with a finite input: this module made it.
        max_abs: the largest finite |value| of the pipeline's output.
        headroom_bits: log2 of the compute dtype's largest finite number over
            ``max_abs`` (negative past it; inf for an all-zero output).
        flushed: the fraction of the output's non-zero fp32 values below the smallest
            normal number of the pipeline output's dtype: flushed to zero or to
            subnormals there.
        dtype: the dtype of the pipeline's output.
    """

    name: str
    type_name: str
    forward_error: float
    introduced_error: float
    nonfinite: bool
    introduces_nonfinite: bool
    max_abs: float
    headroom_bits: float
    flushed: float
    dtype: str


def _plain(value: Any) -> Any:
    """JSON data: floats that are not finite become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _num(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


@dataclasses.dataclass(frozen=True)
class PrecisionReport:
    """What :func:`ampfn.inspect_precision` found, as a value.

    Attributes:
        pipeline: the inspected transform, as text.
        compute_dtype: the lowest precision the pipeline computes in.
        modules: one :class:`ModuleReport` per named submodule that ran, worst first:
            ordered by the error each introduces (non-finite first), inner modules
            before their parents on a tie.
        islands: the modules to wrap in ``ampfn.fp32`` (for ``with_float8``, the Linear
            layers to keep out of fp8: :meth:`module_filter`): the innermost ones that
            introduce a problem. Empty for a healthy pipeline.
        tolerance: the introduced relative error above which a module is a problem.
        loss_error: the relative error of the loss given to ``ampfn.backward`` against
            fp32 (inf when it is inf/NaN; NaN when the step called no ``ampfn.backward``).
        loss_scale: the loss scale the step used, None without loss scaling.
        grad_underflow: the fraction of gradient elements non-zero in fp32 and exactly
            zero in the pipeline (after unscaling): missing or too small loss scaling.
        grad_error: the relative error of all true gradients together against fp32.
        residual_loss_error: the loss's relative error re-run with the islands applied
            (None when there are no islands).
        residual_nonfinite: the modules still non-finite in that re-run.
    """

    pipeline: str
    compute_dtype: str
    modules: tuple[ModuleReport, ...]
    islands: tuple[str, ...]
    tolerance: float
    loss_error: float
    loss_scale: float | None
    grad_underflow: float
    grad_error: float
    residual_loss_error: float | None = None
    residual_nonfinite: tuple[str, ...] = ()

    def module_filter(self, module: nn.Module, fqn: str) -> bool:
        """``with_float8``'s ``module_filter``: False for the islands and inside them."""
        return not any(fqn == i or fqn.startswith(i + ".") for i in self.islands)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (floats that are not finite become None)."""
        data = dataclasses.asdict(self)
        return _plain(data)  # type: ignore[no-any-return]

    def __str__(self) -> str:
        head = (
            f"{'module':<28} {'type':<14} {'error':>9} {'introduced':>10} "
            f"{'max|x|':>9} {'headroom':>8} {'flushed':>7}  dtype"
        )
        lines = [
            f"inspect_precision: {self.pipeline} (compute {self.compute_dtype}) against fp32",
            head,
            "-" * len(head),
        ]
        for m in self.modules:
            mark = " inf/NaN" if m.nonfinite else ""
            mark += " <- island" if m.name in self.islands else ""
            lines.append(
                f"{m.name[-28:]:<28} {m.type_name[:14]:<14} {_num(m.forward_error):>9} "
                f"{_num(m.introduced_error):>10} {_num(m.max_abs):>9} "
                f"{_num(m.headroom_bits, '.1f'):>8} {m.flushed:>7.1%}  {m.dtype}{mark}"
            )
        scale = "" if self.loss_scale is None else f", loss scale {self.loss_scale:g}"
        lines.append(
            f"loss error {_num(self.loss_error)}{scale}; gradients: error "
            f"{_num(self.grad_error)}, underflow {self.grad_underflow:.1%}"
        )
        if self.islands:
            fixed = (
                "finite"
                if not self.residual_nonfinite
                else f"still inf/NaN in {', '.join(self.residual_nonfinite)}"
            )
            lines.append(
                f"islands: ampfn.fp32({'), ampfn.fp32('.join(self.islands)}); re-run with "
                f"them: loss error {_num(self.residual_loss_error)}, {fixed}"
            )
        else:
            lines.append("islands: none (no module introduces a problem)")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Draw each module's forward and introduced error (log scale) into ``path``.

        Raises:
            ImportError: matplotlib is missing (install the ``demo`` extra).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                f"{_PLOT_API}: matplotlib is not installed ({e}); pip install -e '.[demo]'"
            ) from e
        names = [m.name for m in self.modules]
        big = 1e3  # where inf is drawn
        floor = 1e-12

        def shown(x: float) -> float:
            return big if not math.isfinite(x) else max(x, floor)

        fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
        try:
            y = range(len(names))
            ax.barh(
                [i + 0.2 for i in y],
                [shown(m.forward_error) for m in self.modules],
                height=0.4,
                label="error",
            )
            ax.barh(
                [i - 0.2 for i in y],
                [shown(m.introduced_error) for m in self.modules],
                height=0.4,
                label="introduced",
            )
            ax.set_xscale("log")
            ax.set_yticks(
                list(y), [n + (" *" if n in self.islands else "") for n in names]
            )
            ax.invert_yaxis()
            ax.set_xlabel("relative error against fp32 (inf drawn at 1e3; * island)")
            ax.set_title(f"{self.pipeline} ({self.compute_dtype})")
            ax.legend()
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)
