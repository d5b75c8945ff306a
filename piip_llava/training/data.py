"""The supervised dataset and collator for both LLaVA training stages.

A sample is rendered with the conversation format the checkpoint uses (`plain` for stage-1
captioning, `vicuna_v1` for instruction tuning), tokenized once, labelled from the rendered
segments, and its "<image>" token expanded into one token per visual token, exactly as the
processor expands it at inference, so training and inference ids agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
from torch.utils.data import Dataset
from transformers.utils import logging

from ..conversation import IMAGE_PLACEHOLDER, get_conversation_format
from .records import (
    BAD_ROLES,
    NO_SUPERVISED_TOKENS,
    TOO_LONG,
    SkippedSample,
    load_llava_records,
    load_rgb_image,
    move_image_placeholder_first,
    record_conversation_messages,
    record_has_image,
    record_lengths,
)

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# Training batches are padded to a multiple of this length: fewer distinct shapes, so the CPU's bf16 kernels
# (built and kept per shape) and GPU tensor cores are reused. Without it, a 700-step bf16 run on 2 CPU cores
# slowed from 0.95 to 1.43 s a step and grew to 5.5 GB. The extra positions are masked and unlabelled.
TRAINING_PAD_MULTIPLE = 16
IMAGE_ASPECT_RATIOS = ("pad", "crop")


def tokenize_with_labels(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the joined segments and their labels: the id where supervised, else -100.

    The whole prompt is tokenized once: tokenizing segments separately would change the pieces at
    their boundaries (LLaMA attaches the space before a reply to the reply's first word). A token
    is supervised when its character span overlaps a supervised character; special tokens the
    tokenizer adds (bos) cover no character and never are.
    """
    text = "".join(segment for segment, _ in segments)
    supervised_chars = reply_characters(segments)
    # supervised_before[i]: how many supervised characters precede character i.
    supervised_before = [0, *accumulate(supervised_chars)]
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    labels = [
        token_id if supervised_before[end] > supervised_before[start] else IGNORE_INDEX
        for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return list(encoding["input_ids"]), labels


def reply_characters(segments: list[tuple[str, bool]]) -> list[bool]:
    """Per character of the joined segments: is it part of what the model must produce?

    The spaces just before a supervised segment count as part of it ("ASSISTANT: " + "Grey."):
    the model generates that space, as "▁Grey" or as a lone "▁" before "G", after a prompt that
    ends with "ASSISTANT:". LLaVA's label masking supervises it too.
    """
    flags = [supervised for segment, supervised in segments for _ in segment]
    text = "".join(segment for segment, _ in segments)
    for position in range(len(text) - 2, -1, -1):
        if not flags[position] and flags[position + 1] and text[position] == " ":
            flags[position] = True
    return flags


def expand_image_tokens(
    input_ids: list[int], labels: list[int], placeholder_id: int, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int], int]:
    """Each placeholder token replaced by `num_image_tokens` image tokens (never supervised).

    Also returns where the last image-token run ends (0 without an image), which truncation must
    not cut into.
    """
    expanded_ids, expanded_labels, image_end = [], [], 0
    for token_id, label in zip(input_ids, labels):
        if token_id == placeholder_id:
            expanded_ids.extend([image_token_id] * num_image_tokens)
            expanded_labels.extend([IGNORE_INDEX] * num_image_tokens)
            image_end = len(expanded_ids)
        else:
            expanded_ids.append(token_id)
            expanded_labels.append(label)
    return expanded_ids, expanded_labels, image_end


