"""Layer 4, building block: loss scaling, as one package (its design: README.md here).

One interface (``ampfn._types.Scaler``), three scalers:

- :class:`GradScalerScaler`: a ``torch.amp.GradScaler``, syncing (``with_grad_scaling()``,
  ``with_apex``'s one loss);
- :class:`SyncFreeScaler`: GradScaler's algorithm on the device
  (``with_grad_scaling(sync=False)``);
- :class:`ApexScaler`: Apex's scale law, per loss (``with_apex``'s ``num_losses``, fp16
  gradients, static scales).

One misuse guard (``_misuse``), one rule for settings (``_settings``), one answer to
"what is the loss scale" (``_scale``).
"""

from ampfn._scaling._apex import ApexScaler, LossScale
from ampfn._scaling._base import ScalerBase, ScalingCall
from ampfn._scaling._gradscaler import INTERFACE, GradScalerScaler, default_scaler
from ampfn._scaling._misuse import refuse_closure
from ampfn._scaling._scale import find_scaler_state, loss_scale, scale_of
from ampfn._scaling._settings import check_grad_scaler, check_law, check_scale
from ampfn._scaling._syncfree import SyncFreeScaler

__all__ = [
    "INTERFACE",
    "ApexScaler",
    "GradScalerScaler",
    "LossScale",
    "ScalerBase",
    "ScalingCall",
    "SyncFreeScaler",
    "check_grad_scaler",
    "check_law",
    "check_scale",
    "default_scaler",
    "find_scaler_state",
    "loss_scale",
    "refuse_closure",
    "scale_of",
]
