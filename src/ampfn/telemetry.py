"""Layer 6, public: ready sinks for :func:`ampfn.with_telemetry`.

Example:
    >>> import logging, ampfn
    >>> from ampfn import telemetry
    >>> logging.basicConfig(level=logging.INFO)
    >>> train_step = ampfn.with_telemetry(telemetry.to_logging())(lambda batch: batch)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ampfn._telemetry import StepRecord

__all__ = ["StepRecord", "to_logging", "to_tensorboard"]


def to_logging(
    logger: logging.Logger | None = None, level: int = logging.INFO
) -> Callable[[StepRecord], None]:
    """A sink that logs each record in one line (to the "ampfn" logger by default).

    Example:
        >>> import logging
        >>> from ampfn import telemetry
        >>> sink = telemetry.to_logging(level=logging.DEBUG)
    """
    if logger is not None and not isinstance(logger, logging.Logger):
        raise TypeError(
            f"to_logging(logger, level): logger must be a logging.Logger, got {type(logger).__name__}"
        )
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(
            f"to_logging(logger, level): level must be a logging level (an int such as "
            f"logging.INFO), got {type(level).__name__}"
        )
    log = logger if logger is not None else logging.getLogger("ampfn")

    def sink(record: StepRecord) -> None:
        if not log.isEnabledFor(level):
            return
        parts = [f"step {record.step}"]
        if record.loss_scale is not None:
            parts.append(f"loss scale {record.loss_scale:g}")
        parts.append(
            "stepped " + ",".join("yes" if s else "SKIPPED" for s in record.stepped)
        )
        if record.grad_norm is not None:
            parts.append(f"grad norm {record.grad_norm:.4g}")
        if record.nonfinite:
            parts.append("non-finite gradients: " + ", ".join(record.nonfinite))
        log.log(level, "ampfn: %s", "; ".join(parts))

    return sink


def to_tensorboard(writer: Any) -> Callable[[StepRecord], None]:
    """A sink that writes to a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
    ``add_scalar`` and ``add_text``): scalars ``ampfn/loss_scale`` and ``ampfn/skipped``
    (1 when the call skipped a step, else 0) and ``ampfn/grad_norm``, and a text naming
    the overflowing parameters, all at ``global_step=record.step``.

    Example:
        >>> import ampfn
        >>> from ampfn import telemetry
        >>> class Writer:
        ...     def add_scalar(self, tag, value, global_step): print(tag, value, global_step)
        ...     def add_text(self, tag, text, global_step): print(tag, text, global_step)
        >>> telemetry.to_tensorboard(Writer())(ampfn.StepRecord(3, 1024.0, (False,), None, ("0.weight",)))
        ampfn/loss_scale 1024.0 3
        ampfn/skipped 1 3
        ampfn/nonfinite 0.weight 3
    """
    missing = [
        m for m in ("add_scalar", "add_text") if not callable(getattr(writer, m, None))
    ]
    if missing:
        raise TypeError(
            f"to_tensorboard(writer): expected a SummaryWriter or an object with add_scalar and add_text; "
            f"{type(writer).__name__} lacks {', '.join(missing)}"
        )

    def sink(record: StepRecord) -> None:
        if record.loss_scale is not None:
            writer.add_scalar(
                "ampfn/loss_scale", record.loss_scale, global_step=record.step
            )
        writer.add_scalar("ampfn/skipped", int(record.skipped), global_step=record.step)
        if record.grad_norm is not None:
            writer.add_scalar(
                "ampfn/grad_norm", record.grad_norm, global_step=record.step
            )
        if record.nonfinite:
            writer.add_text(
                "ampfn/nonfinite", ", ".join(record.nonfinite), global_step=record.step
            )

    return sink
