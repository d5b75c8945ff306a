"""Configuration of PIIP-LLaVA: a PIIP vision encoder, a multi-branch projector and a causal LM."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..piip.configuration_piip import PIIPVisionConfig


@strict
class PIIPLlavaConfig(PreTrainedConfig):
    r"""
    Configuration of [`PIIPLlavaForConditionalGeneration`].

    Args:
        vision_config (`PIIPVisionConfig` or `dict`): the PIIP encoder.
        text_config (`PreTrainedConfig` or `dict`): any causal LM config (LLaMA/Vicuna by default).
        image_token_index (`int`): id of the `<image>` token whose positions receive image features.
        projector_norm (`str`): `"group_norm"` (released checkpoints) or `"layer_norm"`.
        projector_num_groups (`int`): GroupNorm groups of the projector.
        projector_output_grid_size (`int`, *optional*): resize every branch map to this grid before
            projecting; by default the last branch's final grid is used.
        projector_antialias (`bool`): average each grid cell of a map shrunk onto the grid instead of reading
            it at one point (see `resize_to_grid`); off in the released checkpoints.
        tie_word_embeddings (`bool`): tie the LM head to the input embeddings.
    """

    model_type = "piip_llava"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=PIIPVisionConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 32000
    projector_norm: Literal["group_norm", "layer_norm"] = "group_norm"
    projector_num_groups: int = 32
    projector_output_grid_size: int | None = None
    projector_antialias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        width = self.text_config.hidden_size
        if self.projector_norm == "group_norm" and width % self.projector_num_groups:
            raise ValueError(
                f"The projector's width (the text model's hidden_size {width}) is not divisible into "
                f"projector_num_groups {self.projector_num_groups} GroupNorm groups."
            )
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def image_grid_size(self) -> int:
        return self.projector_output_grid_size or self.vision_config.output_grid_size

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one image occupies in the LLM sequence."""
        return self.image_grid_size**2


__all__ = ["PIIPLlavaConfig"]
