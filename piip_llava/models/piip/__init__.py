from .configuration_piip import PIIPBranchConfig, PIIPVisionConfig
from .configuration_piip_perception import PerceptionBranchConfig, PIIPPerceptionConfig
from .modeling_piip import PIIPPreTrainedModel, PIIPVisionModel, PIIPVisionModelOutput
from .modeling_piip_perception import (
    PIIPBackbone,
    PIIPForImageClassification,
    PIIPPerceptionModel,
    PIIPPerceptionPreTrainedModel,
)

__all__ = [
    "PIIPBackbone",
    "PIIPBranchConfig",
    "PIIPForImageClassification",
    "PIIPPerceptionConfig",
    "PIIPPerceptionModel",
    "PIIPPerceptionPreTrainedModel",
    "PIIPPreTrainedModel",
    "PIIPVisionConfig",
    "PIIPVisionModel",
    "PIIPVisionModelOutput",
    "PerceptionBranchConfig",
]
