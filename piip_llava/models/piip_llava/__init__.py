from .configuration_piip_llava import PIIPLlavaConfig
from .modeling_piip_llava import PIIPLlavaForConditionalGeneration, PIIPLlavaModel, PIIPLlavaPreTrainedModel
from .projector import PIIPMultiBranchProjector

__all__ = [
    "PIIPLlavaConfig",
    "PIIPLlavaForConditionalGeneration",
    "PIIPLlavaModel",
    "PIIPLlavaPreTrainedModel",
    "PIIPMultiBranchProjector",
]
