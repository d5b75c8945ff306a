"""An SDPA attention kernel that computes in float32 inside bf16 autocast, for the demo recipe's stage-0 LLM.

Trained from random weights under bf16 autocast on the CPU, that LLM did not learn to look an answer up
in its image tokens; with only its attention kernel in float32 it learnt as in float32, at nearly bf16's
speed (docs/training.md). The recipe asks for it by name (`FLOAT32_ATTENTION`) as `attn_implementation`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The attention implementation (`attn_implementation`) that runs SDPA in float32 inside bf16 autocast.
FLOAT32_ATTENTION = "sdpa_float32"


def float32_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and query, key and value in float32; the projections
    around it stay in the autocast's dtype.
    """
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def register_float32_attention() -> str:
    """Make `FLOAT32_ATTENTION` a valid `attn_implementation` (its masks are SDPA's); returns the name."""
    AttentionInterface.register(FLOAT32_ATTENTION, float32_sdpa_attention)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)
    return FLOAT32_ATTENTION
