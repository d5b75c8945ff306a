"""TextVQA: questions in LLaVA's formats, and the official scoring of answer files.

Questions come from LLaVA's `llava_textvqa_val_v051_ocr.jsonl` (fields question_id, image, text;
the text already ends with the answer instruction) plus the TextVQA image folder, or from a local
`datasets` dataset with an image column. Scoring follows LLaVA's `eval_textvqa.py`: a result is
matched to an entry of `TextVQA_0.5.1_val.json` by (its question_id, the question recovered from its
prompt, lower-cased) against (annotation image_id, annotation question lower-cased) -- LLaVA's
question files carry the image id in `question_id` -- and scored with the VQA accuracy.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image
from transformers.utils import logging

from .answer_normalization import vqa_accuracy
from .answer_request import AnswerRequest
from .local_datasets import dataset_image, load_local_dataset, require_columns

logger = logging.get_logger(__name__)

ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
OCR_LINE_PREFIX = "Reference OCR token: "
# A TextVQA answer is identified by its question id and prompt: one image has several questions.
KEY_FIELDS = ("question_id", "prompt")
SHOWN_PROBLEMS = 5
DUPLICATE = "duplicate answer"


@dataclass
class LoadedQuestions:
    requests: list[AnswerRequest] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def with_answer_instruction(text: str) -> str:
    """The question text ending with LLaVA's short-answer instruction (added only if it is not there yet)."""
    if text.rstrip().endswith(ANSWER_INSTRUCTION):
        return text
    return f"{text}\n{ANSWER_INSTRUCTION}"


def open_image(path: Path) -> Image.Image:
    return Image.open(path)


def textvqa_request(question_id, text: str, load_image) -> AnswerRequest:
    prompt = with_answer_instruction(text)
    return AnswerRequest(
        key=(question_id, prompt),
        question=prompt,
        load_image=load_image,
        record={"question_id": question_id, "prompt": prompt},
    )


def questions_from_jsonl(question_file: str | os.PathLike, image_folder: str | os.PathLike) -> LoadedQuestions:
    """LLaVA's question JSONL; lines that are not JSON objects with question_id, image and text are skipped."""
    loaded = LoadedQuestions()
    image_folder = Path(image_folder)
    with open(question_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)
            except json.JSONDecodeError as error:
                loaded.skipped.append((f"line {line_number}", f"not valid JSON ({error.msg})"))
                continue
            missing = [name for name in ("question_id", "image", "text") if not isinstance(question, dict)
                       or question.get(name) is None]
            if missing:
                loaded.skipped.append((f"line {line_number}", f"missing field(s) {', '.join(missing)}"))
                continue
            load = partial(open_image, image_folder / question["image"])
            loaded.requests.append(textvqa_request(question["question_id"], question["text"], load))
    return loaded


def resolve_id_column(column_names: list[str], id_column: str | None) -> str:
    """The column written as question_id: LLaVA's scorer matches by image id, so "image_id" where there is one."""
    if id_column is not None:
        return id_column
    return "image_id" if "image_id" in column_names else "question_id"


def questions_from_dataset(
    dataset_path: str | os.PathLike, split: str = "train", id_column: str | None = None, image_column: str = "image"
) -> LoadedQuestions:
    """Questions from a local `datasets` dataset: an id column, an image column, and "text" or "question".

    lmms-lab/textvqa's schema (question_id, question, image_id, image, answers, ...) reads as it is:
    the image id becomes question_id, as in LLaVA's question file, so LLaVA's scorer matches the answers.
    """
    dataset = load_local_dataset(dataset_path, split)
    id_column = resolve_id_column(dataset.column_names, id_column)
    text_column = "text" if "text" in dataset.column_names else "question"
    require_columns(dataset, [id_column, image_column, text_column], dataset_path,
                    "TextVQA needs an id column, an image column and a 'text' or 'question' column.")
    loaded = LoadedQuestions()
    # Read the text columns without decoding any image.
    texts = dataset.select_columns([id_column, text_column])
    for row, entry in enumerate(texts):
        if entry[id_column] is None or not entry[text_column]:
            loaded.skipped.append((f"row {row}", f"missing {id_column} or {text_column}"))
            continue
        load = partial(dataset_image, dataset, row, image_column)
        loaded.requests.append(textvqa_request(entry[id_column], entry[text_column], load))
    return loaded


