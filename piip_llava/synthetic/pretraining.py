"""Stage 0 for models trained from nothing: pretrain the PIIP encoder and the LLM on synthetic data.

PIIP-LLaVA starts from pretrained vision backbones and a pretrained LLM; stage 1 (projector only)
aligns them and stage 2 teaches the conversations. Started from random weights instead, stage 1
has nothing to align and stage 2 never found a use for the image within a CPU budget: it learned
the answers' prior while the encoder's features drifted to carry less about the image than at
initialisation (a linear probe for "which colours are present" read 84% at initialisation and 72%
after stage 2, against a 70% base rate). So the demo model and the PIIP experiment first give
their parts the pretraining real ones have, in miniature:

- the encoder (all its branches and interactions together) learns to classify what each cell of
  the scene's 3x3 grid holds (shape kind, colour and size; the printed word or each digit of the
  number and its size class) from linear heads on its final feature maps, on freshly generated
  scenes that never repeat and never coincide with the exported training or evaluation images;
- the LLM learns the dataset's language (captions, questions and answers) as plain text.

Both then go through the usual `piip-llava train init`, stage 1 and stage 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from ..models.piip import PIIPVisionConfig, PIIPVisionModel
from ..models.piip.image_processing_piip import PIIPImageProcessor
from ..models.piip_llava.projector import resize_to_grid
from .export import conversation_texts, item_rng
from .scenes import (
    PALETTE,
    SHAPE_KINDS,
    SHAPE_POSITIONS,
    SHAPE_SIZES,
    TEXT_POSITIONS,
    TEXT_SIZE_CLASSES,
    WORDS,
    Scene,
    generate_scene,
    render_scene,
)

logger = logging.get_logger(__name__)

CELL_GRID = 3
NUMBER_DIGITS = 3
NONE = "none"
ENCODER_TRAIN_SPLIT = "encoder-pretraining"
ENCODER_CHECK_SPLIT = "encoder-check"
METRICS_FILE = "pretraining_metrics.json"

# Every attribute the encoder learns, one classifier each, with its class names; class 0 is "nothing here".
SCENE_ATTRIBUTES = {
    "shape_kind": (NONE, *SHAPE_KINDS),
    "shape_colour": (NONE, *PALETTE),
    "shape_size": (NONE, *SHAPE_SIZES),
    "text": (NONE, *WORDS, "number"),
    "text_size": (NONE, *TEXT_SIZE_CLASSES),
    **{f"digit_{place}": (NONE, *"0123456789") for place in range(NUMBER_DIGITS)},
}


def cell_index(row_column: tuple[int, int]) -> int:
    row, column = row_column
    return row * CELL_GRID + column


def scene_targets(scene: Scene) -> dict[str, list[int]]:
    """The class of every attribute in each of the 9 cells (row-major); numbers' digits are right-aligned."""
    targets = {name: [0] * CELL_GRID**2 for name in SCENE_ATTRIBUTES}
    for shape in scene.shapes:
        cell = cell_index(SHAPE_POSITIONS[shape.position])
        targets["shape_kind"][cell] = SCENE_ATTRIBUTES["shape_kind"].index(shape.kind)
        targets["shape_colour"][cell] = SCENE_ATTRIBUTES["shape_colour"].index(shape.colour)
        targets["shape_size"][cell] = SCENE_ATTRIBUTES["shape_size"].index(shape.size)
    text = scene.text
    if text is not None:
        cell = cell_index(TEXT_POSITIONS[text.position])
        targets["text"][cell] = SCENE_ATTRIBUTES["text"].index("number" if text.is_number else text.content)
        targets["text_size"][cell] = SCENE_ATTRIBUTES["text_size"].index(text.size_class)
        if text.is_number:
            if len(text.content) > NUMBER_DIGITS:
                raise ValueError(f"Number {text.content} has more than {NUMBER_DIGITS} digits.")
            padded = text.content.rjust(NUMBER_DIGITS)
            for place, character in enumerate(padded):
                if character != " ":
                    targets[f"digit_{place}"][cell] = SCENE_ATTRIBUTES[f"digit_{place}"].index(character)
    return targets


