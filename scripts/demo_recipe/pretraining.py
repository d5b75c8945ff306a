"""Stage 0 for models trained from nothing: pretrain the PIIP encoder and the LLM on synthetic data.

PIIP-LLaVA starts from pretrained vision backbones and a pretrained LLM; stage 1 (projector only)
aligns them and stage 2 teaches the conversations. Started from random weights instead, stage 1
has nothing to align and stage 2 does not find a use for the image within a CPU budget: it learns
the answers' prior while the encoder's features drift to carry less about the image than at
initialisation (docs/training.md). So the demo model and the PIIP experiment first give their parts
the pretraining real ones have, in miniature:

- the encoder (all its branches and interactions together) learns to classify what each cell of
  the scene's 3x3 grid holds (shape kind, colour and size; the printed word or number, a number's
  digits by place, and the text's size class) from linear heads on its final feature maps, on freshly generated
  scenes that never repeat and never coincide with the exported training or evaluation images;
- the LLM learns the dataset's language and, above all, to answer from image tokens: captions and
  question turns about fresh scenes, in the stage-1 and stage-2 prompt formats, with each of the
  9 image tokens replaced by a learned linear code of its cell's true attributes
  (`CellAttributeEmbedding`). Trained on plain text instead, the LLM still had to discover in
  stage 2 how to find the cell a question names among the image tokens, and within the CPU budget it
  did not for position questions and barely for colour and shape.

Both then go through the usual `piip-llava train init`, stage 1 and stage 2.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging

from piip_llava import PIIPImageProcessor, PIIPVisionConfig, PIIPVisionModel
from piip_llava.conversation import IMAGE_PLACEHOLDER, get_conversation_format
from piip_llava.models.piip_llava import resize_to_grid
from piip_llava.synthetic import item_rng
from piip_llava.synthetic.questions import (
    QUESTION_TYPES,
    TEXT_QUESTION_TYPES,
    Question,
    caption_conversation,
    make_multiple_choice,
    pick_questions,
    qa_conversation,
    questions_of_type,
    shuffled_questions,
    vary_items,
    with_listing_turn,
)
from piip_llava.synthetic.scenes import (
    NUMBERS,
    PALETTE,
    SHAPE_KINDS,
    SHAPE_POSITIONS,
    SHAPE_SIZES,
    TEXT_POSITIONS,
    TEXT_SIZE_CLASSES,
    WORDS,
    Scene,
    SceneText,
    draw_text,
    generate_scene,
    place_text,
    random_text_content,
    render_scene,
)
from piip_llava.training import (
    TRAINING_PAD_MULTIPLE,
    LlavaDataCollator,
    expand_image_tokens,
    record_conversation_messages,
    single_token_id,
    tokenize_with_labels,
    truncate_sample,
)

from .precision import register_float32_attention

logger = logging.get_logger(__name__)

CELL_GRID = 3
NUMBER_DIGITS = len(NUMBERS[-1])
NONE = "none"
ENCODER_TRAIN_SPLIT = "encoder-pretraining"
ENCODER_CHECK_SPLIT = "encoder-check"
METRICS_FILE = "pretraining_metrics.json"


def is_pretrained(out_dir: str | os.PathLike) -> bool:
    """Whether a stage-0 run finished into `out_dir`: its metrics file is written last (`save_with_metrics`)."""
    return (Path(out_dir) / METRICS_FILE).exists()


# Every attribute the encoder learns, one classifier each, with its class names; class 0 is "nothing here".
SCENE_ATTRIBUTES = {
    "shape_kind": (NONE, *SHAPE_KINDS),
    "shape_colour": (NONE, *PALETTE),
    "shape_size": (NONE, *SHAPE_SIZES),
    "shape_position": (NONE, *SHAPE_POSITIONS),
    # Conjunctions: which colour goes with which kind (and where). With them the tokens of a scene, summed,
    # still say which shape is red; without them a sum of cells is a bag of colours and a bag of kinds.
    "object": (NONE, *(f"{colour} {kind}" for colour in PALETTE for kind in SHAPE_KINDS)),
    "object_position": (NONE, *(f"{colour} {kind} {position}" for colour in PALETTE for kind in SHAPE_KINDS
                                for position in SHAPE_POSITIONS)),
    "text": (NONE, *WORDS, *NUMBERS),
    "text_size": (NONE, *TEXT_SIZE_CLASSES),
    **{f"digit_{place}": (NONE, *"0123456789") for place in range(NUMBER_DIGITS)},
}
# Attributes whose classes are combinations of others: they have no word of their own in the LLM.
CONJUNCTIONS = ("object", "object_position")
DIGIT_PLACES = tuple(f"digit_{place}" for place in range(NUMBER_DIGITS))


def cell_index(row_column: tuple[int, int]) -> int:
    row, column = row_column
    return row * CELL_GRID + column


def scene_targets(scene: Scene, extra_texts: tuple[SceneText, ...] = ()) -> dict[str, list[int]]:
    """The class of every attribute in each of the 9 cells (row-major); numbers' digits are right-aligned.

    `extra_texts` are texts printed on the scene besides its own (see `corner_texts`), each in a cell of its own.
    """
    targets = {name: [0] * CELL_GRID**2 for name in SCENE_ATTRIBUTES}
    for shape in scene.shapes:
        cell = cell_index(SHAPE_POSITIONS[shape.position])
        classes = {
            "shape_kind": shape.kind,
            "shape_colour": shape.colour,
            "shape_size": shape.size,
            "shape_position": shape.position,
            "object": f"{shape.colour} {shape.kind}",
            "object_position": f"{shape.colour} {shape.kind} {shape.position}",
        }
        for name, label in classes.items():
            targets[name][cell] = SCENE_ATTRIBUTES[name].index(label)
    texts = ([scene.text] if scene.text is not None else []) + list(extra_texts)
    if len({text.position for text in texts}) < len(texts):
        raise ValueError(f"Two texts share a corner cell: {[text.position for text in texts]}.")
    for text in texts:
        cell = cell_index(TEXT_POSITIONS[text.position])
        targets["text"][cell] = SCENE_ATTRIBUTES["text"].index(text.content)
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
    exactly as the projector brings them to its image-token grid (`resize_to_grid`, antialiased when
    the projector is), so the features the heads train are the ones the LLM's image tokens are made of:
    heads that averaged each cell while the projector read it at one point trained features the image
    tokens never carried.
    """

    def __init__(self, branch_widths: list[int], antialias: bool = False):
        super().__init__()
        self.antialias = antialias
        width = sum(branch_widths)
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, len(classes)) for name, classes in SCENE_ATTRIBUTES.items()})

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """(batch, C_i, H_i, W_i) maps -> {attribute: (batch, 9, classes) logits}."""
        grid = (CELL_GRID, CELL_GRID)
        cells = torch.cat([resize_to_grid(feature_map.float(), grid, self.antialias) for feature_map in feature_maps], dim=1)
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
    # Cells read as the projector will read them (`resize_to_grid`): at one point, or averaged (antialias).
    antialias: bool = False
    # Print a text in every corner of the training scenes, not only the scene's own (`corner_texts`); the
    # held-out check keeps one text per scene, as the exported images have.
    corner_texts: bool = True
    # Data loader workers that draw and render the next steps' images while this process trains
    # (`step_batches`); the batches are the same with any number. None by default: on 2 cores a worker
    # does not pay (benchmarks/bench_demo_schedule.py).
    data_workers: int = 0
    seed: int = 0


