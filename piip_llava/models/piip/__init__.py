from .configuration_piip import BranchSpec, PIIPVisionConfig
from .modeling_piip import PIIPPreTrainedModel, PIIPVisionModel, PIIPVisionModelOutput

__all__ = ["BranchSpec", "PIIPPreTrainedModel", "PIIPVisionConfig", "PIIPVisionModel", "PIIPVisionModelOutput"]