def annotations_from_dataset(dataset_path: str | os.PathLike, split: str = "train",
                             id_column: str | None = None) -> dict[tuple, list[str]]:
    """(id, lower-cased question) -> human answers, from a dataset with an "answers" column (lmms-lab/textvqa).

    The same keys as `load_annotations` reads from TextVQA_0.5.1_val.json, so answers score identically.
    """
    dataset = load_local_dataset(dataset_path, split)
    id_column = resolve_id_column(dataset.column_names, id_column)
    require_columns(dataset, [id_column, "question", "answers"], dataset_path,
                    "Scoring from a dataset needs its id, 'question' and 'answers' columns (lmms-lab/textvqa's schema).")
    annotations = {}
    for row, entry in enumerate(dataset.select_columns([id_column, "question", "answers"])):
        if entry[id_column] is None or not entry["question"] or not entry["answers"]:
            raise ValueError(f"Dataset {dataset_path}, row {row}: no {id_column}, question or answers to score with; "
                             "is this the test split?")
        annotations[(entry[id_column], entry["question"].lower())] = list(entry["answers"])
    return annotations


def load_textvqa_questions(
    question_file: str | None = None,
    image_folder: str | None = None,
    dataset_path: str | None = None,
    split: str = "train",
    id_column: str | None = None,
) -> LoadedQuestions:
    if (question_file is None) == (dataset_path is None):
        raise ValueError("Give exactly one question source: --question-file (with --image-folder) or --dataset.")
    if question_file is not None:
        if image_folder is None:
            raise ValueError("--question-file needs --image-folder (the TextVQA train_images folder).")
        if not Path(question_file).is_file():
            raise ValueError(f"TextVQA question file {question_file} does not exist.")
        loaded = questions_from_jsonl(question_file, image_folder)
    else:
        loaded = questions_from_dataset(dataset_path, split=split, id_column=id_column)
    for where, reason in loaded.skipped[:SHOWN_PROBLEMS]:
        logger.warning(f"Skipping TextVQA question at {where}: {reason}")
    if loaded.skipped:
        logger.warning(f"{len(loaded.skipped)} malformed TextVQA question(s) skipped in total.")
    return loaded


def question_from_prompt(prompt: str) -> str | None:
    """The question LLaVA's scorer recovers from an answer's prompt, lower-cased; None if the format is unknown.

    Recognised: BLIP-style "OCR tokens: ... Question: ... Short answer:", three lines with a
    "Reference OCR token: " line (the question is the first line, or the second when the OCR line
    comes first), and two lines (question, instruction).
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return match.group(1).lower() if match else None
    if OCR_LINE_PREFIX in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith(OCR_LINE_PREFIX.rstrip()) else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    return None


class TextVQAAnnotations(dict):
    """(image_id, lower-cased question) -> the human answers, and how many entries of the file share each key.

    A few image/question pairs appear more than once in TextVQA val; LLaVA's scorer scores each of
    their answers (against the last entry's answers), so up to that many answers count per key.
    """

    def __init__(self):
        super().__init__()
        self.entries: Counter = Counter()


def load_annotations(annotation_file: str | os.PathLike) -> TextVQAAnnotations:
    """The annotations of TextVQA_0.5.1_val.json, keyed as LLaVA's scorer matches results."""
    if not Path(annotation_file).is_file():
        raise ValueError(f"TextVQA annotation file {annotation_file} does not exist.")
    try:
        with open(annotation_file, encoding="utf-8") as handle:
            payload = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"TextVQA annotation file {annotation_file} is not valid JSON ({error}).") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(  # noqa: TRY004 (the file is wrong, not the caller)
            f"{annotation_file} is not a TextVQA annotation file: expected {{'data': [...]}}."
        )
    annotations = TextVQAAnnotations()
    for entry in payload["data"]:
        answers = entry.get("answers")
        if not answers:
            raise ValueError(f"Annotation for question {entry.get('question_id')} has no answers; is this the test split?")
        key = (entry["image_id"], entry["question"].lower())
        annotations[key] = answers
        annotations.entries[key] += 1
    return annotations


