"""Training data for the two PIIP-LLaVA stages: records, samples, batches and their order."""

from .data import IGNORE_INDEX, LlavaDataCollator, LlavaSupervisedDataset
from .records import SkippedSample, load_llava_records
from .sampler import ModalityLengthGroupedSampler

__all__ = [
    "IGNORE_INDEX",
    "LlavaDataCollator",
    "LlavaSupervisedDataset",
    "ModalityLengthGroupedSampler",
    "SkippedSample",
    "load_llava_records",
]
