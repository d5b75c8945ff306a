"""Options of a PIIP-LLaVA training run: the stage recipes, the model/data options and the Trainer arguments.

The two stages differ in a handful of settings (spec section 7); `STAGE_RECIPES` holds them so a
run only names its stage and overrides what it wants. Everything about optimisation, saving and
DeepSpeed stays transformers' own `TrainingArguments`, extended with the two fields LLaVA adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .freezing import STAGES, TrainableParts


@dataclass(frozen=True)
class StageRecipe:
    """The LLaVA-1.5 settings of one stage; command-line options override them."""

    conversation_format: str
    image_aspect_ratio: str
    learning_rate: float
    group_by_modality_length: bool
    global_batch_size: int


STAGE_RECIPES = {
    # Captions in the plain format; images resized and centre-cropped; only the projector trains.
    "pretrain": StageRecipe("plain", "crop", 1e-3, False, 256),
    # Vicuna conversations; images padded to a square; batches grouped by modality and length.
    "finetune": StageRecipe("vicuna_v1", "pad", 2e-5, True, 128),
}


@dataclass
class StageOptions:
    """What a run trains on and which parts of the model it trains.

    Args:
        stage: "pretrain" (stage 1) or "finetune" (stage 2).
        model_dir: the starting model: `piip-llava train init`'s output for stage 1, stage 1's output for stage 2.
        data_path: a LLaVA-format .json / .jsonl file.
        image_folder: where the records' image paths are relative to.
        max_length: longest sample in tokens (image tokens included).
        conversation_format, image_aspect_ratio: default to the stage's recipe.
        freeze_vision_branches, freeze_vision_tower, freeze_llm: stage-2 switches (see `TrainableParts`).
        lora_rank: LoRA on the LLM with this rank (0: train the full LLM weights).
        lora_alpha, lora_dropout: LoRA's scaling and dropout.
        scan_data: check every record before training, so the skipped-sample summary covers all of them.
    """

    stage: str
    model_dir: str
    data_path: str
    image_folder: str | None = None
    max_length: int = 2048
    conversation_format: str | None = None
    image_aspect_ratio: str | None = None
    freeze_vision_branches: bool = False
    freeze_vision_tower: bool = False
    freeze_llm: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    scan_data: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be 0 (no LoRA) or positive, got {self.lora_rank}.")
        recipe = STAGE_RECIPES[self.stage]
        if self.conversation_format is None:
            self.conversation_format = recipe.conversation_format
        if self.image_aspect_ratio is None:
            self.image_aspect_ratio = recipe.image_aspect_ratio
        # Validates the stage/switch combination up front, before any model is loaded.
        self.trainable_parts = TrainableParts(
            stage=self.stage,
            freeze_vision_branches=self.freeze_vision_branches,
            freeze_vision_tower=self.freeze_vision_tower,
            freeze_llm=self.freeze_llm,
            lora=self.lora_rank > 0,
        )

    @property
    def recipe(self) -> StageRecipe:
        return STAGE_RECIPES[self.stage]


@dataclass
class PIIPLlavaTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` plus a projector learning rate and modality-grouped batching."""

    projector_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the projector; defaults to `learning_rate` (LLaVA's `mm_projector_lr`)."},
    )
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "Batch image and text-only samples separately, sorted by length (LLaVA-1.5 stage 2)."},
    )
