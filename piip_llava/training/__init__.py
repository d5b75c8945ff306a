"""Training PIIP-LLaVA: records, samples, batches and their order, and the pieces a custom loop reuses.

`LlavaSupervisedDataset` and `LlavaDataCollator` turn LLaVA-format records into batches for the two
stages. A loop of one's own (such as the demo recipe's stage 0 in scripts/demo_recipe) builds its
samples with the same steps: `record_conversation_messages` reads a record's turns as chat messages,
`tokenize_with_labels` tokenises rendered segments and masks what is not the reply,
`expand_image_tokens` repeats the image token to the model's count, `truncate_sample` cuts a sample
to the context, `single_token_id` looks up a token that must be one id, and batches are padded to a
multiple of `TRAINING_PAD_MULTIPLE`. `cpu_has_native_bf16` says whether bf16 autocast pays on this CPU.
"""

from .data import (
    IGNORE_INDEX,
    TRAINING_PAD_MULTIPLE,
    LlavaDataCollator,
    LlavaSupervisedDataset,
    expand_image_tokens,
    single_token_id,
    tokenize_with_labels,
    truncate_sample,
)
from .precision import cpu_has_native_bf16
from .records import SkippedSample, load_llava_records, record_conversation_messages
from .sampler import ModalityLengthGroupedSampler

__all__ = [
    "IGNORE_INDEX",
    "TRAINING_PAD_MULTIPLE",
    "LlavaDataCollator",
    "LlavaSupervisedDataset",
    "ModalityLengthGroupedSampler",
    "SkippedSample",
    "cpu_has_native_bf16",
    "expand_image_tokens",
    "load_llava_records",
    "record_conversation_messages",
    "single_token_id",
    "tokenize_with_labels",
    "truncate_sample",
]
