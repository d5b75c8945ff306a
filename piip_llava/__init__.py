"""piip-llava: Parameter-Inverted Image Pyramid networks and PIIP-LLaVA for Hugging Face transformers.

Importing the package registers its configs, models and processors with transformers' Auto
classes, so `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` and
`pipeline("image-text-to-text")` load our saved directories without `trust_remote_code`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .models.piip import (
    PIIPBackbone,
    PIIPForImageClassification,
    PIIPPerceptionConfig,
    PIIPPerceptionModel,
    PIIPVisionConfig,
    PIIPVisionModel,
)
from .models.piip.image_processing_piip import PIIPImageProcessor
from .models.piip_llava import (
    PIIPLlavaConfig,
    PIIPLlavaForConditionalGeneration,
    PIIPLlavaModel,
)
from .models.piip_llava.processing_piip_llava import PIIPLlavaProcessor

AutoConfig.register(PIIPVisionConfig.model_type, PIIPVisionConfig)
AutoModel.register(PIIPVisionConfig, PIIPVisionModel)
AutoImageProcessor.register(PIIPVisionConfig, image_processor_classes={"pil": PIIPImageProcessor})
AutoConfig.register(PIIPLlavaConfig.model_type, PIIPLlavaConfig)
AutoModel.register(PIIPLlavaConfig, PIIPLlavaModel)
AutoModelForImageTextToText.register(PIIPLlavaConfig, PIIPLlavaForConditionalGeneration)
AutoImageProcessor.register(PIIPLlavaConfig, image_processor_classes={"pil": PIIPImageProcessor})
AutoProcessor.register(PIIPLlavaConfig, PIIPLlavaProcessor)
AutoConfig.register(PIIPPerceptionConfig.model_type, PIIPPerceptionConfig)
AutoModel.register(PIIPPerceptionConfig, PIIPPerceptionModel)
AutoModelForImageClassification.register(PIIPPerceptionConfig, PIIPForImageClassification)
AutoBackbone.register(PIIPPerceptionConfig, PIIPBackbone)

__version__ = "0.1.0"

__all__ = [
    "PIIPBackbone",
    "PIIPForImageClassification",
    "PIIPImageProcessor",
    "PIIPLlavaConfig",
    "PIIPLlavaForConditionalGeneration",
    "PIIPLlavaModel",
    "PIIPLlavaProcessor",
    "PIIPPerceptionConfig",
    "PIIPPerceptionModel",
    "PIIPVisionConfig",
    "PIIPVisionModel",
]