class PretrainingImage(NamedTuple):
    """An encoder-pretraining image: a scene and the texts printed on it besides its own."""

    scene: Scene
    extra_texts: tuple[SceneText, ...] = ()

    def render(self) -> Image.Image:
        image = render_scene(self.scene)
        draw = ImageDraw.Draw(image)
        for text in self.extra_texts:
            draw_text(draw, text)
        return image


def corner_texts(scene: Scene, rng: random.Random) -> tuple[SceneText, ...]:
    """A random word or number, of a random size class, in every corner cell that the scene's text leaves free.

    Reading is what the encoder learns slowest, and four texts an image teach it more per step than one at
    the same cost (docs/training.md). The text cells stay apart from the shapes' cells.
    """
    taken = scene.text.position if scene.text is not None else None
    return tuple(place_text(rng, random_text_content(rng), rng.choice(TEXT_SIZE_CLASSES), position, scene.image_size)
                 for position in sorted(TEXT_POSITIONS) if position != taken)


def pretraining_images(split: str, start: int, count: int, seed: int, image_size: int,
                       with_corner_texts: bool = False) -> list[PretrainingImage]:
    """Fresh scenes `start` to `start + count` of `split`, with `corner_texts` when asked (their own random stream,
    so the scenes are the same either way)."""
    images = []
    for index in range(start, start + count):
        scene = generate_scene(item_rng(seed, split, index, "scene"), image_size=image_size)
        extra = corner_texts(scene, item_rng(seed, split, index, "extra-texts")) if with_corner_texts else ()
        images.append(PretrainingImage(scene, extra))
    return images


