"""Exponential moving average of model weights, kept as modules so checkpoints carry them.

ema = EMAWeights({"unet": unet}, decay=0.999)
ema.update({"unet": unet})        # after each optimizer step
ema.shadow["unet"](...)           # sample with the averaged weights
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAWeights(nn.Module):
    """Frozen copies of some modules whose weights follow the live ones by an EMA.

    The copies are submodules, so they are in `state_dict` (saved, restored, moved to the
    device with the parent). With a warm-up, the decay grows as `min(decay, (1+n)/(10+n))`.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow = nn.ModuleDict(
            {k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in modules.items()}
        )
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        """Move every averaged parameter towards its live one; copy buffers as they are."""
        weight = 1.0 - self.current_decay()
        for name, live in modules.items():
            avg = self.shadow[name]
            avg_params = [p for p in avg.parameters()]
            live_params = [p.detach().to(a.dtype) for p, a in zip(live.parameters(), avg_params)]
            torch._foreach_lerp_(avg_params, live_params, weight)
            for b_avg, b_live in zip(avg.buffers(), live.buffers()):
                b_avg.copy_(b_live)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMAWeights:
        """The averaged copies always stay in eval mode."""
        super().train(mode)
        self.shadow.eval()
        return self
