"""LLaVA-format training records: loading, validation and image loading.

A record is `{"id", "image" (optional), "conversations": [{"from": "human" | "gpt", "value": str}, ...]}`
with "<image>" in the first human turn when there is an image (LLaVA's data format). Records come
from a JSON list, a JSONL file, a Python list or a `datasets.Dataset`; the dataset reads them one at
a time, so a 665K-sample file is parsed once and no image is opened before it is needed.

Whatever is wrong with one record is reported as a `SkippedSample` with a short reason, so the
dataset can count it and move on instead of stopping a training run.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..conversation import IMAGE_PLACEHOLDER
from ..images import UnreadableImageError, read_image

# Reasons a sample is skipped; the keys of `LlavaSupervisedDataset.skipped_summary()`.
MALFORMED_RECORD = "malformed_record"
EMPTY_CONVERSATION = "empty_conversation"
BAD_ROLES = "bad_roles"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_LONG = "too_long"
NO_SUPERVISED_TOKENS = "no_supervised_tokens"

SPEAKER_ROLES = {"human": "user", "gpt": "assistant"}


class SkippedSample(Exception):
    """A record that cannot become a training sample; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_llava_records(source) -> Sequence[dict]:
    """Records from a .json / .jsonl path, a list of dicts or a `datasets.Dataset` (kept as is).

    A `datasets.Dataset` is not converted: indexing it reads one row, and an image column of the
    `Image` feature type is only decoded for the row being read. A source without a single record
    is refused: training on it would run 0 steps and still write a model.
    """
    if isinstance(source, (str, os.PathLike)):
        records = read_records_file(Path(source))
        where = f"Training data file {source}"
    elif isinstance(source, list):
        records, where = source, "The list of training records"
    elif is_hf_dataset(source):
        if "conversations" not in source.column_names:
            raise ValueError(f"The dataset has no 'conversations' column; its columns are {source.column_names}.")
        records, where = source, "The training dataset"
    else:
        raise ValueError(
            f"Training records must be a path to a .json/.jsonl file, a list of dicts or a datasets.Dataset, "
            f"got {type(source).__name__}."
        )
    if len(records) == 0:
        raise ValueError(f"{where} holds no training records; there is nothing to train on.")
    return records


