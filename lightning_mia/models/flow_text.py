"""The flow family's caption conditioning, computed as `StableDiffusion3Pipeline.encode_prompt`
computes it, so the module, its gray-box signals and the pipeline see the same numbers.

    ids = TokenCache()(tokenizer, captions, length)                # (B, L) int64, cached
    states, pooled = clip_states(text_encoder, ids)                # (B, L, D), (B, P)
    cond = sd3_conditioning([clip1, clip2], t5_states, 0, joint)   # Conditioning (seq, pooled)

Each CLIP gives its penultimate layer's states (the pipeline's `hidden_states[-2]`, clip_skip
None) and its projected pooled embedding; the two CLIPs' states are concatenated along the
feature axis and zero-padded to the transformer's `joint_attention_dim`, then the T5 encoder's
states (or, without T5, `max_sequence_length` zero rows, as the pipeline pads) follow along the
token axis; the pooled embeddings are concatenated. The result, `Conditioning((seq, pooled))`
with seq (B, L + T, J) and pooled (B, P1 + P2), is what `SD3Transformer2DModel` takes as
`encoder_hidden_states` and `pooled_projections`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mia.models.latent import Conditioning


def clip_states(encoder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate-layer states (B, L, D), projected pooled embedding (B, P)) of a
    `CLIPTextModelWithProjection`, as the SD3 pipeline reads them."""
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sd3_conditioning(
    clips: Sequence[tuple[torch.Tensor, torch.Tensor]],
    t5_states: torch.Tensor | None,
    t5_length: int,
    joint_dim: int,
) -> Conditioning:
    """The transformer's (seq (B, L + T, J), pooled (B, P)) from the CLIPs' (states, pooled)
    and the T5 states (B, T, J) or, without T5, `t5_length` zero rows."""
    states = torch.cat([s for s, _ in clips], dim=-1)  # (B, L, D1 + D2)
    pooled = torch.cat([p for _, p in clips], dim=-1)  # (B, P1 + P2)
    if t5_states is None:
        t5_states = states.new_zeros(states.shape[0], t5_length, joint_dim)
    states = F.pad(states, (0, t5_states.shape[-1] - states.shape[-1]))
    return Conditioning((torch.cat([states, t5_states.to(states.dtype)], dim=-2), pooled))