def batch_tensors(images: list[PretrainingImage], processor: PIIPImageProcessor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixel_values = processor([image.render() for image in images], return_tensors="pt")["pixel_values"]
    per_scene = [scene_targets(image.scene, image.extra_texts) for image in images]
    targets = {name: torch.tensor([targets[name] for targets in per_scene]) for name in SCENE_ATTRIBUTES}
    return pixel_values, targets


class EncoderBatches:
    """Step `step`'s encoder-pretraining batch (pixel values and cell targets), drawn and rendered on demand."""

    def __init__(self, settings: EncoderPretraining, processor: PIIPImageProcessor, image_size: int):
        self.settings = settings
        self.processor = processor
        self.image_size = image_size

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        settings = self.settings
        images = pretraining_images(ENCODER_TRAIN_SPLIT, step * settings.batch_size, settings.batch_size,
                                    settings.seed, self.image_size, settings.corner_texts)
        return batch_tensors(images, self.processor)


class StepBatches(torch.utils.data.Dataset):
    """Every step's batch by its index, built by `build_batch(step)`: a data loader over it can build the
    next steps' batches in worker processes while this one trains, and each step gets the same batch
    whichever process built it."""

    def __init__(self, build_batch, steps: int):
        self.build_batch = build_batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.build_batch(step)


def as_built(batch):
    """The data loader's collate function: a step's batch is already whole (the default would convert it)."""
    return batch


def step_batches(build_batch, steps: int, workers: int) -> torch.utils.data.DataLoader:
    """The steps' batches in order, `workers` processes building them ahead (none: built when needed).

    Where cores are spare, a worker hides the drawing and rendering; on 2 cores the training process's
    two threads already use them, and the recipe builds its batches in process.
    """
    return torch.utils.data.DataLoader(StepBatches(build_batch, steps), batch_size=None, shuffle=False,
                                       collate_fn=as_built, num_workers=workers,
                                       prefetch_factor=4 if workers else None)


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
            pretraining_images(ENCODER_CHECK_SPLIT, start, count, settings.seed, image_size), processor
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


def optimise(parameters: list[torch.Tensor], batches, batch_loss, learning_rate: float, weight_decay: float,
             warmup_steps: int, description: str, bf16: bool = False, device: str = "cpu",
             before_step=None) -> list[float]:
    """AdamW with linear warmup, cosine decay and gradient clipping at 1, a step per batch of `batches` (a
    `step_batches` loader); `batch_loss(batch)` gives each step's loss, and `before_step()`, when given, runs
    before each step.

    `bf16` runs the forward passes under bfloat16 autocast (the weights and optimizer stay float32), as
    `piip-llava train --bf16` does for stages 1 and 2.
    """
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, len(batches))
    losses = []
    progress = tqdm(batches, desc=description, unit="step")
    for batch in progress:
        if before_step is not None:
            before_step()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(batch)
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


def encoder_to_pretrain(config: PIIPVisionConfig) -> PIIPVisionModel:
    """A randomly initialised encoder in training mode, its weights channels-last.

    Channels-last weights make oneDNN pick its faster channels-last convolutions for the ResNet branches:
    the same arithmetic in another memory order. The saved weights load as usual.
    """
    return PIIPVisionModel(config).to(memory_format=torch.channels_last).train()