class SceneAttributeHeads(nn.Module):
    """Linear classifiers on each grid cell of the encoder's final maps, all branches concatenated.

    Heads this weak make the encoder itself lay the attributes out linearly in its feature maps,
    which is the form the projector and the LLM can read. The maps are brought to the 3x3 grid
    exactly as the projector brings them to its image-token grid (bilinear point sampling, not
    averaging), so the features the heads train are the ones the LLM's image tokens are made of.
    """

    def __init__(self, branch_widths: list[int]):
        super().__init__()
        width = sum(branch_widths)
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, len(classes)) for name, classes in SCENE_ATTRIBUTES.items()})

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """(batch, C_i, H_i, W_i) maps -> {attribute: (batch, 9, classes) logits}."""
        grid = (CELL_GRID, CELL_GRID)
        cells = torch.cat([resize_to_grid(feature_map.float(), grid) for feature_map in feature_maps], dim=1)
        cells = self.norm(cells.flatten(2).transpose(1, 2))
        return {name: classifier(cells) for name, classifier in self.classifiers.items()}


@dataclass
class EncoderPretraining:
    """How the encoder is pretrained: steps of freshly generated scenes, AdamW with warmup and cosine decay."""

    steps: int = 2500
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    check_images: int = 256
    seed: int = 0


def scene_batch(split: str, start: int, count: int, seed: int, image_size: int) -> list[Scene]:
    return [generate_scene(item_rng(seed, split, index, "scene"), image_size=image_size) for index in range(start, start + count)]


