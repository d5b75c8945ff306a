"""Answer files: LLaVA's JSONL format, written so that a killed run loses at most one batch.

Records are appended and fsynced after every batch. A kill can still leave a half-written last line;
`read_answers` finds it, and `repair_answers_file` rewrites the file without it (atomically), so the
next run resumes from the last complete record. Results and metrics are always written through a
temporary file and `os.replace`, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from ..file_writing import atomic_write_text

logger = logging.get_logger(__name__)


@dataclass
class AnswersFileContent:
    """The complete records of an answer file, and what had to be dropped to read it."""

    records: list[dict] = field(default_factory=list)
    truncated_tail: bool = False
    corrupt_lines: list[int] = field(default_factory=list)


def read_answers(path: str | os.PathLike) -> AnswersFileContent:
    """Parse an answer file; a missing file reads as empty.

    An unparsable *last* line is what a kill mid-write leaves behind: it is reported as a truncated
    tail. An unparsable line elsewhere means the file was edited or corrupted: its line number is kept
    so callers can say so, and the line is skipped.
    """
    content = AnswersFileContent()
    path = Path(path)
    if not path.exists():
        return content
    lines = path.read_text(encoding="utf-8").split("\n")
    filled = [index for index, line in enumerate(lines) if line.strip()]
    last_line_index = filled[-1] if filled else -1
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            content.records.append(record)
        elif index == last_line_index:
            content.truncated_tail = True
        else:
            content.corrupt_lines.append(index + 1)
    return content


def atomic_write_json(path: str | os.PathLike, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def records_to_jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def repair_answers_file(path: str | os.PathLike) -> AnswersFileContent:
    """Read an answer file and, if a kill left a broken line, rewrite it with complete records only."""
    content = read_answers(path)
    if content.truncated_tail or content.corrupt_lines:
        logger.warning(
            f"{path}: dropping {int(content.truncated_tail) + len(content.corrupt_lines)} incomplete line(s) "
            f"(truncated last line: {content.truncated_tail}, corrupt lines: {content.corrupt_lines[:5]}); "
            "their questions will be answered again."
        )
        atomic_write_text(path, records_to_jsonl(content.records))
    return content


def append_answers(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Append records and force them to disk, so a kill after this call loses none of them."""
    if not records:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(records_to_jsonl(records))
        handle.flush()
        os.fsync(handle.fileno())


def record_key(record: dict, key_fields: Sequence[str]) -> tuple:
    """The identity of an answer record, e.g. (question_id, round_id); a missing field reads as None."""
    return tuple(record.get(name) for name in key_fields)


def order_like_requests(records: Iterable[dict], request_keys: Sequence[tuple], key_fields: Sequence[str]) -> list[dict]:
    """Records sorted into the order of `request_keys`; records for unknown keys go last, in their order.

    Keys may repeat (TextVQA has repeated image/question pairs), so records are matched to requests
    one for one, first come first served.
    """
    waiting: dict[tuple, list[dict]] = {}
    for record in records:
        waiting.setdefault(record_key(record, key_fields), []).append(record)
    ordered = []
    for key in request_keys:
        bucket = waiting.get(key)
        if bucket:
            ordered.append(bucket.pop(0))
    leftovers = [record for bucket in waiting.values() for record in bucket]
    return ordered + leftovers


def count_keys(records: Iterable[dict], key_fields: Sequence[str]) -> Counter:
    return Counter(record_key(record, key_fields) for record in records)