def pretrain_encoder(vision_config_file: str | os.PathLike, out_dir: str | os.PathLike,
                     settings: EncoderPretraining | None = None) -> Path:
    """Pretrain a PIIP encoder on scene attributes and save it (with its metrics) to `out_dir`.

    Skipped when `out_dir` already holds a result; the directory appears only once complete.
    """
    settings = settings or EncoderPretraining()
    out_dir = Path(out_dir)
    if is_pretrained(out_dir):
        return out_dir
    torch.manual_seed(settings.seed)
    config = PIIPVisionConfig(**json.loads(Path(vision_config_file).read_text()))
    encoder = encoder_to_pretrain(config)
    heads = SceneAttributeHeads(config.branch_output_widths, settings.antialias)
    processor = PIIPImageProcessor(size=config.image_size)

    def batch_loss(batch: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> torch.Tensor:
        pixel_values, targets = batch
        return attribute_loss(heads(encoder(pixel_values).feature_maps), targets)

    batches = step_batches(EncoderBatches(settings, processor, config.image_size), settings.steps,
                           settings.data_workers)
    parameters = [*encoder.parameters(), *heads.parameters()]
    losses = optimise(parameters, batches, batch_loss, settings.learning_rate, settings.weight_decay,
                      math.ceil(settings.warmup_ratio * settings.steps), "encoder pretraining")
    accuracy = attribute_accuracy(encoder, heads, processor, settings, config.image_size)
    logger.info("Encoder attribute accuracy on held-out scenes: " + json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
    metrics = {"settings": vars(settings), **loss_summary(losses), "held_out_accuracy": accuracy}
    save_with_metrics([encoder], metrics, out_dir)
    return out_dir


@dataclass
class LanguagePretraining:
    """How the LLM learns to answer from cell tokens: causal LM on fresh scenes' conversations, AdamW, cosine decay.

    The defaults are what taught a 4-layer, 256-wide LLM most lookups within a CPU budget (see
    docs/training.md): captions (10%) and conversations of up to 12 of the scene's questions, mostly
    without the short-answer instruction (shorter turns, more answers per token), 80% of them with a
    "List the shapes." turn answered by `scene_statements`, the questions themselves predicted too
    (`question_loss`), 10% of the questions as multiple choice. In bf16 the attention kernel stays float32
    (`float32_sdpa_attention`), and the demo recipe lowers the learning rate (`Recipe.language_pretraining_lr`):
    otherwise some lookups are not learnt.
    """

    steps: int = 450
    batch_size: int = 32
    learning_rate: float = 2e-3
    caption_rate: float = 0.1
    # Share of question conversations with a "List the shapes." turn answered by `scene_statements`.
    statement_rate: float = 0.8
    max_turns: int = 12
    # "pick": questions of distinct types, as in stage 2 (`pick_questions`); "all": every question of the
    # scene, repeats of a type included (`shuffled_questions`).
    question_pool: str = "all"
    multiple_choice_rate: float = 0.1
    plain_question_rate: float = 0.7
    # Share of question conversations about a scene with text in which the text cell is blurred with a
    # look-alike (`look_alike_text`) and every text question is multiple choice: practice in picking the
    # option that agrees with an uncertain reading (see `training_sample`).
    look_alike_text_rate: float = 0.0
    # Also predict the user's questions after the image, not only the answers (see `CellTokenConversations`).
    question_loss: bool = True
    # Each digit in each place of a number gets a random code of its own in the cell tokens from the start
    # (`CellAttributeEmbedding`), so a number's digits can be read in order before the offsets have learnt it.
    digit_place_codes: bool = False
    max_length: int = 320
    # Each step's samples, sorted by length, run as this many forward passes, each padded only to its own
    # longest sample.
    length_groups: int = 2
    # Data loader workers drawing the next steps' samples (`step_batches`); none by default, as drawing a
    # step's samples is a small part of the step.
    data_workers: int = 0
    bf16: bool = False
    check_scenes: int = 96
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.question_pool not in QUESTION_POOLS:
            raise ValueError(f"question_pool must be one of {sorted(QUESTION_POOLS)}, got {self.question_pool!r}.")


class CellAttributeEmbedding(nn.Module):
    """Stand-in image tokens for language pretraining: each grid cell as the sum of its attributes' word embeddings.

    The mirror image of `SceneAttributeHeads`: the encoder learns to lay each cell's attributes out
    linearly in its features, and these tokens are such a linear layout of the true attributes. An
    LLM that learns to answer from them has learnt the hard part of the task (find the cell a
    question names among the image tokens and read an attribute from it) before it ever sees an
    image; stage 1 then only has to make the projector write the encoder's features in a form the
    LLM reads. Each attribute's class contributes the LLM's own embedding of its name ("red",
    "circle", a digit), so the cell holding a circle starts out looking like the word in "What
    colour is the circle?", plus a learned offset per attribute and class (zero at first) that tells,
    say, a shape's "large" from the text's or the first digit from the second. Used during
    pretraining only, never saved.
    """

    def __init__(self, tokenizer, word_embeddings: nn.Embedding, digit_place_codes: bool = False):
        super().__init__()
        hidden_size = word_embeddings.embedding_dim
        self.offsets = nn.ModuleDict(
            {name: nn.Embedding(len(classes), hidden_size) for name, classes in SCENE_ATTRIBUTES.items()}
        )
        word_scale = float(word_embeddings.weight.detach().std())
        # A conjunction has no word to start from: it starts as a random vector of a word's scale. So, with
        # `digit_place_codes`, does each digit in each place: the digits' words alone make a number's cell a bag
        # of digits, the same for 103, 130 and 301, until the offsets have learnt the places.
        coded = CONJUNCTIONS + (DIGIT_PLACES if digit_place_codes else ())
        for name, offset in self.offsets.items():
            if name in coded:
                nn.init.normal_(offset.weight, std=word_scale)
                offset.weight.data[0] = 0
            else:
                nn.init.zeros_(offset.weight)
        for name, classes in SCENE_ATTRIBUTES.items():
            # "nothing here" and the conjunctions have no word: their rows stay empty (the offset alone).
            token_ids = [[] if label == NONE or name in CONJUNCTIONS else tokenizer(label, add_special_tokens=False)["input_ids"]
                         for label in classes]
            width = max(1, max(len(ids) for ids in token_ids))
            self.register_buffer(f"{name}_token_ids", torch.tensor([ids + [0] * (width - len(ids)) for ids in token_ids]),
                                 persistent=False)
            weights = [[1 / len(ids)] * len(ids) + [0.0] * (width - len(ids)) if ids else [0.0] * width for ids in token_ids]
            self.register_buffer(f"{name}_token_weights", torch.tensor(weights), persistent=False)

    def forward(self, targets: dict[str, torch.Tensor], word_embeddings: nn.Embedding) -> torch.Tensor:
        """{attribute: (batch, 9) class ids} -> (batch, 9, hidden) cell tokens, cells row-major."""
        cells = 0
        for name in SCENE_ATTRIBUTES:
            token_ids = getattr(self, f"{name}_token_ids")[targets[name]]
            token_weights = getattr(self, f"{name}_token_weights")[targets[name]]
            words = (word_embeddings(token_ids) * token_weights.unsqueeze(-1)).sum(-2)
            cells = cells + words + self.offsets[name](targets[name])
        return cells


LANGUAGE_TRAIN_SPLIT = "language-pretraining"
LANGUAGE_CHECK_SPLIT = "language-check"


class CellTokenConversations:
    """Training samples for language pretraining: a scene's caption (`plain`, as in stage 1) or question
    turns (`vicuna_v1`, as in stage 2), tokenized and labelled exactly as the trainer does, with one
    image token per grid cell.

    With `question_loss`, the user's turns after the image are predicted too, as an LLM's pretraining
    on grounded text would. Predicting "square" after "Where is the blue" is a lookup whose key is
    the token just read (find the blue cell, read its kind); the answer to "What colour is the
    circle?" is the same lookup with the key a dozen tokens back. The first kind teaches the second.
    `answers_only` labels the replies alone whatever the setting, for measuring answers.
    """

    def __init__(self, tokenizer, max_length: int, question_loss: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.question_loss = question_loss
        self.image_token_id = single_token_id(tokenizer, IMAGE_PLACEHOLDER)
        self.formats = {name: get_conversation_format(name) for name in ("plain", "vicuna_v1")}
        self.collator = LlavaDataCollator(tokenizer.pad_token_id, pad_to_multiple_of=TRAINING_PAD_MULTIPLE)

    def encode(self, conversation: list[dict], conversation_format: str,
               answers_only: bool = False) -> tuple[list[int], list[int]]:
        messages = record_conversation_messages({"image": "scene", "conversations": conversation})
        segments = self.formats[conversation_format].render_segments(messages)
        input_ids, labels = tokenize_with_labels(segments, self.tokenizer)
        input_ids, labels, image_end = expand_image_tokens(
            input_ids, labels, self.image_token_id, self.image_token_id, CELL_GRID**2
        )
        if self.question_loss and not answers_only:
            labels = labels[:image_end] + input_ids[image_end:]
        return truncate_sample(input_ids, labels, image_end, self.max_length)

    def batch(self, samples: list[tuple[list[int], list[int]]], scenes: list[Scene], device: str = "cpu",
              look_alikes: list[Scene | None] | None = None) -> dict:
        """Right-padded ids, labels and attention mask (the trainer's collator), and the scenes' cell attribute
        ids, on `device`; where any scene has a look-alike, also the look-alikes' (the scene itself where it
        has none)."""
        features = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)} for ids, labels in samples]
        batch = {name: tensor.to(device) for name, tensor in self.collator(features).items()}
        shown = {"targets": scenes}
        if look_alikes and any(look_alikes):
            shown["look_alike_targets"] = [other or scene for scene, other in zip(scenes, look_alikes)]
        for key, shown_scenes in shown.items():
            per_scene = [scene_targets(scene) for scene in shown_scenes]
            batch[key] = {name: torch.tensor([targets[name] for targets in per_scene], device=device)
                          for name in SCENE_ATTRIBUTES}
        return batch


