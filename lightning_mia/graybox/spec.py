"""What a gray-box signal is: `SignalSpec`, its options, and the `SIGNALS` registry.

A signal is a batched function of (model, batch, seed, options, cache) returning flat features
`"<group>/<name>" -> Tensor (B,)`; the group is the signal's name. `register_signal` declares the
signal and its attack (`lightning_mia.specs.attacks.ATTACKS`, access "gray-box", one group) in one
call, beside the signal's code (`graybox/diffusion.py`, `secmi.py`, `pia.py`, `clid.py`,
`seq2seq.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_mia.errors import UserError
from lightning_mia.registry import Registry
from lightning_mia.specs.attacks import AttackSpec, Scale, register_attack
from lightning_mia.specs.signals import SignalOptions


class SignalError(UserError):
    """A gray-box signal that cannot run as asked (unknown name, wrong family, bad option)."""


SignalFn = Callable[[Any, dict, int, SignalOptions, dict], dict[str, torch.Tensor]]
# (options, num_train_timesteps of the model's scheduler, 0 if none) -> problems
OptionCheck = Callable[[SignalOptions, int], list[str]]


@dataclass(frozen=True)
class SignalSpec:
    """One signal: its family, function, cost, option checks and the scalar LiRA calibrates.

    `queries_per_sample(options)` counts model forward passes (UNet or BART) per sample; the
    frozen encoders (autoencoder, text encoder) are not counted.
    """

    name: str
    family: str
    fn: SignalFn = field(repr=False)
    queries_per_sample: Callable[[SignalOptions], int] = field(repr=False)
    description: str = ""
    score_feature: str = ""  # e.g. "loss/mean"
    check: OptionCheck = field(default=lambda options, n_train: [], repr=False)
    score_scale: Scale = "identity"  # LiRA's scale of score_feature ("log": a positive error)
    calibrated_by: tuple[str, ...] = ()  # query-only groups normalising it (`<name>-cc` row)

    @property
    def group(self) -> str:
        return self.name


SIGNALS: Registry[SignalSpec] = Registry("gray-box signal", plugins="lightning_mia.graybox")


def register_signal(spec: SignalSpec) -> SignalSpec:
    """Declare a signal and its gray-box attack (both under `spec.name`)."""
    SIGNALS.register(spec.name, spec)
    register_attack(
        AttackSpec(
            spec.name,
            (spec.group,),
            "gray-box",
            spec.description,
            score_feature=spec.score_feature,
            score_scale=spec.score_scale,
            calibrated_by=spec.calibrated_by,
        )
    )
    return spec
