"""Gray-box membership signals (ATTACKS.md "Beyond the paper"): model weights, no generation.

    from lightning_mia.graybox import SIGNALS, SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["loss", "secmi", "pia", "clid"], seed=0)

Diffusion (`graybox/diffusion.py`): `loss` (Matsumoto et al. 2023), `secmi` (Duan et al. 2023),
`pia` (Kong et al. 2024), `clid` (Zhai et al. 2024). Seq2seq (`graybox/seq2seq.py`): `nll` and
`nll_gap` (per-token NLL of the image codes, with and without the caption). Each is declared
there once (`register_signal`), which also declares its gray-box attack. Features are
`"<group>/<name>" -> Tensor (B,)`, the group being the signal's name.
"""

from lightning_mia.graybox.compute import (
    check_signals,
    compute_signals,
    full_precision,
    signal_queries,
    signals_for,
)
from lightning_mia.graybox.spec import SIGNALS, SignalError, SignalOptions, SignalSpec

__all__ = [
    "SIGNALS",
    "SignalError",
    "SignalOptions",
    "SignalSpec",
    "check_signals",
    "compute_signals",
    "full_precision",
    "signal_queries",
    "signals_for",
]
