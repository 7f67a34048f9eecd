"""Sampling image codes from BART: the code-only head, top-k / top-p / temperature, DALL-E
mini's super-conditioning, and the KV-cached autoregressive loop batched over captions x N.

Randomness is passed in as one uniform number per row and step (drawn per caption from its own
generator by the caller) and turned into a code by inverse CDF, so a row's codes depend only on
its own caption, seed and logits, never on what else is in the batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BartForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.bart.modeling_bart import BartDecoder

from lightning_mia.models.seq2seq_presets import Seq2SeqError, Seq2SeqPreset

# transformers 5 renamed the decoder's `past_key_values` argument to `cache`
_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(BartDecoder.forward).parameters else "past_key_values"
)


@dataclass(frozen=True)
class SamplingSettings:
    """How codes are drawn: top-k (0 = off), top-p (1 = off), temperature (0 = greedy) and
    super-conditioning (1 = off): logits = uncond + condition_scale * (cond - uncond)."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    condition_scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if problems:
            raise Seq2SeqError("; ".join(problems))

    @property
    def guided(self) -> bool:
        """Whether the unconditional half is needed."""
        return self.condition_scale != 1.0


def sample_from_logits(
    logits: torch.Tensor, uniform: torch.Tensor, settings: SamplingSettings
) -> torch.Tensor:
    """One index per row of `logits` (R, K), by inverse CDF of the filtered distribution.

    `uniform` (R,) in [0, 1) is the row's pre-drawn random number: the draw depends only on the
    row's own logits and number, never on the other rows of the batch. The CDF runs over the
    kept codes in descending order under top-k / top-p, and over every code in its own order
    when nothing is filtered: the same distribution without sorting DALL-E mini's 16,384 codes
    at every step (31.8 ms a step for 64 rows on 2 CPU threads, against 0.8 ms for the rest).
    """
    if settings.temperature == 0:
        return logits.argmax(-1)
    logits = logits / settings.temperature
    index = None  # nothing filtered: the codes in their own order, no sort
    if 0 < settings.top_k < logits.shape[-1]:
        logits, index = logits.topk(settings.top_k, dim=-1)  # (R, k), sorted descending
    elif settings.top_p < 1.0:
        logits, index = logits.sort(dim=-1, descending=True, stable=True)  # (R, K)
    probs = logits.softmax(-1)
    if settings.top_p < 1.0:  # nucleus: drop tokens once the mass before them reaches top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= settings.top_p, 0.0)
    cdf = probs.cumsum(-1)  # (R, k)
    threshold = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # (R, 1)
    pos = torch.searchsorted(cdf, threshold, right=True).clamp_max(cdf.shape[-1] - 1)
    return (pos if index is None else index.gather(-1, pos)).squeeze(-1)


def code_logits(
    bart: BartForConditionalGeneration, spec: Seq2SeqPreset, hidden: torch.Tensor
) -> torch.Tensor:
    """Logits over the image codes only (..., K) from decoder states (..., D): the tied output
    head restricted to the code rows of the unified vocabulary (the code-range logits mask)."""
    lo, hi = spec.code_offset, spec.image_start_id
    return F.linear(hidden, bart.lm_head.weight[lo:hi], bart.final_logits_bias[0, lo:hi])


def autoregressive_codes(
    bart: BartForConditionalGeneration,
    spec: Seq2SeqPreset,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    uniform: torch.Tensor,
    settings: SamplingSettings,
) -> torch.Tensor:
    """Codes (B*N, L): one code per step for every row, with the decoder's KV cache.

    memory (R, S, D), memory_mask (R, S): encoder states, R = B*N rows, or 2*B*N when guided
    (the empty caption's rows second); uniform (B*N, L): each row's pre-drawn numbers.
    """
    rows, (bn, length) = memory.shape[0], uniform.shape
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())  # cross-attn K/V computed once
    token = torch.full((rows, 1), spec.image_start_id, device=memory.device)
    codes = torch.empty(bn, length, dtype=torch.long, device=memory.device)
    for t in range(length):
        hidden = bart.model.decoder(
            input_ids=token,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            use_cache=True,
            **{_CACHE_KWARG: cache},
        ).last_hidden_state[:, -1]  # (R, D)
        logits = code_logits(bart, spec, hidden).float()  # (R, K)
        if settings.guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + settings.condition_scale * (cond - uncond)
        codes[:, t] = sample_from_logits(logits, uniform[:, t], settings)
        token = (codes[:, t] + spec.code_offset).repeat(rows // bn).unsqueeze(1)
    return codes
