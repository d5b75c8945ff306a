"""PIIP backbones inside transformers' own dense-prediction models: UperNet segmentation and RT-DETR detection.

The task models are transformers' `UperNetForSemanticSegmentation` and `RTDetrForObjectDetection`
with a `PIIPPerceptionConfig` as their `backbone_config`: they build the backbone through
`load_backbone` like any other, save and load as ordinary transformers directories, and run in
`pipeline("image-segmentation")` / `pipeline("object-detection")`. This package only chooses their
settings from the backbone's (channels, strides, image size), loads a converted backbone into a
fresh head, trains them with `Trainer` and scores them (mIoU, COCO mAP). See docs/perception_tasks.md.
"""

from .models import (
    DETECTION_STAGES,
    backbone_of,
    detection_config,
    detection_image_processor,
    detector_from_backbone,
    segmentation_config,
    segmentation_image_processor,
    segmenter_from_backbone,
)

__all__ = [
    "DETECTION_STAGES",
    "backbone_of",
    "detection_config",
    "detection_image_processor",
    "detector_from_backbone",
    "segmentation_config",
    "segmentation_image_processor",
    "segmenter_from_backbone",
]
