"""Which PIIP-LLaVA parameters train in each stage, LoRA on the language model, and the record of both.

Every parameter belongs to one *part* of the model, read from its name so that the same rules
hold for a bare model, a PEFT-wrapped one and a ZeRO-3 partitioned one (whose tensors are empty
until gathered, but whose names are intact):

- `vision_branches`: the pretrained backbones inside the PIIP encoder;
- `vision_interactions`: the cross-branch interaction units (zero-gated at initialisation);
- `projector`: the multi-branch projector;
- `language_model`: the LLM body, its embeddings and the LM head;
- `lora`: LoRA adapter weights PEFT adds to the LLM's linear layers;
- `peft_frozen_copy`: PEFT's untouched originals of modules it trains as full copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

VISION_BRANCHES = "vision_branches"
VISION_INTERACTIONS = "vision_interactions"
PROJECTOR = "projector"
LANGUAGE_MODEL = "language_model"
LORA = "lora"
PEFT_FROZEN_COPY = "peft_frozen_copy"

STAGES = ("pretrain", "finetune")

TRAINABLE_PARAMETERS_FILE = "trainable_parameters.txt"
FROZEN_PARAMETERS_FILE = "frozen_parameters.txt"
PARAMETER_SUMMARY_FILE = "parameter_summary.json"


def parameter_part(name: str) -> str:
    """The part of the model a parameter belongs to, from its (possibly PEFT-prefixed) name."""
    dotted = f".{name}."
    if ".original_module." in dotted:
        return PEFT_FROZEN_COPY
    if ".lora_" in dotted:
        return LORA
    if ".multi_modal_projector." in dotted:
        return PROJECTOR
    if ".vision_tower." in dotted:
        return VISION_INTERACTIONS if ".interactions." in dotted else VISION_BRANCHES
    return LANGUAGE_MODEL


@dataclass(frozen=True)
class TrainableParts:
    """What trains in one run. Stage 1 trains only the projector; stage 2 everything unless switched off.

    Args:
        stage: "pretrain" (stage 1) or "finetune" (stage 2).
        freeze_vision_branches: stage 2 only; keep the pretrained backbones fixed, the interactions still train.
        freeze_vision_tower: stage 2 only; keep the whole encoder fixed, interactions included (LLaVA-1.5
            keeps its CLIP fixed this way). The encoder then runs without building a backward graph.
        freeze_llm: stage 2 only; keep the language model fixed.
        lora: stage 2 only; the LLM trains through LoRA adapters instead of its full weights.
    """

    stage: str
    freeze_vision_branches: bool = False
    freeze_vision_tower: bool = False
    freeze_llm: bool = False
    lora: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        if self.stage == "pretrain" and (
            self.freeze_vision_branches or self.freeze_vision_tower or self.freeze_llm or self.lora
        ):
            raise ValueError(
                "Stage 1 (pretrain) trains only the projector; --freeze-vision-branches, --freeze-vision-tower, "
                "--freeze-llm and LoRA are stage-2 (finetune) options."
            )
        if self.lora and self.freeze_llm:
            raise ValueError("LoRA trains the language model; it cannot be combined with --freeze-llm.")

    @property
    def parts(self) -> frozenset[str]:
        if self.stage == "pretrain":
            return frozenset({PROJECTOR})
        parts = {PROJECTOR}
        if not self.freeze_vision_tower:
            parts.add(VISION_INTERACTIONS)
            if not self.freeze_vision_branches:
                parts.add(VISION_BRANCHES)
        if self.lora:
            parts.add(LORA)
        elif not self.freeze_llm:
            parts.add(LANGUAGE_MODEL)
        return frozenset(parts)

    @property
    def trains_vision_tower(self) -> bool:
        return bool(self.parts & {VISION_BRANCHES, VISION_INTERACTIONS})


def set_trainable_parts(model: torch.nn.Module, trainable: TrainableParts) -> None:
    """Set `requires_grad` on every parameter from its part; everything outside `trainable.parts` is frozen."""
    parts = trainable.parts
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_part(name) in parts)
    counts = parameter_counts(model)
    logger.info(
        f"{trainable.stage}: training {sorted(parts)}; {counts['trainable']:,} trainable and "
        f"{counts['frozen']:,} frozen parameters."
    )


def parameter_numel(parameter: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0}
    for _, parameter in model.named_parameters():
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter_numel(parameter)
    return counts


def write_parameter_report(model: torch.nn.Module, output_dir: str | Path) -> dict:
    """Write the names of the trainable and the frozen parameters, and counts per part, to `output_dir`.

    A run's record of what it actually trained: a wrong switch shows up here before the loss does.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainable, frozen = [], []
    per_part: dict[str, dict[str, int]] = {}
    for name, parameter in model.named_parameters():
        (trainable if parameter.requires_grad else frozen).append(name)
        state = "trainable" if parameter.requires_grad else "frozen"
        part_counts = per_part.setdefault(parameter_part(name), {"trainable": 0, "frozen": 0})
        part_counts[state] += parameter_numel(parameter)
    (output_dir / TRAINABLE_PARAMETERS_FILE).write_text("".join(f"{name}\n" for name in trainable))
    (output_dir / FROZEN_PARAMETERS_FILE).write_text("".join(f"{name}\n" for name in frozen))
    summary = {"parts": dict(sorted(per_part.items())), **parameter_counts(model)}
    (output_dir / PARAMETER_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def language_model_linear_names(model: torch.nn.Module) -> list[str]:
    """Full module names of every `nn.Linear` inside the language model body (not the LM head).

    These are LoRA's targets, as in LLaVA's `find_all_linear_names`: the vision tower and the
    projector train as whole modules, and the LM head stays as it is.
    """
    language_model = model.model.language_model
    prefix = "model.language_model."
    return [
        prefix + name for name, module in language_model.named_modules() if isinstance(module, torch.nn.Linear)
    ]


def apply_lora(model, trainable: TrainableParts, rank: int, alpha: int, dropout: float = 0.05):
    """The model wrapped by PEFT: LoRA on the LLM's linear layers; projector (and vision tower) as full copies.

    The projector and, unless the whole tower is frozen, the vision tower go into
    `modules_to_save`, so the adapter directory carries their trained weights and `merge_lora`
    gives back a complete checkpoint. Branches frozen by `--freeze-vision-branches` are frozen
    again inside the trained copy afterwards.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}.")
    targets = language_model_linear_names(model)
    if not targets:
        raise ValueError("The language model has no nn.Linear layers for LoRA to adapt.")
    # Anchor every name so no module elsewhere with the same leaf name is adapted.
    target_pattern = "|".join(re.escape(name) for name in targets)
    modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if trainable.trains_vision_tower else [])
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=f"^(?:{target_pattern})$",
        modules_to_save=modules_to_save,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    set_trainable_parts(peft_model, trainable)
    return peft_model


def merge_lora(peft_model) -> torch.nn.Module:
    """A plain PIIP-LLaVA model with the LoRA updates folded into the LLM weights and the trained copies in place."""
    return peft_model.merge_and_unload()
