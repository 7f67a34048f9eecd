"""Gray-box membership signals (ATTACKS.md "Beyond the paper"): model weights, no generation.

    from lightning_mia.graybox import SIGNALS, SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["loss", "secmi", "pia", "clid"], seed=0)

Diffusion: `loss` (Matsumoto et al. 2023), `secmi` (Duan et al. 2023), `pia` (Kong et al.
2024), `clid` (Zhai et al. 2024). Seq2seq: `nll` and `nll_gap` (per-token NLL of the image
codes, with and without the caption). Features are `"<group>/<name>" -> Tensor (B,)`, the group
being the signal's name; `GRAYBOX_ATTACKS` holds the matching attack registry entries.
"""

from lightning_mia.graybox.registry import (
    GRAYBOX_ATTACKS,
    SIGNALS,
    SignalError,
    SignalOptions,
    SignalSpec,
    check_signals,
    compute_signals,
    query_context,
    signals_for,
)

__all__ = [
    "GRAYBOX_ATTACKS",
    "SIGNALS",
    "SignalError",
    "SignalOptions",
    "SignalSpec",
    "check_signals",
    "compute_signals",
    "query_context",
    "signals_for",
]
