"""What a gray-box signal is: `SignalSpec`, its options, and the `SIGNALS` registry.

A signal is a batched function of (model, batch, seed, options, cache) returning flat features
`"<group>/<name>" -> Tensor (B,)`; the group is the signal's name. `register_signal` declares the
signal and its attack (`lightning_mia.attack.spec.ATTACKS`, access "gray-box", one group) in one
call, beside the signal's code (`graybox/diffusion.py`, `secmi.py`, `pia.py`, `clid.py`,
`seq2seq.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_mia.attack.spec import AttackSpec, register_attack
from lightning_mia.errors import UserError
from lightning_mia.registry import Registry


class SignalError(UserError):
    """A gray-box signal that cannot run as asked (unknown name, wrong family, bad option)."""


@dataclass(frozen=True)
class SignalOptions:
    """Settings of the gray-box signals (each one names the signals it affects).

    Attributes:
        timesteps: diffusion timesteps of `loss` and `pia` (0 <= t < the scheduler's
            num_train_timesteps).
        secmi_t: SecMI's t_sec, the top of its round trip (reference: 100 of 1000).
        secmi_steps: DDIM steps from 0 to secmi_t, Δ = secmi_t / secmi_steps (reference: 10).
        pia_p: the p of PIA's distance mean |eps0 - eps_t|^p (> 0; reference: 4).
        pia_guidance: classifier-free guidance of PIA's two queries (> 0; 1 = conditional only;
            reference: the Stable Diffusion pipeline's default 7.5).
        clid_timesteps: CLiD's Monte Carlo timesteps (reference: 440, 450, 460 of 1000).
        clid_cut_rates: CLiD's reduced captions, one per rate: that share of the caption's most
            important words masked, each in (0, 1) (reference: 0.3, 0.5, 0.7).
        low_k_percent: k of the Min-K% NLL statistic of `nll` and `nll_gap`, (0, 100].
    """

    timesteps: tuple[int, ...] = (100, 200, 300)
    secmi_t: int = 100
    secmi_steps: int = 10
    pia_p: float = 4.0
    pia_guidance: float = 7.5
    clid_timesteps: tuple[int, ...] = (440, 450, 460)
    clid_cut_rates: tuple[float, ...] = (0.3, 0.5, 0.7)
    low_k_percent: float = 20.0


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

    @property
    def group(self) -> str:
        return self.name


SIGNALS: Registry[SignalSpec] = Registry("gray-box signal")


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
        )
    )
    return spec
