"""Layer 4, building block: stochastic rounding of the optimizer's update into bfloat16 weights.

Plain bf16 training loses every update smaller than half a bf16 ulp of the weight: the
rounded sum is the weight again, and the model stops learning. With stochastic rounding
the optimizer computes its update in fp32 from the bf16 weights (upcast exactly), and
the result is rounded up or down to a neighbouring bf16 value with probabilities that
make the expected value the fp32 result. Small updates then survive on average, with no
fp32 copy of the weights kept between steps.

The rounding adds a uniform random integer below 2**16 to the fp32 bit pattern and
truncates the low 16 bits (bf16 is the top half of fp32): exact, and the same on every
device. The random bits come from a generator of the transform's own, seeded from
PyTorch's default generator when the transform is built (so ``torch.manual_seed``
makes a run reproducible) and saved in ``ampfn.state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_LOW = -(1 << 16)  # 0xFFFF0000 as an int32: keeps the bits bf16 has


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random int32 below 2**16, one per element of ``x``, on ``x``'s device."""
    noise = torch.randint(
        0,
        1 << 16,
        x.shape,
        dtype=torch.int32,
        device=generator.device,
        generator=generator,
    )
    if noise.device != x.device:  # a device without generators of its own (XLA)
        noise = noise.to(x.device)
    return noise


def _round(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32)
    rounded = ((bits + noise) & _LOW).view(torch.float32)
    return torch.where(x.isnan(), x, rounded).to(torch.bfloat16)


def round_into(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    generator: Callable[[torch.device], torch.Generator],
) -> None:
    """Round each fp32 ``update`` stochastically into its bf16 ``target``, in order.

    On XLA, ``Tensor.view(dtype)`` materializes its input: one graph execution per call.
    There the updates are rounded as one flat tensor (two executions per step, not two
    per parameter), with the same noise in the same order, so the bits are the same.
    """
    lazy: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for target, update in pairs:
        noise = _noise(update, generator(update.device))
        if update.device.type == "xla":
            lazy.append((target, update, noise))
        else:
            target.copy_(_round(update, noise))
    if lazy:
        _round_flat(lazy)


def _round_flat(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Round the updates of ``items`` (target, update, noise) as one tensor per device."""
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    by_device = {}
    for item in items:
        by_device.setdefault(item[1].device, []).append(item)
    for group in by_device.values():
        flat = _round(
            torch.cat([u.reshape(-1) for _, u, _ in group]),
            torch.cat([n.reshape(-1) for _, _, n in group]),
        )
        parts = torch.split(flat, [t.numel() for t, _, _ in group])
        for (target, _, _), part in zip(group, parts, strict=True):
            target.copy_(part.view_as(target))


class StochasticRounding:
    """Gives the optimizer fp32 views of its bf16 parameters for the step, then rounds the
    results stochastically back into them. The optimizer's state is created from the
    views, so it is kept in fp32. Transient memory: an fp32 copy of the parameters and
    gradients being stepped, during the step only."""

    __slots__ = ("_loading", "_saved", "generators", "seed")

    def __init__(self, seed: int, optimizer: Any) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._loading: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Optimizer.load_state_dict casts floating state to its parameters' dtype: show it
        # fp32 parameters while it loads, so that the state stays fp32.
        optimizer.register_load_state_dict_pre_hook(self._upcast_for_loading)
        optimizer.register_load_state_dict_post_hook(self._restore_after_loading)

    def _upcast_for_loading(self, optimizer: Any, state: Any) -> None:
        self._loading = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype == torch.bfloat16:
                    self._loading.append((p, p.data))
                    p.data = p.data.float()

    def _restore_after_loading(self, optimizer: Any) -> None:
        for p, bf16 in self._loading:
            p.data = bf16
        self._loading = []

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self.generators.get(device)
        if g is None:
            try:
                g = torch.Generator(device=device)
            except RuntimeError:  # XLA has none: draw on the CPU, copy over
                g = torch.Generator()
            g.manual_seed(self.seed)
            self.generators[device] = g
        return g

    def before_step(self, optimizer: Any) -> None:
        saved = self._saved = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.dtype == torch.bfloat16:
                    saved.append((p, p.data, p.grad))
                    p.data = p.data.float()
                    p.grad = p.grad.float()

    def after_step(self, optimizer: Any) -> None:
        pairs = []
        for p, bf16, grad in self._saved:
            pairs.append((bf16, p.data))
            p.data = bf16
            p.grad = grad
        self._saved = []
        with torch.no_grad():
            round_into(pairs, self._generator)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self.generators.items()},
        }

    def check_state(self, state: object, /) -> None:
        if not (
            isinstance(state, dict)
            and isinstance(state.get("seed"), int)
            and isinstance(state.get("generators"), dict)
            and all(isinstance(g, torch.Tensor) for g in state["generators"].values())
        ):
            raise TypeError(
                f"expected {{'seed': int, 'generators': {{device: state}}}}, got {state!r}"[
                    :200
                ]
            )
        for device in state["generators"]:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"saved generator device {device!r}: {e}") from None

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.seed = state["seed"]
        self.generators = {}
        for device, rng in state["generators"].items():
            self._generator(torch.device(device)).set_state(rng)
