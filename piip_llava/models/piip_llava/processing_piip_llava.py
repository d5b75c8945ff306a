"""Processor of PIIP-LLaVA: the PIIP image processor, a tokenizer and the conversation formats."""

from __future__ import annotations

from transformers.processing_utils import MultiModalData, ProcessorMixin

from ...conversation import IMAGE_PLACEHOLDER, get_conversation_format, jinja_chat_template


class PIIPLlavaProcessor(ProcessorMixin):
    r"""
    Turns prompts and images into model inputs.

    Each `<image>` in the text becomes exactly `num_image_tokens` image tokens (what the vision
    config yields per image), so the model can place one feature per token. A batch may mix prompts
    with and without images (`images=[[], [image]]`, or chat conversations of both kinds). The chat template is
    the tokenizer's own unless a conversation format is named (`vicuna_v1` or `plain`), whose
    templates render byte for byte as the released checkpoints were trained.

    Args:
        image_processor ([`PIIPImageProcessor`]): resizes/pads and normalises images.
        tokenizer: a tokenizer that knows `image_token` as a single special token.
        num_image_tokens (`int`, *optional*): image tokens per image (`PIIPLlavaConfig.num_image_tokens`, the
            projector's output grid squared); `from_model_config` sets it. Without it the processor handles text
            only and says so when given images.
        conversation_format (`str`, *optional*): `vicuna_v1` or `plain`; sets the chat template.
        chat_template (`str`, *optional*): an explicit Jinja template; overrides the format's.
        image_token (`str`): the placeholder, `<image>` by default.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        conversation_format: str | None = None,
        chat_template: str | None = None,
        image_token: str = IMAGE_PLACEHOLDER,
        **kwargs,
    ):
        if num_image_tokens is not None and num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive number of image tokens per image, got {num_image_tokens}.")
        self.num_image_tokens = num_image_tokens
        self.conversation_format = conversation_format
        if chat_template is None and conversation_format is not None:
            chat_template = jinja_chat_template(get_conversation_format(conversation_format))
        elif chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)  # e.g. a Qwen2 or LLaMA-3 LLM's own
        self.image_token = image_token
        image_token_ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(image_token_ids) != 1:
            raise ValueError(
                f"The tokenizer splits {image_token!r} into {len(image_token_ids)} tokens; add it as a special token "
                f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}))."
            )
        self.image_token_id = image_token_ids[0]
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(
        cls,
        config,
        tokenizer,
        conversation_format: str | None = "vicuna_v1",
        pad_to_square: bool = True,
    ) -> PIIPLlavaProcessor:
        """The processor matching a `PIIPLlavaConfig`: image size and image-token count come from it.

        Adds the image placeholder to the tokenizer as a special token when it is missing; the
        caller must then make sure the model's `image_token_index` is the id it received.
        """
        from ..piip.image_processing_piip import PIIPImageProcessor

        if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        image_processor = PIIPImageProcessor.from_vision_config(config.vision_config, pad_to_square=pad_to_square)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=config.num_image_tokens,
            conversation_format=conversation_format,
        )

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """ProcessorMixin's layout, with images given per prompt (`[[], [image]]`) flattened and a batch without
        any image read as text only."""
        if isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images):
            images = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if isinstance(images, (list, tuple)) and len(images) == 0:
            images = None
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def image_token_count(self) -> int:
        """Image tokens per image; a clear error when the processor was built without them."""
        if self.num_image_tokens is None:
            raise ValueError(
                "This PIIPLlavaProcessor has no num_image_tokens, so it cannot expand images: build it with "
                "PIIPLlavaProcessor.from_model_config(config, tokenizer) or pass num_image_tokens=config.num_image_tokens."
            )
        return self.num_image_tokens

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_token_count()

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image for serving engines: every image, whatever its size, is resized (and
        padded) to the encoder's input size, so each takes `num_image_tokens` tokens and one patch."""
        if image_sizes is None:
            return MultiModalData()
        count = self.image_token_count()
        return MultiModalData(num_image_tokens=[count] * len(image_sizes), num_image_patches=[1] * len(image_sizes))

    def render_conversation(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` with this processor's chat template."""
        return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


__all__ = ["PIIPLlavaProcessor"]
