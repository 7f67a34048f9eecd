"""Gray-box membership signals (ATTACKS.md "Beyond the paper"): model weights, no generation.

    from lightning_mia.graybox import SIGNALS, SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["loss", "secmi", "pia", "clid"], seed=0)

Diffusion: `loss` (Matsumoto et al. 2023, `graybox/diffusion.py`), `secmi` (Duan et al. 2023,
`graybox/secmi.py`), `pia` (Kong et al. 2024, `graybox/pia.py`), `clid` (Zhai et al. 2024,
`graybox/clid.py`), sharing `graybox/denoiser.py`. Flow (`graybox/flow.py`, `flow_clid.py`):
`flow_loss`, `flow_sweep`, `flow_secmi`, `flow_pia`, `flow_clid`. Every latent family's signals
query the model through the family interface (`models.latent`) only. Seq2seq
(`graybox/seq2seq.py`): `nll` and `nll_gap` (per-token NLL of the image codes, with and without
the caption). Each is declared
beside its code once (`register_signal`), which also declares its gray-box attack. Features are
`"<group>/<name>" -> Tensor (B,)`, the group being the signal's name.
"""

from lightning_mia.graybox.compute import (
    check_model_signals,
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
    "check_model_signals",
    "check_signals",
    "compute_signals",
    "full_precision",
    "signal_queries",
    "signals_for",
]
