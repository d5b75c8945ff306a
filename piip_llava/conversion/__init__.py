"""Conversion of released PIIP-LLaVA checkpoints (official LLaVA-style layout) into our transformers format."""

from .converter import ConversionError, ConversionReport, convert_released_checkpoint
from .key_mapping import map_released_key
from .python_config import UnsafeConfigError, parse_python_config, read_python_config
from .released_config import piip_llava_config_from_released

__all__ = [
    "ConversionError",
    "ConversionReport",
    "UnsafeConfigError",
    "convert_released_checkpoint",
    "map_released_key",
    "parse_python_config",
    "piip_llava_config_from_released",
    "read_python_config",
]
