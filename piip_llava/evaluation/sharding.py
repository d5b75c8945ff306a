"""Splitting a benchmark over processes and merging the per-shard answer files back.

Shards are contiguous chunks of ceil(n / shards) questions, as LLaVA's `--num-chunks/--chunk-idx`
cut them. Each shard writes its own answer file and, when it has gone through all its questions, a
small `.done` marker; the merge puts the records back into the original question order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from .answers_file import atomic_write_json, atomic_write_text, order_like_requests, read_answers, records_to_jsonl

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def is_whole(self) -> bool:
        return self.count == 1


def resolve_shard(num_shards: int | None, shard_index: int | None) -> Shard:
    """The shard this process works on: explicit flags first, then torchrun/accelerate's RANK and WORLD_SIZE."""
    if num_shards is None and shard_index is None:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
        shard_index = int(os.environ.get("RANK", "0"))
    elif num_shards is None or shard_index is None:
        raise ValueError("Give both --num-shards and --shard-index, or neither (to use RANK/WORLD_SIZE).")
    if num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards - 1}], got {shard_index}.")
    return Shard(index=shard_index, count=num_shards)


def shard_items(items: Sequence, shard: Shard) -> list:
    """This shard's contiguous chunk of `items` (possibly empty when there are more shards than items)."""
    chunk = math.ceil(len(items) / shard.count) if items else 0
    return list(items[shard.index * chunk : (shard.index + 1) * chunk])


def shard_answers_path(answers_path: str | os.PathLike, shard: Shard) -> Path:
    """Where a shard writes: `answers.jsonl` becomes `answers.shard-2-of-4.jsonl`; a whole run writes `answers.jsonl`."""
    answers_path = Path(answers_path)
    if shard.is_whole:
        return answers_path
    return answers_path.with_name(f"{answers_path.stem}.shard-{shard.index}-of-{shard.count}{answers_path.suffix}")


def done_marker_path(shard_path: str | os.PathLike) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_name(shard_path.name + ".done")


def mark_shard_done(shard_path: str | os.PathLike, summary: dict) -> None:
    atomic_write_json(done_marker_path(shard_path), summary)


def clear_shard_done(shard_path: str | os.PathLike) -> None:
    done_marker_path(shard_path).unlink(missing_ok=True)


def all_shards_done(answers_path: str | os.PathLike, count: int) -> bool:
    return all(done_marker_path(shard_answers_path(answers_path, Shard(index, count))).exists() for index in range(count))


def read_done_markers(answers_path: str | os.PathLike, count: int) -> list[dict]:
    """The summaries the shards left in their markers (skipped questions and counts)."""
    summaries = []
    for index in range(count):
        marker = done_marker_path(shard_answers_path(answers_path, Shard(index, count)))
        if marker.exists():
            summaries.append(json.loads(marker.read_text(encoding="utf-8")))
    return summaries


def merge_shards(
    answers_path: str | os.PathLike, count: int, request_keys: Sequence[tuple], key_fields: Sequence[str]
) -> int:
    """Write the merged answer file in question order; returns how many records it holds."""
    records = []
    for index in range(count):
        shard_path = shard_answers_path(answers_path, Shard(index, count))
        if not shard_path.exists():
            logger.warning(f"Shard file {shard_path} is missing; its questions will be absent from the merge.")
            continue
        content = read_answers(shard_path)
        if content.truncated_tail or content.corrupt_lines:
            logger.warning(f"{shard_path}: skipping incomplete lines (rerun that shard to answer them again).")
        records.extend(content.records)
    ordered = order_like_requests(records, request_keys, key_fields)
    atomic_write_text(answers_path, records_to_jsonl(ordered))
    logger.info(f"Merged {count} shards into {answers_path}: {len(ordered)} answers.")
    return len(ordered)