def cell_token_loss(model, cell_embedding: CellAttributeEmbedding, batch: dict, image_token_id: int):
    """The LLM's output with each image token's embedding replaced by its cell's token (as LLaVA
    places projected image features). Where the batch has look-alikes, each cell token is the mean of the
    scene's and its look-alike's, which differ only where the look-alike's text does."""
    word_embeddings = model.get_input_embeddings()
    embeddings = word_embeddings(batch["input_ids"])
    image_positions = (batch["input_ids"] == image_token_id).unsqueeze(-1)
    cell_tokens = cell_embedding(batch["targets"], word_embeddings)
    if "look_alike_targets" in batch:
        cell_tokens = (cell_tokens + cell_embedding(batch["look_alike_targets"], word_embeddings)) / 2
    cell_tokens = cell_tokens.to(embeddings.dtype)
    embeddings = embeddings.masked_scatter(image_positions, cell_tokens)
    return model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"])


# How a conversation's questions are drawn, by `LanguagePretraining.question_pool`.
QUESTION_POOLS = {"pick": pick_questions, "all": shuffled_questions}


class DrawnSample(NamedTuple):
    """A language-pretraining sample: its scene, its token ids and labels, and the scene's look-alike whose
    cell tokens are averaged with the scene's (None: the scene is shown as it is)."""

    scene: Scene
    tokens: tuple[list[int], list[int]]
    look_alike: Scene | None = None