def truncate_sample(
    input_ids: list[int], labels: list[int], image_end: int, max_length: int
) -> tuple[list[int], list[int]]:
    """The sample cut to `max_length` tokens from the tail, or `SkippedSample` if that ruins it.

    A cut through the image tokens would leave the model fewer visual tokens than features, and a
    cut before the first supervised token would leave nothing to learn; both count as too long.
    """
    if len(input_ids) > max_length:
        if image_end > max_length:
            raise SkippedSample(
                TOO_LONG, f"{len(input_ids)} tokens; the image tokens end at {image_end} > {max_length}"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkippedSample(TOO_LONG, f"no supervised token within the first {max_length} tokens")
    elif all(label == IGNORE_INDEX for label in labels):
        raise SkippedSample(NO_SUPERVISED_TOKENS, "the rendered conversation has no supervised token")
    return input_ids, labels


def single_token_id(tokenizer, text: str) -> int:
    """The one token id of `text` (the image placeholder, an image token); a clear error if it is not one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer must encode {text!r} as one token (got {ids}); add it with "
            f"`tokenizer.add_special_tokens({{'extra_special_tokens': [{text!r}]}})` and resize the model embeddings."
        )
    return ids[0]


class LlavaSupervisedDataset(Dataset):
    """LLaVA-format records as tokenized, labelled training samples with their images.

    Each item is `{"input_ids", "labels"}` (1-D long tensors) plus `"pixel_values"` (3, S, S) for
    samples with an image. A record that cannot be used (see `records.py` for the reasons) is
    logged once, counted, and replaced by the next usable record, so one bad sample never stops a
    run; `skipped_summary()` gives the counts. With DataLoader workers each worker keeps its own
    counts; `scan()` checks every record in the calling process.

    Args:
        records: a .json / .jsonl path, a list of record dicts or a `datasets.Dataset`.
        tokenizer: a fast tokenizer (offsets are needed) that encodes "<image>" as one token.
        image_processor: called as `image_processor(images=[pil], return_tensors="pt",
            pad_to_square=...)` and returning `{"pixel_values": (1, 3, S, S)}`.
        num_image_tokens: visual tokens the model produces per image; each "<image>" becomes this many.
        image_folder: where the records' relative image paths live.
        conversation_format: "vicuna_v1" (instruction tuning) or "plain" (stage-1 captions).
        image_token_id: id the expanded image tokens get; defaults to the tokenizer's "<image>" id.
        max_length: longest sample in tokens, image tokens included.
        image_aspect_ratio: "pad" pads images to a square with the mean colour before resizing;
            "crop" resizes and centre-crops.
    """

    def __init__(
        self,
        records,
        tokenizer,
        image_processor,
        *,
        num_image_tokens: int,
        image_folder: str | None = None,
        conversation_format: str = "vicuna_v1",
        image_token_id: int | None = None,
        max_length: int = 2048,
        image_aspect_ratio: str = "pad",
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("LlavaSupervisedDataset needs a fast tokenizer: labels come from its offset mapping.")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}.")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}.")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}.")
        self.records = load_llava_records(records)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.conversation_format = get_conversation_format(conversation_format)
        self.num_image_tokens = num_image_tokens
        self.placeholder_token_id = single_token_id(tokenizer, IMAGE_PLACEHOLDER)
        self.image_token_id = self.placeholder_token_id if image_token_id is None else image_token_id
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        # index -> (reason, detail) of every record found unusable so far.
        self.skipped: dict[int, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} is out of range for a dataset of {len(self)} samples.")
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self.skipped:
                continue
            try:
                return self.build_sample(candidate)
            except SkippedSample as skip:
                self.record_skip(candidate, skip)
        raise ValueError(f"Every one of the {len(self)} training records is unusable: {self.skipped_summary()}.")

    def build_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index`, or `SkippedSample` saying why it cannot be used (nothing is recorded here)."""
        record = self.records[index]
        input_ids, labels = self.tokenize_record(record)
        sample = {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels)}
        if record_has_image(record):
            image = load_rgb_image(record["image"], self.image_folder)
            sample["pixel_values"] = self.preprocess_image(image)
        return sample

    def tokenize_record(self, record: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a record, image tokens expanded and truncated to `max_length`."""
        messages = record_conversation_messages(record)
        if self.conversation_format.name == "plain" and len(messages) != 2:
            raise SkippedSample(
                BAD_ROLES, f"a plain-format sample needs one human and one gpt turn, got {len(messages)}"
            )
        messages = move_image_placeholder_first(messages)
        segments = self.conversation_format.render_segments(messages)
        input_ids, labels = tokenize_with_labels(segments, self.tokenizer)
        input_ids, labels, image_end = expand_image_tokens(
            input_ids, labels, self.placeholder_token_id, self.image_token_id, self.num_image_tokens
        )
        return truncate_sample(input_ids, labels, image_end, self.max_length)

    def preprocess_image(self, image) -> torch.Tensor:
        pixel_values = self.image_processor(
            images=[image], return_tensors="pt", pad_to_square=self.image_aspect_ratio == "pad"
        )["pixel_values"]
        return pixel_values[0]  # (3, S, S)

    def record_skip(self, index: int, skip: SkippedSample) -> None:
        if index in self.skipped:
            return
        self.skipped[index] = (skip.reason, skip.detail)
        record_id = self.record_id(index)
        logger.warning(f"Skipping training sample {index} (id {record_id!r}): {skip.reason}: {skip.detail}.")

    def record_id(self, index: int):
        record = self.records[index]
        return record.get("id") if isinstance(record, dict) else None

    def skipped_summary(self) -> dict[str, int]:
        """How many records were skipped so far, by reason."""
        summary: dict[str, int] = {}
        for reason, _ in self.skipped.values():
            summary[reason] = summary.get(reason, 0) + 1
        return dict(sorted(summary.items()))

    def log_skipped_summary(self) -> None:
        summary = self.skipped_summary()
        if not summary:
            logger.info(f"All {len(self)} training records seen so far were usable.")
            return
        counts = ", ".join(f"{reason}: {count}" for reason, count in summary.items())
        logger.warning(f"Skipped {len(self.skipped)} of {len(self)} training records ({counts}).")

    def scan(self, load_images: bool = True) -> dict[str, int]:
        """Check every record up front (without the image processor) and log what would be skipped.

        Training skips bad records as it meets them; a scan before training finds them all at once
        and in one process, so the summary is complete. `load_images=False` only checks the text.
        """
        for index in range(len(self)):
            if index in self.skipped:
                continue
            record = self.records[index]
            try:
                self.tokenize_record(record)
                if load_images and record_has_image(record):
                    load_rgb_image(record["image"], self.image_folder)
            except SkippedSample as skip:
                self.record_skip(index, skip)
        self.log_skipped_summary()
        return self.skipped_summary()

    @cached_property
    def _lengths_and_modalities(self) -> tuple[list[int], list[bool]]:
        return record_lengths(self.records, self.num_image_tokens)

    @property
    def lengths(self) -> list[int]:
        """Estimated length of every record (words + image tokens), for length-grouped batching."""
        return self._lengths_and_modalities[0]

    @property
    def has_image(self) -> list[bool]:
        """Whether each record has an image, for batching by modality."""
        return self._lengths_and_modalities[1]


@dataclass
class LlavaDataCollator:
    """Pads samples on the right into a batch: pad id, -100 labels, a 0/1 attention mask.

    `pixel_values` stacks the images of the samples that have one, in batch order (text-only
    samples contribute none; the image tokens in `input_ids` say which rows they belong to), and
    is left out when no sample in the batch has an image.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("The collator needs a pad token id; give the tokenizer a pad token (e.g. '<pad>').")

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of samples.")
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = feature["input_ids"]
            labels[row, :length] = feature["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [feature["pixel_values"] for feature in features if "pixel_values" in feature]
        if images:
            batch["pixel_values"] = torch.stack(images)  # (images in batch, 3, S, S)
        return batch
