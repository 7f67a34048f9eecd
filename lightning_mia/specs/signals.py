"""`SignalOptions`: the settings of the gray-box signals, part of every `QuerySpec`.

Each field names the signals it affects; the defaults are the references' (the authors' DDPM
code for SecMI, the Stable Diffusion settings of PIA and CLiD). `lightning_mia.graybox` checks
them against a model (timesteps in its scheduler's range) before a query starts.

Named option sets live in `SIGNAL_PRESETS` (`signal_preset("reference-sd")`: the authors'
Stable Diffusion settings of SecMI, PIA and CLiD, each with the file it was read from).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_mia.registry import Registry


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


SIGNAL_PRESETS: Registry[SignalOptions] = Registry("signal preset")
"""Named `SignalOptions` (`--signal-preset NAME`), each registered below with its sources."""

# The package's defaults: SecMI as the authors' DDPM code (github.com/jinhaoduan/SecMI,
# `mia_evals/secmia.py`: t_sec = 100, Δ = 10), PIA and CLiD at their Stable Diffusion settings.
SIGNAL_PRESETS.register("default", SignalOptions())

# The authors' Stable Diffusion settings, each read in their code:
# - SecMI (github.com/jinhaoduan/SecMI-LDM, `src/mia/secmi.py` over the time grid 0, 10, ..., 190
#   of its modified `pipeline_stable_diffusion.py`): `denoising_results[-15]` (140 -> 150 -> 140)
#   against `reverse_results[14]` (t = 140): t_sec = 150, Δ = 10, 15 steps; guidance 1.
# - PIA (github.com/kong13661/PIA, `stable_diffusion/stable_attack.py`, class `PIA` in
#   `components.py`): p = 4 (`lp`), the pipeline's guidance 7.5, each t = 10k an attack of its
#   own (interval 10); `timesteps` keeps 100, 200 (the `pia-t200` row) and 300.
# - CLiD (github.com/zhaisf/CLiD, `mia_CLiD_impt.py`): Tmid 450, even_num 10, 3 samples -> t =
#   440, 450, 460; cut_list 0.3, 0.5, 0.7; the UNet called directly (guidance 1).
SIGNAL_PRESETS.register(
    "reference-sd",
    SignalOptions(
        timesteps=(100, 200, 300),
        secmi_t=150,
        secmi_steps=15,
        pia_p=4.0,
        pia_guidance=7.5,
        clid_timesteps=(440, 450, 460),
        clid_cut_rates=(0.3, 0.5, 0.7),
    ),
)


def signal_preset(name: str) -> SignalOptions:
    """The `SignalOptions` registered as `name` (UnknownNameError lists the known presets)."""
    return SIGNAL_PRESETS[name]