def batch_tensors(scenes: list[Scene], processor: PIIPImageProcessor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixel_values = processor([render_scene(scene) for scene in scenes], return_tensors="pt")["pixel_values"]
    per_scene = [scene_targets(scene) for scene in scenes]
    targets = {name: torch.tensor([targets[name] for targets in per_scene]) for name in SCENE_ATTRIBUTES}
    return pixel_values, targets


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over all cells plus cross-entropy over the cells that hold something, per attribute.

    Most cells are empty for most attributes; without the second term "nothing here" dominates the
    gradient and the detailed attributes (shape kind, word, digits) are learnt far more slowly.
    """
    losses = []
    for name in SCENE_ATTRIBUTES:
        cell_logits, cell_targets = logits[name].flatten(0, 1), targets[name].flatten()
        losses.append(F.cross_entropy(cell_logits, cell_targets))
        occupied = cell_targets != 0
        if occupied.any():
            losses.append(F.cross_entropy(cell_logits[occupied], cell_targets[occupied]))
    return torch.stack(losses).mean()


@torch.no_grad()
def attribute_accuracy(encoder, heads, processor, settings: EncoderPretraining, image_size: int) -> dict[str, float]:
    """Accuracy per attribute on held-out scenes, counted only over cells that hold something.

    Cells that hold nothing are most of the grid; counting them would make a blind encoder look good.
    """
    encoder.eval()
    correct = dict.fromkeys(SCENE_ATTRIBUTES, 0)
    present = dict.fromkeys(SCENE_ATTRIBUTES, 0)
    for start in range(0, settings.check_images, settings.batch_size):
        count = min(settings.batch_size, settings.check_images - start)
        pixel_values, targets = batch_tensors(
            scene_batch(ENCODER_CHECK_SPLIT, start, count, settings.seed, image_size), processor
        )
        logits = heads(encoder(pixel_values).feature_maps)
        for name in SCENE_ATTRIBUTES:
            mask = targets[name] != 0
            correct[name] += int((logits[name].argmax(-1)[mask] == targets[name][mask]).sum())
            present[name] += int(mask.sum())
    encoder.train()
    return {name: correct[name] / present[name] for name in SCENE_ATTRIBUTES if present[name]}


def loss_summary(losses: list[float]) -> dict[str, float]:
    """First and final loss, the final one averaged over the last tenth of the steps to smooth batch noise."""
    tail = losses[-max(1, len(losses) // 10):]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def optimise(parameters: list[torch.Tensor], batch_loss, steps: int, learning_rate: float, weight_decay: float,
             warmup_steps: int, description: str) -> list[float]:
    """AdamW with linear warmup, cosine decay and gradient clipping at 1; `batch_loss(step)` gives each step's loss."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    losses = []
    progress = tqdm(range(steps), desc=description, unit="step")
    for step in progress:
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def save_with_metrics(savables: list, metrics: dict, out_dir: Path) -> None:
    """Save into a temporary sibling with the metrics file last, then swap it in: a directory holding the
    metrics file is always complete."""
    temporary = out_dir.with_name(out_dir.name + ".tmp")
    for savable in savables:
        savable.save_pretrained(temporary)
    (temporary / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)


def pretrain_encoder(vision_config_file: str | os.PathLike, out_dir: str | os.PathLike,
                     settings: EncoderPretraining | None = None) -> Path:
    """Pretrain a PIIP encoder on scene attributes and save it (with its metrics) to `out_dir`.

    Skipped when `out_dir` already holds a result; the directory appears only once complete.
    """
    settings = settings or EncoderPretraining()
    out_dir = Path(out_dir)
    if (out_dir / METRICS_FILE).exists():
        return out_dir
    torch.manual_seed(settings.seed)
    config = PIIPVisionConfig(**json.loads(Path(vision_config_file).read_text()))
    encoder = PIIPVisionModel(config).train()
    heads = SceneAttributeHeads(config.branch_output_widths)
    processor = PIIPImageProcessor(size=config.image_size)

    def batch_loss(step: int) -> torch.Tensor:
        scenes = scene_batch(ENCODER_TRAIN_SPLIT, step * settings.batch_size, settings.batch_size, settings.seed,
                             config.image_size)
        pixel_values, targets = batch_tensors(scenes, processor)
        return attribute_loss(heads(encoder(pixel_values).feature_maps), targets)

    parameters = [*encoder.parameters(), *heads.parameters()]
    losses = optimise(parameters, batch_loss, settings.steps, settings.learning_rate, settings.weight_decay,
                      math.ceil(settings.warmup_ratio * settings.steps), "encoder pretraining")
    accuracy = attribute_accuracy(encoder, heads, processor, settings, config.image_size)
    logger.info("Encoder attribute accuracy on held-out scenes: " + json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
    metrics = {"settings": vars(settings), **loss_summary(losses), "held_out_accuracy": accuracy}
    save_with_metrics([encoder], metrics, out_dir)
    return out_dir


@dataclass
class LanguagePretraining:
    """How the LLM learns the dataset's language: causal LM on the training texts, AdamW, cosine decay."""

    epochs: float = 0.5
    batch_size: int = 32
    learning_rate: float = 2e-3
    max_length: int = 128
    seed: int = 0


def language_documents(data_dir: Path) -> list[str]:
    """One document per training record: a caption, or a record's questions and answers in order."""
    documents = []
    for name in ("pretrain.json", "finetune.json"):
        for record in json.loads((data_dir / name).read_text(encoding="utf-8")):
            documents.append(" ".join(conversation_texts([record])))
    return documents


def pretrain_language_model(llm_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            settings: LanguagePretraining | None = None) -> Path:
    """Train the LLM in `llm_dir` as a plain language model on the training texts; save it to `out_dir`.

    Skipped when `out_dir` already holds a finished result (its metrics file); the directory appears
    only once complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or LanguagePretraining()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    if (out_dir / METRICS_FILE).exists():
        return out_dir
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).train()
    documents = language_documents(data_dir)
    steps = math.ceil(settings.epochs * len(documents) / settings.batch_size)
    generator = torch.Generator().manual_seed(settings.seed)
    order = []

    def batch_loss(step: int) -> torch.Tensor:
        if len(order) < settings.batch_size:
            order.extend(torch.randperm(len(documents), generator=generator).tolist())
        batch = [documents[index] + tokenizer.eos_token for index in order[: settings.batch_size]]
        del order[: settings.batch_size]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=settings.max_length)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return model(**encoded, labels=labels).loss

    losses = optimise(list(model.parameters()), batch_loss, steps, settings.learning_rate, 0.0,
                      math.ceil(0.03 * steps), "language pretraining")
    summary = loss_summary(losses)
    logger.info(f"Language pretraining: {steps} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
    save_with_metrics([model, tokenizer], {"settings": vars(settings), "steps": steps, **summary}, out_dir)
    return out_dir