@dataclass
class TextVQAScore:
    """Accuracy in percent over the matched results, and everything that did not count."""

    accuracy: float
    samples: int
    empty_predictions: int = 0
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    annotations_without_result: int = 0

    def report(self) -> str:
        """LLaVA's two lines, then a line for each kind of result or annotation left out, if any."""
        text = f"Samples: {self.samples}\nAccuracy: {self.accuracy:.2f}%\n"
        duplicates = sum(reason.startswith(DUPLICATE) for _, reason in self.unmatched)
        if len(self.unmatched) > duplicates:
            text += f"Left out: {len(self.unmatched) - duplicates} result(s) matching no annotation\n"
        if duplicates:
            text += f"Left out: {duplicates} duplicate answer(s) to questions already answered\n"
        if self.annotations_without_result:
            text += (f"Missing: {self.annotations_without_result} annotated question(s) have no answer; the accuracy "
                     "is over the answered ones\n")
        return text

    def to_metrics(self) -> dict:
        return {
            "benchmark": "textvqa",
            "accuracy": self.accuracy,
            "samples": self.samples,
            "empty_predictions": self.empty_predictions,
            "unmatched_results": len(self.unmatched),
            "unmatched_examples": [{"question_id": qid, "reason": reason} for qid, reason in self.unmatched[:20]],
            "annotations_without_result": self.annotations_without_result,
        }


def score_textvqa(records: Iterable[dict], annotations: dict[tuple, list[str]]) -> TextVQAScore:
    """Score answer records; results the annotations lack are listed, never counted into the accuracy."""
    scores, unmatched, answered = [], [], Counter()
    empty = 0
    entries = annotations.entries if isinstance(annotations, TextVQAAnnotations) else Counter(dict.fromkeys(annotations, 1))
    for record in records:
        question_id = record.get("question_id")
        question = question_from_prompt(str(record.get("prompt", "")))
        if question is None:
            unmatched.append((str(question_id), "prompt is in none of the formats LLaVA's scorer reads"))
            continue
        key = (question_id, question)
        if key not in annotations:
            unmatched.append((str(question_id), f"no annotation for this image id and question {question!r}"))
            continue
        if answered[key] >= entries[key]:
            unmatched.append((str(question_id), f"{DUPLICATE} for question {question!r} (the first is scored)"))
            continue
        answered[key] += 1
        prediction = record.get("text")
        if not isinstance(prediction, str) or not prediction.strip():
            empty += 1
            prediction = ""
        scores.append(vqa_accuracy(prediction, annotations[key]))
    if unmatched:
        logger.warning(
            f"{len(unmatched)} result(s) are left out of the accuracy (no matching annotation, or a duplicate); first: "
            + "; ".join(f"{qid} ({reason})" for qid, reason in unmatched[:SHOWN_PROBLEMS])
        )
    if empty:
        logger.warning(f"{empty} empty prediction(s), scored 0.")
    missing = sum(max(entries[key] - answered[key], 0) for key in annotations)
    if missing:
        logger.warning(f"{missing} annotated question(s) have no answer and are left out of the accuracy.")
    accuracy = 100.0 * sum(scores) / len(scores) if scores else 0.0
    return TextVQAScore(
        accuracy=accuracy,
        samples=len(scores),
        empty_predictions=empty,
        unmatched=unmatched,
        annotations_without_result=missing,
    )
