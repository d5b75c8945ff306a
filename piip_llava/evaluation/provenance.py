"""What produced an answers file: recorded beside it, checked before a run resumes it.

Resuming matches answers to questions by key (question id and prompt, or question id and round),
which cannot tell answers of another model, another question file or other generation settings
from this run's own. So the first run writes `answers.jsonl.provenance.json` (the model directory
and its files' sizes and times, the question source and its SHA-256, the settings that change
answers) and every later run on the same answers file must match it, or is refused with the
differences listed: nothing is mixed and nothing already answered is thrown away.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .answers_file import atomic_write_json, read_answers

PROVENANCE_SUFFIX = ".provenance.json"
# Files of a model directory whose change means other weights: configs and every weight file.
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin")
HASH_CHUNK = 1 << 20


def provenance_path(answers_path: str | os.PathLike) -> Path:
    answers_path = Path(answers_path)
    return answers_path.with_name(answers_path.name + PROVENANCE_SUFFIX)


def sha256_of(paths: list[Path]) -> str:
    """SHA-256 of the files' names (relative to their common folder) and contents, in sorted order."""
    digest = hashlib.sha256()
    root = paths[0].parent if len(paths) == 1 else Path(os.path.commonpath(paths))
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def question_source(path: str | os.PathLike) -> dict:
    """A question file, or a local dataset folder, by absolute path and content hash."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    return {"path": str(path), "sha256": sha256_of(files) if files else None}


def model_identity(model_dir: str | os.PathLike) -> dict:
    """The model directory by absolute path, and its config and weight files by size and modification time.

    Weights are not hashed (a 7B checkpoint is 14 GB); a retrained model written over the same
    directory still changes the times, and a copied one counts as another model.
    """
    model_dir = Path(model_dir).resolve()
    files = sorted({path for pattern in MODEL_FILE_PATTERNS for path in model_dir.glob(pattern) if path.is_file()})
    return {
        "path": str(model_dir),
        "files": {path.name: {"bytes": path.stat().st_size, "modified_ns": path.stat().st_mtime_ns} for path in files},
    }


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: recorded -> current' for every leaf that differs (nested dicts are compared field by field)."""
    found = []
    for name in sorted(set(recorded) | set(current)):
        left, right = recorded.get(name), current.get(name)
        if isinstance(left, dict) and isinstance(right, dict):
            found += differences(left, right, f"{prefix}{name}.")
        elif left != right:
            found.append(f"{prefix}{name}: {left!r} -> {right!r}")
    return found


def check_or_record_provenance(answers_path: str | os.PathLike, provenance: dict) -> None:
    """Record `provenance` for a new answers file, or refuse to add to one another run produced.

    An answers file without a single complete record starts afresh. One with answers but no
    provenance (an older piip-llava, LLaVA's scripts) cannot be checked and is refused as well.
    """
    answers_path = Path(answers_path)
    recorded_path = provenance_path(answers_path)
    answers = read_answers(answers_path).records
    if not answers:
        atomic_write_json(recorded_path, provenance)
        return
    start_over = (f"write this run's answers to another --answers-file, or delete {answers_path} and "
                  f"{recorded_path.name} to start over.")
    if not recorded_path.is_file():
        raise ValueError(
            f"{answers_path} holds {len(answers)} answers but no record of what produced them ({recorded_path.name}), "
            f"so they cannot be resumed safely; {start_over}"
        )
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{recorded_path} is not valid JSON ({error}); {start_over}") from None
    changed = differences(recorded, provenance)
    if changed:
        raise ValueError(
            f"{answers_path} holds {len(answers)} answers from another run ({'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}); resuming would mix the two. Either {start_over}"
        )
