"""PIIP-LLaVA: transformers' LLaVA with a PIIP vision encoder and a multi-branch projector.

Only what differs from LLaVA is written here: the vision tower, the projector and how image
features are obtained. Merging features into the token embeddings, the KV cache, and
`generate()` (which encodes the images once, before prefill) are transformers' own; the forward
pass is LLaVA's, so it accepts whatever LLaVA accepts (text-only batches, `past_key_values=`,
sequences past `max_position_embeddings` under RoPE scaling) and compiles with `fullgraph=True`.
The mistakes a user can make with a prompt are caught where the prompt is built (the processor)
and where generation starts (`generate`), outside any compiled code.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from ..piip.modeling_piip import PIIPVisionModel
from .configuration_piip_llava import PIIPLlavaConfig
from .projector import PIIPMultiBranchProjector


class PIIPLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: PIIPLlavaConfig
    config_class = PIIPLlavaConfig
    # Gathered by `post_init` from the vision tower (its branches' layers and the interaction units) and the
    # language model.
    _no_split_modules = []


class PIIPLlavaModel(PIIPLlavaPreTrainedModel, LlavaModel):
    def __init__(self, config: PIIPLlavaConfig):
        PIIPLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = PIIPVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = PIIPMultiBranchProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images with the PIIP tower and project them, in LLaVA's output convention.

        Returns `last_hidden_state`: the last (highest-resolution) branch's final tokens, (images,
        tokens, `vision_config.hidden_size`); `pooler_output`: the projected features, one
        (image_tokens, text hidden size) tensor per image; `hidden_states` / `attentions`: the
        tower's, branch after branch (see `PIIPVisionModelOutput`). `generate()` calls this once,
        before prefill, and reuses the result.
        """
        vision_outputs = self.vision_tower(
            pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        image_features = self.multi_modal_projector(vision_outputs.feature_maps)  # (images, tokens, hidden)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,  # (images, H*W, C)
            pooler_output=list(image_features),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )


class PIIPLlavaForConditionalGeneration(PIIPLlavaPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin):
    def __init__(self, config: PIIPLlavaConfig):
        PIIPLlavaPreTrainedModel.__init__(self, config)
        self.model = PIIPLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """transformers' `generate`, after checking the prompt once, before prefill (see `check_prompt`)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        self.check_prompt(input_ids, kwargs.get("pixel_values"), kwargs.get("mm_encoder_outputs"))
        return super().generate(inputs, **kwargs)

    def check_prompt(self, input_ids: torch.Tensor | None, pixel_values, mm_encoder_outputs) -> None:
        """Refuse a prompt whose image tokens have no images, or that is longer than the language model's context.

        The context is `max_position_embeddings`, times the RoPE scaling factor when one is configured
        (linear, dynamic, YaRN, ...), so extended contexts are allowed.
        """
        if input_ids is None or input_ids.dtype not in (torch.long, torch.int):
            return
        has_images = pixel_values is not None or bool((mm_encoder_outputs or {}).get("image"))
        image_tokens = int((input_ids == self.config.image_token_id).sum())
        if image_tokens and not has_images:
            raise ValueError(
                f"The prompt has {image_tokens} image tokens but no pixel_values: pass the images, or remove the "
                f"{self.config.image_token_id} tokens from the text."
            )
        limit = context_length(self.config.text_config)
        if limit is not None and input_ids.shape[-1] > limit:
            raise ValueError(
                f"The prompt is {input_ids.shape[-1]} tokens (image tokens included) but the language model's context "
                f"is {limit}; shorten the prompt, or extend the context with RoPE scaling (text_config.rope_parameters)."
            )


def context_length(text_config) -> int | None:
    """The tokens the language model can place: `max_position_embeddings` times any RoPE scaling factor."""
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is None:
        return None
    rope = getattr(text_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        original = rope.get("original_max_position_embeddings") or limit
        return max(limit, int(original * rope.get("factor", 1.0)))
    return limit


__all__ = ["PIIPLlavaForConditionalGeneration", "PIIPLlavaModel", "PIIPLlavaPreTrainedModel"]
