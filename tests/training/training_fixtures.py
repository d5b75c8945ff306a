"""Tiny local models and a tiny generated LLaVA dataset for the training tests (no downloads).

`write_tiny_llm` saves a two-layer LLaMA with a tokenizer trained on the test corpus,
`write_vision_config` a two-branch PIIP encoder config small enough that one image is 16 tokens,
and `write_llava_dataset` coloured-shape images with captions (stage 1) or conversations
(stage 2), optionally mixed with broken records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from conftest import CORPUS, tiny_clip_backbone
from PIL import Image, ImageDraw
from transformers import LlamaConfig, LlamaForCausalLM

from piip_llava.tokenizer_training import train_llama_style_tokenizer

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
SHAPES = ("circle", "square")


def tiny_vision_config_dict() -> dict:
    """Two CLIP branches at 32 and 64 pixels; the 64-pixel branch's 4x4 grid gives 16 image tokens."""
    return {
        "branches": [
            {"backbone_config": tiny_clip_backbone(48, 2, 4, image_size=32), "image_size": 32,
             "interaction_groups": [[0, 0], [1, 1]]},
            {"backbone_config": tiny_clip_backbone(32, 2, 2, image_size=64), "image_size": 64,
             "interaction_groups": [[0, 0], [1, 1]]},
        ],
        "deform_num_heads": 2,
        "deform_num_points": 4,
        "interaction_drop_path_rate": 0.0,
    }


def write_vision_config(path: Path) -> Path:
    path.write_text(json.dumps(tiny_vision_config_dict()))
    return path


def write_tiny_llm(directory: Path, seed: int = 0) -> Path:
    tokenizer = train_llama_style_tokenizer(CORPUS, vocab_size=300)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def draw_shape(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 5, size[0] * 4 // 5, size[1] * 4 // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def caption_record(index: int, image_name: str, colour: str, shape: str) -> dict:
    return {
        "id": f"cap-{index}",
        "image": image_name,
        "conversations": [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": f"The {shape} is {colour}."},
        ],
    }


def conversation_record(index: int, image_name: str | None, colour: str, shape: str) -> dict:
    question = f"What colour is the {shape}?"
    turns = [
        {"from": "human", "value": f"<image>\n{question}" if image_name else question},
        {"from": "gpt", "value": f"The {shape} is {colour}." if image_name else "There is no image."},
    ]
    record = {"id": f"conv-{index}", "conversations": turns}
    if image_name:
        record["image"] = image_name
    return record


def bad_records() -> list[dict]:
    """One record for each of three ways real data breaks: a missing file, a corrupt file, no conversation."""
    return [
        {"id": "bad-missing", "image": "does_not_exist.png",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-corrupt", "image": "corrupt.png",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-empty", "conversations": []},
    ]


def write_llava_dataset(
    directory: Path, count: int, stage: str, with_bad: bool = False, text_only_every: int = 0, seed: int = 0
) -> tuple[Path, Path]:
    """(records JSON path, image folder) of `count` generated samples; broken ones appended when asked."""
    rng = random.Random(seed)
    image_folder = directory / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        text_only = stage == "finetune" and text_only_every and index % text_only_every == text_only_every - 1
        image_name = None
        if not text_only:
            image_name = f"{index:04d}.png"
            draw_shape(colour, shape, (rng.randint(48, 96), rng.randint(48, 96))).save(image_folder / image_name)
        build = caption_record if stage == "pretrain" else conversation_record
        records.append(build(index, image_name, colour, shape))
    if with_bad:
        (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        broken = bad_records()
        for position, record in enumerate(broken):
            records.insert(1 + position * 3, record)
    path = directory / f"{stage}.json"
    path.write_text(json.dumps(records))
    return path, image_folder
