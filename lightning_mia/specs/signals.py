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
        flow_times: noise levels t in [0, 1] of the flow family's `flow_loss` and `flow_pia`
            (x_t = (1 - t)·x0 + t·eps; features name t by round(1000·t): `flow_loss/t500`).
        flow_sweep_times: the interpolation times of `flow_sweep`: the loss along the path,
            whose membership gap peaks at one time (Sesmat et al. ICML 2026).
        flow_secmi_t: the top of `flow_secmi`'s Euler round trip, in (0, 1] (`secmi_steps`
            Euler steps from 0 to it; the reference's 100 of 1000 -> 0.1).
        flow_clid_times: `flow_clid`'s Monte Carlo times (the reference's 440-460 of 1000).
    Flow signals reuse `secmi_steps`, `pia_p`, `pia_guidance` and `clid_cut_rates`: same meaning.
    """

    timesteps: tuple[int, ...] = (100, 200, 300)
    secmi_t: int = 100
    secmi_steps: int = 10
    pia_p: float = 4.0
    pia_guidance: float = 7.5
    clid_timesteps: tuple[int, ...] = (440, 450, 460)
    clid_cut_rates: tuple[float, ...] = (0.3, 0.5, 0.7)
    low_k_percent: float = 20.0
    flow_times: tuple[float, ...] = (0.25, 0.5, 0.75)
    flow_sweep_times: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    flow_secmi_t: float = 0.1
    flow_clid_times: tuple[float, ...] = (0.44, 0.45, 0.46)
