"""Processor of PIIP-LLaVA: the PIIP image processor, a tokenizer and the conversation formats."""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

from ...conversation import IMAGE_PLACEHOLDER, get_conversation_format, jinja_chat_template


class PIIPLlavaProcessor(ProcessorMixin):
    r"""
    Turns prompts and images into model inputs.

    Each `<image>` in the text becomes exactly `num_image_tokens` image tokens (what the vision
    config yields per image), so the model can place one feature per token. The chat template is
    the tokenizer's own unless a conversation format is named (`vicuna_v1` or `plain`), whose
    templates render byte for byte as the released checkpoints were trained.

    Args:
        image_processor ([`PIIPImageProcessor`]): resizes/pads and normalises images.
        tokenizer: a tokenizer that knows `image_token` as a single special token.
        num_image_tokens (`int`): image tokens per image (the projector's output grid, squared).
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
        if num_image_tokens is None or num_image_tokens < 1:
            raise ValueError("PIIPLlavaProcessor needs num_image_tokens (image tokens per image, from the model config).")
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

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def render_conversation(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` with this processor's chat template."""
        return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


__all__ = ["PIIPLlavaProcessor"]