def read_records_file(path: Path) -> list:
    """The records of a .json list or a .jsonl file; an empty, truncated or malformed file is named in the error."""
    if not path.is_file():
        raise ValueError(f"Training data file {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"Training data file {path} is empty.")
    if path.suffix == ".jsonl":
        return [parse_json(line, path, line_number) for line_number, line in enumerate(text.splitlines(), start=1)
                if line.strip()]
    records = parse_json(text, path)
    if not isinstance(records, list):
        raise ValueError(  # noqa: TRY004 (the file is wrong, not the caller)
            f"{path} must hold a JSON list of records (or one record per line with a .jsonl suffix), "
            f"not a JSON {type(records).__name__}."
        )
    return records


def parse_json(text: str, path: Path, line_number: int | None = None) -> Any:
    """`json.loads(text)`, or a ValueError naming the file, the line and what is wrong (e.g. a truncated file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = error.lineno if line_number is None else line_number
        ends_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated")
        where = f"{error.msg.removesuffix(' at')} at line {line}, column {error.colno}"
        ending = " (the text ends too early: is the file truncated?)" if ends_early else ""
        raise ValueError(
            f"Training data file {path} is not valid JSON ({where}){ending}."
        ) from None


def is_hf_dataset(source) -> bool:
    try:
        from datasets import Dataset
    except ImportError:
        return False
    return isinstance(source, Dataset)


def record_has_image(record: dict) -> bool:
    return isinstance(record, dict) and record.get("image") is not None


def record_conversation_messages(record: dict) -> list[dict]:
    """The record's turns as `{"role", "content"}` messages, checked for what a sample needs.

    Turns must alternate human/gpt starting with a human turn and end with a gpt reply (a trailing
    question would be trained on nothing), and the image placeholder must appear exactly once, in
    the first human turn, exactly when the record has an image.
    """
    if not isinstance(record, dict):
        raise SkippedSample(MALFORMED_RECORD, f"a record must be a dict, got {type(record).__name__}")
    conversations = record.get("conversations")
    if conversations is None or (isinstance(conversations, list) and not conversations):
        raise SkippedSample(EMPTY_CONVERSATION, "the record has no conversation turns")
    if not isinstance(conversations, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in conversations
    ):
        raise SkippedSample(MALFORMED_RECORD, "'conversations' must be a list of {'from', 'value': str} turns")
    messages = []
    for position, turn in enumerate(conversations):
        role = SPEAKER_ROLES.get(turn.get("from"))
        if role is None:
            raise SkippedSample(BAD_ROLES, f"turn {position} is from {turn.get('from')!r}; expected 'human' or 'gpt'")
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise SkippedSample(BAD_ROLES, f"turn {position} is a {role} turn where a {expected} turn was expected")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise SkippedSample(BAD_ROLES, "the conversation ends with an unanswered human turn")
    check_image_placeholders(messages, record_has_image(record))
    return messages


def check_image_placeholders(messages: list[dict], has_image: bool) -> None:
    counts = [message["content"].count(IMAGE_PLACEHOLDER) for message in messages]
    if has_image and (counts[0] != 1 or sum(counts) != 1):
        raise SkippedSample(
            IMAGE_PLACEHOLDER_MISMATCH,
            f"a record with an image needs exactly one {IMAGE_PLACEHOLDER} in its first human turn, "
            f"found {counts[0]} there and {sum(counts)} in all",
        )
    if not has_image and sum(counts):
        raise SkippedSample(
            IMAGE_PLACEHOLDER_MISMATCH, f"{IMAGE_PLACEHOLDER} appears {sum(counts)} time(s) but the record has no image"
        )


def move_image_placeholder_first(messages: list[dict]) -> list[dict]:
    """The first turn rewritten as "<image>\\n" + its text, as LLaVA's `preprocess_multimodal` does.

    Wherever the annotators put the placeholder, the model always sees the image first; the
    inference processor's chat template puts it there too.
    """
    first = messages[0]["content"]
    if IMAGE_PLACEHOLDER not in first:
        return messages
    text = first.replace(IMAGE_PLACEHOLDER, "").strip()
    return [{**messages[0], "content": (IMAGE_PLACEHOLDER + "\n" + text).strip()}, *messages[1:]]


def estimate_length(conversations: Any, has_image: bool, num_image_tokens: int) -> int:
    """A cheap length for length-grouped batching: words in all turns plus the image tokens.

    This is LLaVA's `modality_lengths` estimate; it needs no tokenizer and no image, so it can be
    computed for every record up front. Malformed conversations count as zero words.
    """
    turns = conversations if isinstance(conversations, list) else []
    return sum(turn_word_count(turn) for turn in turns) + (num_image_tokens if has_image else 0)


def turn_word_count(turn: Any) -> int:
    value = turn.get("value") if isinstance(turn, dict) else None
    return len(value.split()) if isinstance(value, str) else 0


def record_lengths(records: Sequence[dict], num_image_tokens: int) -> tuple[list[int], list[bool]]:
    """(estimated length, has image) for every record, without opening or decoding any image."""
    if is_hf_dataset(records):
        columns = ["conversations"] + (["image"] if "image" in records.column_names else [])
        table = records.select_columns(columns).with_format("arrow")[:]
        conversations = table.column("conversations").to_pylist()
        if "image" in columns:
            has_image = [not missing for missing in table.column("image").is_null().to_pylist()]
        else:
            has_image = [False] * len(conversations)
    else:
        conversations = [record.get("conversations") if isinstance(record, dict) else None for record in records]
        has_image = [record_has_image(record) for record in records]
    lengths = [estimate_length(turns, image, num_image_tokens) for turns, image in zip(conversations, has_image)]
    return lengths, has_image


def load_rgb_image(image_ref, image_folder: str | os.PathLike | None) -> Image.Image:
    """The record's image, upright and RGB (`piip_llava.images.read_image`), from a path under `image_folder`,
    a PIL image or `{"bytes", "path"}`.

    The pixels are decoded here (not lazily by PIL later), so a truncated or corrupt file is
    reported as this sample's problem.
    """
    if isinstance(image_ref, Image.Image):
        source, name = image_ref, "<image>"
    elif isinstance(image_ref, dict) and image_ref.get("bytes") is not None:
        source, name = io.BytesIO(image_ref["bytes"]), "<image bytes>"
    else:
        relative = image_ref.get("path") if isinstance(image_ref, dict) else image_ref
        if not isinstance(relative, (str, os.PathLike)) or not str(relative):
            raise SkippedSample(MISSING_IMAGE, f"image reference {image_ref!r} is not a path")
        path = Path(image_folder, relative) if image_folder is not None else Path(relative)
        if not path.is_file():
            raise SkippedSample(MISSING_IMAGE, f"image file {path} does not exist")
        source, name = path, str(path)
    try:
        return read_image(source, name)
    except UnreadableImageError as error:
        raise SkippedSample(CORRUPT_IMAGE, str(error)) from error
