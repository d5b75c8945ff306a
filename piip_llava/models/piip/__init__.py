from .configuration_piip import PIIPBranchConfig, PIIPVisionConfig
from .modeling_piip import PIIPPreTrainedModel, PIIPVisionModel, PIIPVisionModelOutput

__all__ = ["PIIPBranchConfig", "PIIPPreTrainedModel", "PIIPVisionConfig", "PIIPVisionModel", "PIIPVisionModelOutput"]
