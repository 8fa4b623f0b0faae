"""Layer 7, on top: property testing of numerical stability, for ampfn's suite and for users' own steps.

Needs hypothesis (the test extra: ``pip install -e '.[test]'`` in an ampfn checkout); ``import ampfn`` never imports it.

Example:
    >>> import torch, ampfn
    >>> from ampfn import testing
    >>> def make(seed):
    ...     torch.manual_seed(seed)
    ...     model = torch.nn.Linear(4, 2)
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     def step(batch):
    ...         x, y = batch
    ...         ampfn.backward(torch.nn.functional.cross_entropy(model(x).float(), y))
    ...         ampfn.step(opt)
    ...         opt.zero_grad()
    ...     return step, model, opt
    >>> pipeline = testing.available_pipelines("cpu", skipping=True)[0]
    >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(6)]
    >>> testing.check_skips_nonfinite(make, pipeline, data)
    >>> testing.check_state_roundtrip(make, pipeline, data)
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:  # exercised in a subprocess test
    raise ImportError(
        f"ampfn.testing needs hypothesis ({e}); install the test extra: pip install -e '.[test]' in an ampfn checkout"
    ) from e

from ampfn.testing._checks import (
    check_matches_reference,
    check_never_nonfinite,
    check_skips_nonfinite,
    check_state_roundtrip,
    default_tolerance,
)
from ampfn.testing._ranks import check_ranks_agree
from ampfn.testing._strategies import (
    LossScaleSettings,
    TrialPipeline,
    available_pipelines,
    batches,
    edge_values,
    loss_scale_settings,
    pipelines,
    tensors,
)

__all__ = [
    "LossScaleSettings",
    "TrialPipeline",
    "available_pipelines",
    "batches",
    "check_matches_reference",
    "check_never_nonfinite",
    "check_ranks_agree",
    "check_skips_nonfinite",
    "check_state_roundtrip",
    "default_tolerance",
    "edge_values",
    "loss_scale_settings",
    "pipelines",
    "tensors",
]
