"""A fresh PIIP-LLaVA for stage 1: a local LLM, a PIIP encoder and a randomly initialised projector.

The LLM and the encoder keep their pretrained weights exactly; only the projector is new (and
the embedding rows of tokens the tokenizer gains). The result is saved as an ordinary model
directory with its processor, which is what stage 1's `--model` expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from ..conversation import IMAGE_PLACEHOLDER
from ..dtypes import torch_dtype
from ..models.piip import PIIPVisionConfig, PIIPVisionModel
from ..models.piip.image_processing_piip import PIIPImageProcessor
from ..models.piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration
from ..models.piip_llava.processing_piip_llava import PIIPLlavaProcessor

logger = logging.get_logger(__name__)

PAD_TOKEN = "<pad>"


def load_vision_encoder(vision_model_dir: str | Path | None = None, vision_config_path: str | Path | None = None):
    """A saved PIIP encoder (e.g. built with `PIIPVisionModel.from_pretrained_branches`) or a fresh one from a config.

    Exactly one source must be given: a pretrained encoder is what real runs use; a config file
    gives a randomly initialised encoder for debugging and tests.
    """
    if (vision_model_dir is None) == (vision_config_path is None):
        raise ValueError("Give exactly one of a PIIP vision model directory and a PIIP vision config JSON file.")
    if vision_model_dir is not None:
        return PIIPVisionModel.from_pretrained(vision_model_dir, dtype=torch.float32)
    path = Path(vision_config_path)
    if not path.is_file():
        raise ValueError(f"PIIP vision config {path} does not exist.")
    return PIIPVisionModel(PIIPVisionConfig(**json.loads(path.read_text())))


def prepare_tokenizer(tokenizer):
    """The LLM's tokenizer with `<image>` as one special token and a pad token.

    LLaVA-1.5 pads with `<unk>`; a tokenizer without either gets a new `<pad>` token.
    """
    image_ids = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
    if len(image_ids) != 1 or image_ids[0] == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def assemble_piip_llava(
    llm_dir: str | Path,
    vision_encoder: PIIPVisionModel,
    projector_norm: str = "group_norm",
    projector_num_groups: int = 32,
    conversation_format: str = "plain",
    projector_output_grid_size: int | None = None,
    projector_antialias: bool = False,
) -> tuple[PIIPLlavaForConditionalGeneration, PIIPLlavaProcessor]:
    """A PIIP-LLaVA whose LLM and encoder weights are copied from `llm_dir` and `vision_encoder`."""
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(llm_dir))
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config = PIIPLlavaConfig(
        vision_config=vision_encoder.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_index,
        projector_norm=projector_norm,
        projector_num_groups=projector_num_groups,
        projector_output_grid_size=projector_output_grid_size,
        projector_antialias=projector_antialias,
    )
    model = PIIPLlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    model.model.vision_tower.load_state_dict(vision_encoder.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = PIIPLlavaProcessor(
        image_processor=PIIPImageProcessor.from_vision_config(vision_encoder.config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        conversation_format=conversation_format,
    )
    logger.info(
        f"Assembled PIIP-LLaVA from {llm_dir}: {config.num_image_tokens} image tokens per image, image token id "
        f"{image_token_index}, vocabulary {len(tokenizer)}."
    )
    return model, processor


def save_initial_model(model, processor, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Save the assembled model (in `dtype`) and its processor where stage 1's `--model` can load them."""
    output_dir = Path(output_dir)
    model.to(torch_dtype(dtype)).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
