"""Options of a PIIP-LLaVA training run: the stage recipes, what a run trains, and how it optimises.

The two stages differ in a handful of settings (spec section 7); `STAGE_RECIPES` holds them so a
run only names its stage and overrides what it wants. `piip-llava train` parses its options with
transformers' `HfArgumentParser` over `StageOptions` and `TrainRunArguments`, so each flag is its
field's name (`--lora_rank` or `--lora-rank`); `--model` and `--data` are kept as aliases of
`--model_dir` and `--data_path`. Everything about optimisation, saving and DeepSpeed ends in
transformers' own `TrainingArguments`, extended with the two fields LLaVA adds.
"""

from __future__ import annotations

import argparse
import os
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
    """What a run trains on and which parts of the model it trains; each field is a `piip-llava train` flag.

    `stage`, `model_dir` and `data_path` are required; they default to None only so that the flags can
    sit on the `train` command beside its `init` and `merge-lora` subcommands, which do not take them.
    """

    _argument_group_name = "what trains, on what"

    stage: str | None = field(
        default=None, metadata={"choices": STAGES, "help": "pretrain: stage 1 (projector only); finetune: stage 2"}
    )
    model_dir: str | None = field(
        default=None,
        metadata={"aliases": ["--model"], "help": "starting model directory (`train init` output, or stage 1's output)"},
    )
    data_path: str | None = field(
        default=None, metadata={"aliases": ["--data"], "help": "LLaVA-format .json/.jsonl records"}
    )
    image_folder: str | None = field(default=None, metadata={"help": "folder the records' image paths are relative to"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens, image tokens included"})
    conversation_format: str | None = field(
        default=None, metadata={"choices": ("plain", "vicuna_v1"), "help": "default: the stage's"}
    )
    image_aspect_ratio: str | None = field(
        default=None, metadata={"choices": ("pad", "crop"), "help": "default: crop for pretrain, pad for finetune"}
    )
    freeze_vision_branches: bool = field(
        default=False, metadata={"help": "stage 2: keep the pretrained vision branches fixed; the interactions still train"}
    )
    freeze_vision_tower: bool = field(
        default=False,
        metadata={"help": "stage 2: keep the whole vision encoder fixed, interactions included (as LLaVA-1.5 does)"},
    )
    freeze_llm: bool = field(default=False, metadata={"help": "stage 2: keep the language model fixed"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA on the LLM's linear layers (LLaVA: 128; 0: no LoRA)"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA scaling numerator (LLaVA: 256)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input (LLaVA: 0.05)"})
    scan_data: bool = field(
        default=False,
        metadata={"help": "check every record before training so skipped_samples.json covers all of them"},
    )

    def __post_init__(self):
        missing = [name for name in ("stage", "model_dir", "data_path") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"A training stage needs {', '.join(missing)}.")
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
class TrainRunArguments:
    """How a `piip-llava train` run optimises, saves and logs; each field is a flag.

    A short, LLaVA-shaped subset of `TrainingArguments` whose defaults follow the stage's recipe;
    `training_arguments` turns it into the `PIIPLlavaTrainingArguments` the Trainer takes.
    """

    _argument_group_name = "run, optimisation and checkpoints (defaults: the stage's LLaVA-1.5 recipe)"

    output_dir: str | None = field(default=None, metadata={"help": "where checkpoints and the final model go"})
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed config JSON (scripts/zero2.json, zero3.json, zero3_offload.json)"}
    )
    resume: str | None = field(
        default=None,
        metadata={"nargs": "?", "const": "auto", "metavar": "CHECKPOINT",
                  "help": "resume from CHECKPOINT, or with no value from the newest checkpoint-* in --output-dir"},
    )  # fmt: skip
    seed: int = field(
        default=42, metadata={"help": "seed of the weight initialisation, dropout and the sample order (default: 42)"}
    )
    use_cpu: bool = field(default=False, metadata={"help": "train on the CPU even if a GPU is present"})
    report_to: str = field(default="none", metadata={"help": "tensorboard, wandb, ... (default: none)"})
    # The DeepSpeed launcher passes --local_rank unless started with --no_local_rank; LOCAL_RANK is used instead.
    local_rank: int = field(default=-1, metadata={"help": argparse.SUPPRESS})
    learning_rate: float | None = field(default=None, metadata={"help": "1e-3 for pretrain, 2e-5 for finetune"})
    projector_lr: float | None = field(default=None, metadata={"help": "a separate learning rate for the projector"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay; biases and norms never decay (default: 0)"}
    )
    warmup_ratio: float = field(
        default=0.03,
        metadata={"help": "fraction of the optimizer steps spent warming the learning rate up, in [0, 1) (default: 0.03)"},
    )
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": "learning-rate schedule after warm-up: a transformers SchedulerType such as cosine, "
                  "linear, constant (default: cosine)"},
    )  # fmt: skip
    epochs: float = field(
        default=1.0, metadata={"help": "passes over the data; fractions allowed; --max-steps overrides it (default: 1)"}
    )
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps"})
    per_device_batch_size: int = field(
        default=4, metadata={"help": "samples per forward pass on each process (default: 4)"}
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "forward passes per optimizer step (default: 1, or what --global-batch-size implies)"},
    )
    global_batch_size: int | None = field(
        default=None, metadata={"help": "samples per optimizer step over all processes; sets the accumulation steps"}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, one more forward pass of compute"},
    )
    group_by_modality_length: bool | None = field(
        default=None,
        metadata={"action": argparse.BooleanOptionalAction,
                  "help": "batch image and text-only samples apart, sorted by length (default: on for finetune)"},
    )  # fmt: skip
    dataloader_workers: int = field(
        default=0,
        metadata={"help": "processes that load and tokenize samples beside training (default: 0, in the main process)"},
    )
    save_steps: int = field(default=500, metadata={"help": "save a checkpoint-N every this many steps"})
    save_total_limit: int = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    logging_steps: int = field(
        default=1, metadata={"help": "log the loss and learning rate every this many steps (default: 1)"}
    )

    def __post_init__(self):
        if not 0 <= self.warmup_ratio < 1:
            # transformers reads a warm-up of 1 or more as a number of steps, not a fraction.
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}.")

    def accumulation_steps(self, world_size: int) -> int:
        """Steps to accumulate: given, or derived from `global_batch_size` and the launched world size."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --per-device-batch-size "
                f"{self.per_device_batch_size} x {world_size} processes."
            )
        steps = self.global_batch_size // per_step
        if self.gradient_accumulation_steps not in (None, steps):
            raise ValueError(
                f"--gradient-accumulation-steps {self.gradient_accumulation_steps} contradicts --global-batch-size "
                f"{self.global_batch_size} ({steps} steps for {world_size} processes); give only one of them."
            )
        return steps

    def training_arguments(self, recipe: StageRecipe) -> PIIPLlavaTrainingArguments:
        """The Trainer's arguments for a run of the stage whose `recipe` fills what was not given."""
        if self.output_dir is None:
            raise ValueError("A training run needs output_dir (--output-dir).")
        group_by_modality = recipe.group_by_modality_length
        if self.group_by_modality_length is not None:
            group_by_modality = self.group_by_modality_length
        return PIIPLlavaTrainingArguments(
            output_dir=self.output_dir,
            deepspeed=self.deepspeed,
            seed=self.seed,
            use_cpu=self.use_cpu,
            report_to=self.report_to,
            learning_rate=self.learning_rate if self.learning_rate is not None else recipe.learning_rate,
            projector_lr=self.projector_lr,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_ratio,
            lr_scheduler_type=self.lr_scheduler,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_batch_size,
            gradient_accumulation_steps=self.accumulation_steps(int(os.environ.get("WORLD_SIZE", "1"))),
            bf16=self.bf16,
            activation_checkpointing=self.gradient_checkpointing,
            group_by_modality_length=group_by_modality,
            dataloader_num_workers=self.dataloader_workers,
            remove_unused_columns=False,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            log_level="info",
            log_level_replica="warning",
        )


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
