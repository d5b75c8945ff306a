"""Task-model configs chosen from a PIIP backbone's, image processors, and a converted backbone in a fresh head.

Segmentation is transformers' `UperNetForSemanticSegmentation` (the official PIIP segmentation head
is UperNet). Detection is transformers' `RTDetrForObjectDetection`: the official detectors are
DINO (deformable DETR with contrastive denoising queries, mixed query selection and iterative box
refinement), and RT-DETR is the transformers model that keeps all three (its decoder is DINO's,
with multi-scale deformable cross-attention in plain PyTorch), while Deformable DETR has no
denoising and D-FINE replaces the box regression. What differs from DINO is RT-DETR's encoder (one
attention layer on the coarsest map and a convolutional cross-scale fusion instead of six
deformable encoder layers). It takes the backbone's three maps `fpn2..fpn4`, as the official DINO
models do.
"""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import (
    RTDetrConfig,
    RTDetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from ..models.piip import PIIPBackbone, PIIPPerceptionConfig

DETECTION_STAGES = ["fpn2", "fpn3", "fpn4"]  # the official DINO models' outputs (strides 8, 16, 32 at patch 16)
# Each stage's stride relative to the merged map's (the last branch's patch grid).
STAGE_SCALES = {"fpn1": 0.25, "fpn2": 0.5, "fpn3": 1.0, "fpn4": 2.0}
ADE20K_NUM_LABELS = 150


def stage_strides(config: PIIPPerceptionConfig) -> list[int]:
    """The stride, in input pixels, of each stage in `config.out_features` (the stages scale the merged
    map, on the last branch's grid; a single-branch baseline's is its own branch's)."""
    from .baselines import PIIPSingleBranchConfig

    grid_branch = config.branch if isinstance(config, PIIPSingleBranchConfig) else config.branch_configs[-1]
    merged_grid = grid_branch.image_size // grid_branch.patch_size
    merged_stride = config.image_size / merged_grid
    strides = [merged_stride * STAGE_SCALES[name] for name in config.out_features]
    if any(stride != int(stride) for stride in strides):
        raise ValueError(f"Stages {config.out_features} have fractional strides {strides}; use a larger patch size.")
    return [int(stride) for stride in strides]


def labels_kwargs(id2label: dict[int, str]) -> dict:
    id2label = {int(index): name for index, name in id2label.items()}
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def segmentation_config(
    backbone_config: PIIPPerceptionConfig,
    id2label: dict[int, str],
    hidden_size: int = 512,
    auxiliary_channels: int = 256,
    **upernet_options,
) -> UperNetConfig:
    """UperNet on every stage the backbone returns, with the FCN auxiliary head on the third (`fpn3`,
    the merged map). The widths default to mmsegmentation's UperNet (512 and 256 channels)."""
    return UperNetConfig(
        backbone_config=copy.deepcopy(backbone_config),
        hidden_size=hidden_size,
        auxiliary_channels=auxiliary_channels,
        **labels_kwargs(id2label),
        **upernet_options,
    )


def ade20k_segmentation_config(backbone_config: PIIPPerceptionConfig) -> UperNetConfig:
    """A released ADE20K model's shape (`configs/perception/upernet_*.json` as the backbone): 150 classes."""
    return segmentation_config(backbone_config, {index: f"class_{index}" for index in range(ADE20K_NUM_LABELS)})


def detection_config(
    backbone_config: PIIPPerceptionConfig, id2label: dict[int, str], d_model: int = 256, **rt_detr_options
) -> RTDetrConfig:
    """RT-DETR on the backbone's `fpn2..fpn4`, its encoder and decoder `d_model` wide."""
    backbone_config = copy.deepcopy(backbone_config)
    backbone_config.set_output_features_output_indices(out_features=DETECTION_STAGES, out_indices=None)
    channels = backbone_config.branches[0]["hidden_size"]
    options = {
        "encoder_in_channels": [channels] * len(DETECTION_STAGES),
        "feat_strides": stage_strides(backbone_config),
        "encoder_hidden_dim": d_model,
        "decoder_in_channels": [d_model] * len(DETECTION_STAGES),
        "num_feature_levels": len(DETECTION_STAGES),
        "d_model": d_model,
        **rt_detr_options,
    }
    return RTDetrConfig(backbone_config=backbone_config, **labels_kwargs(id2label), **options)


def backbone_of(task_model: UperNetForSemanticSegmentation | RTDetrForObjectDetection) -> PIIPBackbone:
    """The `PIIPBackbone` inside a task model."""
    if isinstance(task_model, UperNetForSemanticSegmentation):
        backbone = task_model.backbone
    elif isinstance(task_model, RTDetrForObjectDetection):
        backbone = task_model.model.backbone.model
    else:
        raise TypeError(f"Expected a UperNet or RT-DETR task model, got {type(task_model).__name__}.")
    if not isinstance(backbone, PIIPBackbone):
        raise TypeError(f"The task model's backbone is a {type(backbone).__name__}, not a PIIPBackbone.")
    return backbone


def load_backbone_weights(task_model, backbone_dir: str | Path) -> None:
    """Copy a saved `PIIPBackbone`'s weights (e.g. `piip-llava convert` output) into a task model's backbone."""
    backbone = PIIPBackbone.from_pretrained(backbone_dir)
    backbone_of(task_model).load_state_dict(backbone.state_dict(), strict=True)


def segmenter_from_backbone(
    backbone_dir: str | Path, id2label: dict[int, str], **head_options
) -> UperNetForSemanticSegmentation:
    """UperNet with a converted backbone's weights and a freshly initialised head."""
    backbone_config = PIIPPerceptionConfig.from_pretrained(backbone_dir)
    model = UperNetForSemanticSegmentation(segmentation_config(backbone_config, id2label, **head_options))
    load_backbone_weights(model, backbone_dir)
    return model


def detector_from_backbone(backbone_dir: str | Path, id2label: dict[int, str], **head_options) -> RTDetrForObjectDetection:
    """RT-DETR with a converted backbone's weights and a freshly initialised encoder, decoder and heads."""
    backbone_config = PIIPPerceptionConfig.from_pretrained(backbone_dir)
    model = RTDetrForObjectDetection(detection_config(backbone_config, id2label, **head_options))
    load_backbone_weights(model, backbone_dir)
    return model


def segmentation_image_processor(backbone_config: PIIPPerceptionConfig) -> SegformerImageProcessorPil:
    """Resize to the backbone's input size, ImageNet mean / std; label maps keep 0 as a class (no reduction)."""
    size = backbone_config.image_size
    return SegformerImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        do_reduce_labels=False,
    )


def detection_image_processor(backbone_config: PIIPPerceptionConfig) -> RTDetrImageProcessorPil:
    """Resize to the backbone's input size, ImageNet mean / std; COCO boxes become normalised (cx, cy, w, h)."""
    size = backbone_config.image_size
    return RTDetrImageProcessorPil(
        size={"height": size, "width": size},
        do_normalize=True,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        do_convert_annotations=True,
    )


__all__ = [
    "ADE20K_NUM_LABELS",
    "DETECTION_STAGES",
    "ade20k_segmentation_config",
    "backbone_of",
    "detection_config",
    "detection_image_processor",
    "detector_from_backbone",
    "load_backbone_weights",
    "segmentation_config",
    "segmentation_image_processor",
    "segmenter_from_backbone",
    "stage_strides",
]
