"""`SignalOptions`: the settings of the gray-box signals, part of every `QuerySpec`.

Each field names the signals it affects; the defaults are the references' (the authors' DDPM
code for SecMI, the Stable Diffusion settings of PIA and CLiD). `lightning_mia.graybox` checks
them against a model (timesteps in its scheduler's range) before a query starts.
"""

from __future__ import annotations

from dataclasses import dataclass


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
