"""Parameters and multiply-adds of a task model (UperNet / RT-DETR on a PIIP backbone), and the backbone's share.

Counted as `piip_llava.flops` counts the encoders: on the meta device (no memory, no initialisation),
one image at `image_size`, matrix products and convolutions only, one multiply-add = one FLOP.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, PreTrainedConfig, RTDetrConfig, UperNetConfig

from ..flops import _extra_flop_formulas
from ..models.piip import PIIPPerceptionConfig

TASK_MODEL_TYPES = ("upernet", "rt_detr")


def task_model_class(config: PreTrainedConfig) -> type:
    from transformers import RTDetrForObjectDetection, UperNetForSemanticSegmentation

    if isinstance(config, UperNetConfig):
        return UperNetForSemanticSegmentation
    if isinstance(config, RTDetrConfig):
        return RTDetrForObjectDetection
    raise ValueError(f"Not a task model config this counts: {type(config).__name__} (expected one of {TASK_MODEL_TYPES}).")


def backbone_prefix(config: PreTrainedConfig) -> str:
    """Where the backbone sits in the task model's module tree."""
    return "backbone" if isinstance(config, UperNetConfig) else "model.backbone.model"


def task_model_cost(config: PreTrainedConfig, image_size: int | None = None) -> dict:
    """Parameters and multiply-adds of the whole task model and of its PIIP backbone, for one square image
    (the backbone's input size by default); `backbone_macs_share` is the backbone's part of the total."""
    from accelerate import init_empty_weights

    if not isinstance(config.backbone_config, PIIPPerceptionConfig):
        raise TypeError(f"The task model's backbone is {type(config.backbone_config).__name__}, not a PIIP backbone.")
    image_size = image_size or config.backbone_config.image_size
    config = copy.deepcopy(config)
    config.backbone_config._attn_implementation = "eager"  # attention as plain matrix products, which are counted
    with init_empty_weights(include_buffers=True):
        model = task_model_class(config)(config).eval()
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas())
    pixel_values = torch.empty(1, 3, image_size, image_size, device="meta")
    with counter, torch.no_grad():
        model(pixel_values=pixel_values)
    root = type(model).__name__
    counts = counter.get_flop_counts()
    total = counter.get_total_flops() // 2
    backbone = sum(counts.get(f"{root}.{backbone_prefix(config)}", {}).values()) // 2
    prefix = backbone_prefix(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    backbone_parameters = sum(parameter.numel() for parameter in model.get_submodule(prefix).parameters())
    return {
        "image_size": image_size,
        "parameters": parameters,
        "backbone_parameters": backbone_parameters,
        "macs": total,
        "backbone_macs": backbone,
        "gflops": total / 1e9,
        "backbone_gflops": backbone / 1e9,
        "backbone_macs_share": backbone / total if total else 0.0,
    }


def load_task_config(path) -> PreTrainedConfig:
    """A saved task model's config (a folder or its config.json)."""
    return AutoConfig.from_pretrained(path)


def format_task_cost(cost: dict, title: str) -> str:
    return "\n".join(
        [
            title,
            f"input {cost['image_size']}x{cost['image_size']}, 1 image; GFLOPs = multiply-adds / 1e9",
            f"{'part':<10}  {'params (M)':>11}  {'GFLOPs':>9}  {'share':>6}",
            (
                f"{'backbone':<10}  {cost['backbone_parameters'] / 1e6:>11.2f}  {cost['backbone_gflops']:>9.3f}  "
                f"{100 * cost['backbone_macs_share']:>5.1f}%"
            ),
            (
                f"{'head':<10}  {(cost['parameters'] - cost['backbone_parameters']) / 1e6:>11.2f}  "
                f"{cost['gflops'] - cost['backbone_gflops']:>9.3f}  {100 * (1 - cost['backbone_macs_share']):>5.1f}%"
            ),
            f"{'total':<10}  {cost['parameters'] / 1e6:>11.2f}  {cost['gflops']:>9.3f}",
        ]
    )


__all__ = ["TASK_MODEL_TYPES", "format_task_cost", "load_task_config", "task_model_cost"]