def look_alike_text(scene: Scene, rng: random.Random) -> Scene:
    """The scene with its text misread: another word, or the number with some digits (at least one) replaced.

    The stage-0 encoder does not read every text, so in stage 2 the LLM meets text cells it can only half
    read. Averaged with the true cell tokens, a look-alike gives such a cell, and the
    multiple-choice questions asked about it teach the LLM to name the option that agrees with what is
    legible instead of its own misreading (which names no option and scores like a wrong guess).
    """
    content = scene.text.content
    if scene.text.is_number:
        places = list(range(len(content)))
        blurred = [place for place in places if rng.random() < 0.5] or [rng.choice(places)]
        digits = list(content)
        for place in blurred:
            # A leading digit stays non-zero, so the look-alike is a number of the same length.
            choices = [digit for digit in "0123456789" if digit != content[place] and (place or digit != "0")]
            digits[place] = rng.choice(choices)
        content = "".join(digits)
    else:
        content = rng.choice([word for word in WORDS if word != content])
    return replace(scene, text=replace(scene.text, content=content))


def as_multiple_choice(items: list, rng: random.Random) -> list:
    """The items with every open text question turned into multiple choice."""
    return [make_multiple_choice(item, rng) if isinstance(item, Question) and item.question_type in TEXT_QUESTION_TYPES
            else item for item in items]


