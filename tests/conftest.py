"""Shared fixtures: tiny backbones, tiny PIIP configs, a real trained tokenizer and tiny PIIP-LLaVA models.

Everything is built here from scratch (no hub access) and kept small enough for 2 CPU cores.
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import piip_llava  # noqa: F401  (registers the Auto classes)
from piip_llava.models.piip import PIIPVisionConfig

# Tiny models run fastest on one thread, and stay fast when other processes share the cores.
torch.set_num_threads(1)

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What colour is the circle? ASSISTANT: The circle is red.",
    "What is written in the image? Answer the question using a single word or phrase.",
    "A small blue square next to a large green triangle on a white background.",
    "How many shapes are there? There are three shapes: two circles and one square.",
    "Answer with the option's letter from the given choices directly. A. red B. blue C. green D. yellow",
    "Reference OCR token: STOP, 42, hello, world",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 and words left right top bottom middle",
] * 4


def tiny_clip_backbone(hidden: int = 32, layers: int = 2, heads: int = 2, image_size: int = 64, patch: int = 16) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch,
    }


def tiny_convnext_backbone() -> dict:
    return {"model_type": "convnext", "depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 24, 32]}


def tiny_resnet_backbone() -> dict:
    return {"model_type": "resnet", "layer_type": "basic", "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32],
            "depths": [1, 1, 2, 1]}


def tiny_siglip_backbone() -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    }


def two_clip_branches() -> list[dict]:
    return [
        {"backbone_config": tiny_clip_backbone(48, 4, 4), "image_size": 64, "interaction_groups": [[0, 1], [2, 3]]},
        {"backbone_config": tiny_clip_backbone(32, 2, 2), "image_size": 128, "interaction_groups": [[0, 0], [1, 1]]},
    ]


def clip_convnext_branches() -> list[dict]:
    # ConvNeXt blocks: 0 | ds 1 | ds 2 3 | ds 4 = 8 blocks; grids and widths change inside groups.
    return [
        {"backbone_config": tiny_clip_backbone(48, 4, 4), "image_size": 64, "interaction_groups": [[0, 1], [2, 3]]},
        {"backbone_config": tiny_convnext_backbone(), "image_size": 128, "interaction_groups": [[0, 2], [3, 7]]},
    ]


def clip_resnet_branches() -> list[dict]:
    # ResNet blocks are its residual layers, the first of stages 2-4 downsampling: 0 | 1 | 2 3 | 4.
    return [
        {"backbone_config": tiny_clip_backbone(48, 4, 4), "image_size": 64, "interaction_groups": [[0, 1], [2, 3]]},
        {"backbone_config": tiny_resnet_backbone(), "image_size": 128, "interaction_groups": [[0, 1], [2, 4]]},
    ]


def three_branches() -> list[dict]:
    return [
        {"backbone_config": tiny_clip_backbone(48, 2, 4), "image_size": 32, "interaction_groups": [[0, 0], [1, 1]]},
        {"backbone_config": tiny_siglip_backbone(), "image_size": 64, "interaction_groups": [[0, 0], [1, 1]],
         "use_cls_token": False},
        {"backbone_config": tiny_convnext_backbone(), "image_size": 96, "interaction_groups": [[0, 3], [4, 7]]},
    ]


def tiny_vision_config(branches: list[dict], **kwargs) -> PIIPVisionConfig:
    options = {"deform_num_heads": 2, "deform_num_points": 4, "interaction_drop_path_rate": 0.0}
    options.update(kwargs)
    return PIIPVisionConfig(branches=branches, **options)


def perturb_interactions(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every interaction parameter random values so that all of them act (gates included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".interactions." in f".{name}" or name.startswith("interactions."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.fixture(scope="session")
def tokenizer():
    from piip_llava.tokenizer_training import train_llama_style_tokenizer

    return train_llama_style_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def rgb_image():
    rng = random.Random(0)
    image = Image.new("RGB", (80, 60), (255, 255, 255))
    for x in range(80):
        for y in range(60):
            if (x // 10 + y // 10) % 2:
                image.putpixel((x, y), (rng.randrange(256), 40, 200))
    return image


def build_tiny_llava(tokenizer, branches=two_clip_branches, seed: int = 0, conversation_format="vicuna_v1"):
    """A tiny PIIP-LLaVA whose vocabulary is the trained tokenizer's, and its processor."""
    from piip_llava import PIIPLlavaConfig, PIIPLlavaForConditionalGeneration, PIIPLlavaProcessor

    torch.manual_seed(seed)
    text_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = PIIPLlavaConfig(
        vision_config=tiny_vision_config(branches()).to_dict(),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_num_groups=8,
    )
    model = PIIPLlavaForConditionalGeneration(config).eval()
    perturb_interactions(model.model.vision_tower, seed)
    processor = PIIPLlavaProcessor.from_model_config(config, tokenizer, conversation_format=conversation_format)
    return model, processor


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A saved tiny PIIP-LLaVA with its processor (vicuna_v1 template, pad-to-square)."""
    path = tmp_path_factory.mktemp("tiny_piip_llava")
    model, processor = build_tiny_llava(tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
