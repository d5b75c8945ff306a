"""PIIP-LLaVA: transformers' LLaVA with a PIIP vision encoder and a multi-branch projector.

Only what differs from LLaVA is written here: the vision tower, the projector and how image
features are obtained. Merging features into the token embeddings, the KV cache, and
`generate()` (which encodes the images once, before prefill) are transformers' own.
"""

from __future__ import annotations

import torch
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)

from ..piip.modeling_piip import PIIPVisionModel
from .configuration_piip_llava import PIIPLlavaConfig
from .projector import PIIPMultiBranchProjector


class PIIPLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: PIIPLlavaConfig
    config_class = PIIPLlavaConfig
    _no_split_modules = [
        "LlamaDecoderLayer",
        "BidirectionalInteractionUnit",
        "CLIPEncoderLayer",
        "ConvNextLayer",
        "ResNetBasicLayer",
        "ResNetBottleNeckLayer",
    ]


class PIIPLlavaModel(PIIPLlavaPreTrainedModel, LlavaModel):
    def __init__(self, config: PIIPLlavaConfig):
        PIIPLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = PIIPVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = PIIPMultiBranchProjector(
            branch_widths=config.vision_config.branch_output_widths,
            out_dim=config.text_config.hidden_size,
            norm=config.projector_norm,
            num_groups=config.projector_num_groups,
            output_grid_size=config.projector_output_grid_size,
            antialias=config.projector_antialias,
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Encode images with the PIIP tower and project them: one (image_tokens, hidden) tensor per image.

        `generate()` calls this once per call, before prefill, and reuses the result.
        """
        vision_dtype = self.vision_tower.dtype
        vision_outputs = self.vision_tower(pixel_values.to(vision_dtype), return_dict=True)
        image_features = self.multi_modal_projector(vision_outputs.feature_maps)  # (images, tokens, hidden)
        return BaseModelOutputWithPooling(last_hidden_state=image_features, pooler_output=list(image_features))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        self.check_sequence_fits(input_ids if input_ids is not None else inputs_embeds, cache)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        no_images = pixel_values is None and encoded.get("image") is None
        if no_images and input_ids is not None and (input_ids == self.config.image_token_id).any():
            raise ValueError(
                f"The input has {int((input_ids == self.config.image_token_id).sum())} image tokens but no "
                f"pixel_values: pass the images, or remove the {self.config.image_token_id} tokens from the text."
            )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    def check_sequence_fits(self, inputs: torch.Tensor | None, cache: Cache | None) -> None:
        """Refuse sequences longer than the LM's context instead of returning silently wrong logits."""
        if inputs is None:
            return
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        past = cache.get_seq_length() if cache is not None else 0
        total = int(past) + inputs.shape[1]
        if limit is not None and total > limit:
            raise ValueError(
                f"The sequence is {total} tokens (image tokens included) but the language model's context is {limit}; "
                f"shorten the prompt or reduce max_new_tokens."
            )


class PIIPLlavaForConditionalGeneration(PIIPLlavaPreTrainedModel, LlavaForConditionalGeneration):
    def __init__(self, config: PIIPLlavaConfig):
        PIIPLlavaPreTrainedModel.__init__(self, config)
        self.model = PIIPLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = ["PIIPLlavaForConditionalGeneration", "PIIPLlavaModel", "PIIPLlavaPreTrainedModel"]