def training_sample(conversations: CellTokenConversations, seed: int, index: int,
                    settings: LanguagePretraining) -> DrawnSample:
    """One fresh scene and its sample: a caption with probability `caption_rate`, else up to `max_turns`
    question turns, with a "List the shapes." turn (`scene_statements`) among them with probability
    `statement_rate`. With probability `look_alike_text_rate` a question conversation about a scene with
    text shows the text blurred with a look-alike (`look_alike_text`) and asks its text questions as
    multiple choice only."""
    scene = generate_scene(item_rng(seed, LANGUAGE_TRAIN_SPLIT, index, "scene"))
    rng = item_rng(seed, LANGUAGE_TRAIN_SPLIT, index, "questions")
    if rng.random() < settings.caption_rate:
        return DrawnSample(scene, conversations.encode(caption_conversation(scene), "plain"))
    choose = QUESTION_POOLS[settings.question_pool]
    items = vary_items(choose(scene, rng, settings.max_turns), rng, settings.multiple_choice_rate,
                       settings.plain_question_rate)
    items = with_listing_turn(items, scene, rng, settings.statement_rate)
    look_alike = None
    # A stream of its own, so that a rate of 0 leaves every other draw as it was.
    blur_rng = item_rng(seed, LANGUAGE_TRAIN_SPLIT, index, "look-alike")
    if scene.text is not None and blur_rng.random() < settings.look_alike_text_rate:
        look_alike = look_alike_text(scene, blur_rng)
        items = as_multiple_choice(items, blur_rng)
    return DrawnSample(scene, conversations.encode(qa_conversation(items), "vicuna_v1"), look_alike)


class LanguageBatches:
    """Step `step`'s language-pretraining samples (`training_sample`), drawn on demand."""

    def __init__(self, conversations: CellTokenConversations, settings: LanguagePretraining):
        self.conversations = conversations
        self.settings = settings

    def __call__(self, step: int) -> list[DrawnSample]:
        start = step * self.settings.batch_size
        return [training_sample(self.conversations, self.settings.seed, index, self.settings)
                for index in range(start, start + self.settings.batch_size)]


def length_grouped_loss(model, cell_embedding, conversations: CellTokenConversations, drawn: list,
                        settings: LanguagePretraining) -> torch.Tensor:
    """The mean loss per labelled token over one step's (scene, sample) pairs, run as `length_groups`
    forward passes of samples of similar length (less padding), each weighted by its labelled tokens so
    the result equals one pass over the whole batch."""
    drawn = sorted(drawn, key=lambda sample: len(sample.tokens[0]))
    group_size = math.ceil(len(drawn) / settings.length_groups)
    groups = [drawn[start:start + group_size] for start in range(0, len(drawn), group_size)]
    total, labelled = 0, 0
    for group in groups:
        scenes, samples, look_alikes = zip(*group)
        batch = conversations.batch(list(samples), list(scenes), settings.device, list(look_alikes))
        count = int((batch["labels"][:, 1:] != -100).sum())
        total = total + cell_token_loss(model, cell_embedding, batch, conversations.image_token_id).loss * count
        labelled += count
    return total / max(labelled, 1)


def text_kind_key(scene: Scene) -> str:
    """The stage-0 check's key for the scene's text question by what is written: a number or a word."""
    return "text_numbers" if scene.text.is_number else "text_words"


