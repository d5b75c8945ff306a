from .configuration_piip_llava import PIIPLlavaConfig
from .modeling_piip_llava import PIIPLlavaForConditionalGeneration, PIIPLlavaModel, PIIPLlavaPreTrainedModel
from .projector import PIIPMultiBranchProjector, resize_to_grid

__all__ = [
    "PIIPLlavaConfig",
    "PIIPLlavaForConditionalGeneration",
    "PIIPLlavaModel",
    "PIIPLlavaPreTrainedModel",
    "PIIPMultiBranchProjector",
    "resize_to_grid",
]