@torch.no_grad()
def answer_accuracy(model, cell_embedding, conversations: CellTokenConversations, settings: LanguagePretraining) -> dict:
    """Per question type, the share of held-out questions whose whole answer the LLM predicts from the
    cell tokens (teacher-forced argmax on every answer token): what it can read from perfect image tokens.

    "multiple_choice" is the same over every type's question asked with four options (the reply names
    the right option, see `MultipleChoice`); "look_alike_text_choice" is the text question asked with
    four options about the text cell blurred with a look-alike (`look_alike_text`), where only the
    options tell the two readings apart. "text_words" and "text_numbers" are the open text questions of
    both sizes again, split by what is written: a word is one lookup, a number its digits in order.
    """
    model.eval()
    correct, asked = Counter(), Counter()

    def check(keys: tuple[str, ...], item, scene: Scene, look_alike: Scene | None = None) -> None:
        sample = conversations.encode(qa_conversation([item]), "vicuna_v1", answers_only=True)
        batch = conversations.batch([sample], [scene], settings.device, [look_alike])
        logits = cell_token_loss(model, cell_embedding, batch, conversations.image_token_id).logits
        labels = batch["labels"][0, 1:]
        supervised = labels != -100
        right = int((logits[0, :-1].argmax(-1)[supervised] == labels[supervised]).all())
        for key in keys:
            asked[key] += 1
            correct[key] += right

    for index in range(settings.check_scenes):
        scene = generate_scene(item_rng(settings.seed, LANGUAGE_CHECK_SPLIT, index, "scene"))
        rng = item_rng(settings.seed, LANGUAGE_CHECK_SPLIT, index, "options")
        for question_type in QUESTION_TYPES:
            questions = questions_of_type(scene, question_type)
            if questions:
                is_text = question_type in TEXT_QUESTION_TYPES
                kind = (text_kind_key(scene),) if is_text else ()
                check((question_type, *kind), questions[0], scene)
                check(("multiple_choice",), make_multiple_choice(questions[0], rng), scene)
                if is_text:
                    check(("look_alike_text_choice",), make_multiple_choice(questions[0], rng), scene,
                          look_alike_text(scene, rng))
    model.train()
    return {key: correct[key] / asked[key] for key in asked}


def language_model_to_pretrain(llm_dir: str | os.PathLike, settings: LanguagePretraining):
    """The LLM in `llm_dir`, float32 weights, in training mode on `settings.device`; with `settings.bf16`, its
    attention kernel runs in float32 inside the bf16 autocast (`float32_sdpa_attention`), which kept its loss
    level with float32's where bf16 attention did not.
    The saved config does not name that implementation, so the result loads anywhere with the default one."""
    from transformers import AutoModelForCausalLM

    attention = register_float32_attention() if settings.bf16 else None
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32, attn_implementation=attention)
    return model.to(settings.device).train()


def pretrain_language_model(llm_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            settings: LanguagePretraining | None = None, before_step=None) -> Path:
    """Train the LLM in `llm_dir` on captions and conversations about fresh scenes read from cell tokens
    (`CellAttributeEmbedding`); save the LLM and tokenizer to `out_dir`. `before_step()` runs before each step.

    Skipped when `out_dir` already holds a finished result (its metrics file); the directory appears
    only once complete.
    """
    from transformers import AutoTokenizer

    settings = settings or LanguagePretraining()
    out_dir = Path(out_dir)
    if is_pretrained(out_dir):
        return out_dir
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = language_model_to_pretrain(llm_dir, settings)
    cell_embedding = CellAttributeEmbedding(tokenizer, model.get_input_embeddings(),
                                            settings.digit_place_codes).to(settings.device)
    conversations = CellTokenConversations(tokenizer, settings.max_length, settings.question_loss)

    def batch_loss(drawn: list[DrawnSample]) -> torch.Tensor:
        return length_grouped_loss(model, cell_embedding, conversations, drawn, settings)

    batches = step_batches(LanguageBatches(conversations, settings), settings.steps, settings.data_workers)
    parameters = [*model.parameters(), *cell_embedding.parameters()]
    losses = optimise(parameters, batches, batch_loss, settings.learning_rate, 0.0,
                      math.ceil(0.03 * settings.steps), "language pretraining", bf16=settings.bf16,
                      device=settings.device, before_step=before_step)
    summary = loss_summary(losses)
    accuracy = answer_accuracy(model, cell_embedding, conversations, settings)
    logger.info(f"Language pretraining: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; answers "
                "read from cell tokens on held-out scenes: " + json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
    metrics = {"settings": vars(settings), **summary, "held_out_answer_accuracy": accuracy}
    save_with_metrics([model, tokenizer], metrics, out_dir)
    return out_dir
