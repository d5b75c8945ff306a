"""MMBench: the official TSV, LLaVA's prompts, circular evaluation and the submission file.

Each question with k options is asked k times ("rounds"): round r shows the option contents rotated
left by r while the letters A, B, ... stay in place, as LLaVA's `model_vqa_mmbench.py --all-rounds`
does. A question counts as correct under circular evaluation only if every round is answered with
the letter that now holds the right content. Some released TSVs already contain the rotated copies as
rows of their own (index + k * 1,000,000, VLMEvalKit's layout); those are read row by row and grouped
by index modulo 1,000,000 instead of being rotated again.

Answers are extracted from free text by rules only (no LLM judge): a bare letter, "B.", "(B)",
"B) ...", "The answer is B", or the text of exactly one option. Anything ambiguous stays unmatched
and counts as wrong.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image
from transformers.utils import logging

from ..file_writing import atomic_output
from .answer_request import LIKELIHOOD_TARGETS, AnswerRequest
from .local_datasets import dataset_image, load_local_dataset, require_columns

logger = logging.get_logger(__name__)

OPTION_LETTERS = ("A", "B", "C", "D")
ANSWER_INSTRUCTIONS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
KEY_FIELDS = ("question_id", "round_id")
CIRCULAR_COPY_OFFSET = 1_000_000
# Columns LLaVA's convert_mmbench_for_submission.py drops, and where it puts the prediction column.
SUBMISSION_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
SUBMISSION_PREDICTION_POSITION = 6
SHOWN_PROBLEMS = 5
DATASET_IMAGE_MARKER = "<image in the dataset>"


def is_missing(value) -> bool:
    """LLaVA's notion of an absent cell: None, NaN, or the strings "nan" / "none" in any case."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


@dataclass(frozen=True)
class MMBenchItem:
    """One round of one question, as shown to the model."""

    question_id: int
    round_id: int
    group_id: int
    is_original: bool
    question: str
    hint: str | None
    options: tuple[str, ...]
    option_char: tuple[str, ...]
    answer: str | None
    category: str | None
    l2_category: str | None
    image_row: int

    @property
    def key(self) -> tuple:
        return (self.question_id, self.round_id)

    @property
    def prompt(self) -> str:
        """LLaVA's cur_prompt: the hint, the question, then one line per option."""
        text = self.question if self.hint is None else f"{self.hint}\n{self.question}"
        for letter, option in zip(OPTION_LETTERS, self.options):
            text += f"\n{letter}. {option}"
        return text


@dataclass
class MMBenchTable:
    """The questions as text columns, and the lines the parser had to skip.

    From a TSV, `frame["image"]` holds the base64 images; from a `datasets` dataset (lmms-lab/MMBench),
    `images` is the dataset, decoded a row at a time, and `frame["image"]` only marks the rows that have one.
    """

    frame: pd.DataFrame
    bad_lines: list[str] = field(default_factory=list)
    images: object | None = None

    @property
    def has_answers(self) -> bool:
        return "answer" in self.frame.columns and bool(self.frame["answer"].notna().any())

    def load_image(self, position: int) -> Image.Image:
        if self.images is not None:
            return dataset_image(self.images, position, "image")
        return decode_row_image(self.frame, position)


def read_mmbench_table(path: str | os.PathLike) -> MMBenchTable:
    """Read the TSV as text columns; lines with too many fields are skipped and listed, not fatal."""
    if not Path(path).is_file():
        raise ValueError(f"MMBench question file {path} does not exist.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(path, sep="\t", dtype=str, on_bad_lines="warn")
    bad_lines = []
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):
            bad_lines.extend(line for line in str(warning.message).splitlines() if line.strip())
    required = {"index", "question", "A", "B"}
    absent = required - set(frame.columns)
    if absent:
        raise ValueError(f"{path} is not an MMBench TSV: column(s) {sorted(absent)} are missing.")
    return MMBenchTable(frame=frame, bad_lines=bad_lines)


def read_mmbench_dataset(dataset_path: str | os.PathLike, split: str = "dev") -> MMBenchTable:
    """lmms-lab/MMBench's schema from a local parquet / `save_to_disk` copy, as the TSV would read."""
    return mmbench_table_from_dataset(load_local_dataset(dataset_path, split), dataset_path)


def mmbench_table_from_dataset(dataset, source="the dataset") -> MMBenchTable:
    """A `datasets` split in lmms-lab/MMBench's schema as our TSV reader's table.

    Its columns are the TSV's (index, question, hint, A-D, answer, category, image, ...) with the image
    as an image feature and "L2-category" capitalised; cells are read as text, empty ones as None.
    """
    require_columns(dataset, ["index", "question", "A", "B", "image"], source,
                    "MMBench needs index, question, options A, B (C, D optional) and image columns.")
    frame = dataset.remove_columns(["image"]).to_pandas().rename(columns={"L2-category": "l2-category"})
    frame = frame.astype(object).map(lambda value: None if is_missing(value) else str(value))
    # The images stay in the dataset; a placeholder tells row_problem every row has one (a broken one is
    # reported, with its row, when its question comes up).
    frame["image"] = DATASET_IMAGE_MARKER
    return MMBenchTable(frame=frame, images=dataset)


def present_options(row) -> list[str]:
    """Options A, B, ... up to the first empty one (LLaVA stops there)."""
    options = []
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        if is_missing(value):
            break
        options.append(str(value))
    return options


def parse_index(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"index {value!r} is not an integer")
    return int(number)


def row_problem(row, options: list[str]) -> str | None:
    """Why a TSV row cannot be asked, or None if it can."""
    if is_missing(row.get("question")):
        return "no question text"
    if len(options) < 2:
        return f"only {len(options)} option(s)"
    if is_missing(row.get("image")):
        return "no image"
    answer = row.get("answer")
    if not is_missing(answer) and str(answer).strip() not in OPTION_LETTERS[: len(options)]:
        return f"answer {answer!r} is not one of the options {''.join(OPTION_LETTERS[:len(options)])}"
    return None


def rounds_of_row(row, position: int, options: list[str], mode: str) -> list[MMBenchItem]:
    """The items one TSV row contributes: k rotations ("rotate"), or the row itself ("rows")."""
    index = parse_index(row["index"])
    letters = OPTION_LETTERS[: len(options)]
    answer = None if is_missing(row.get("answer")) else str(row["answer"]).strip()
    common = {
        "question_id": index,
        "question": str(row["question"]),
        "hint": None if is_missing(row.get("hint")) else str(row["hint"]),
        "category": None if is_missing(row.get("category")) else str(row["category"]),
        "l2_category": None if is_missing(row.get("l2-category")) else str(row["l2-category"]),
        "image_row": position,
    }
    if mode == "rows":
        return [
            MMBenchItem(
                round_id=0, group_id=index % CIRCULAR_COPY_OFFSET, is_original=index < CIRCULAR_COPY_OFFSET,
                options=tuple(options), option_char=letters, answer=answer, **common,
            )
        ]
    items = []
    count = len(options)
    for shift in range(count):
        # Round `shift` shows original option (j + shift) % count under letter j.
        shown_answer = None if answer is None else letters[(letters.index(answer) - shift) % count]
        items.append(
            MMBenchItem(
                round_id=shift, group_id=index, is_original=shift == 0,
                options=tuple(options[shift:] + options[:shift]), option_char=letters[shift:] + letters[:shift],
                answer=shown_answer, **common,
            )
        )
    return items


def resolve_rounds_mode(frame: pd.DataFrame, rounds: str) -> str:
    """"auto" reads rows as rounds when the TSV already holds circular copies (indices past 1,000,000)."""
    if rounds not in ("auto", "rotate", "rows"):
        raise ValueError(f"rounds must be 'auto', 'rotate' or 'rows', got {rounds!r}.")
    if rounds != "auto":
        return rounds
    indices = pd.to_numeric(frame["index"], errors="coerce")
    return "rows" if bool((indices >= CIRCULAR_COPY_OFFSET).any()) else "rotate"


def load_mmbench_items(table: MMBenchTable, rounds: str = "auto") -> tuple[list[MMBenchItem], list[tuple[str, str]]]:
    """Every round of every usable question, in TSV order, and the (row, reason) pairs that were skipped."""
    mode = resolve_rounds_mode(table.frame, rounds)
    items, skipped = [], [(line, "malformed TSV line") for line in table.bad_lines]
    seen_ids = set()
    for position, row in enumerate(table.frame.to_dict("records")):
        where = f"row {position} (index {row.get('index')})"
        options = present_options(row)
        try:
            problem = row_problem(row, options)
            if problem is None and parse_index(row["index"]) in seen_ids:
                problem = "duplicate index"
        except (TypeError, ValueError) as error:
            problem = f"unreadable index ({error})"
        if problem is not None:
            skipped.append((where, problem))
            continue
        seen_ids.add(parse_index(row["index"]))
        items.extend(rounds_of_row(row, position, options, mode))
    for where, reason in skipped[:SHOWN_PROBLEMS]:
        logger.warning(f"Skipping MMBench {where}: {reason}")
    if skipped:
        logger.warning(f"{len(skipped)} MMBench row(s) skipped in total; the other questions go on.")
    return items, skipped


def decode_row_image(frame: pd.DataFrame, position: int) -> Image.Image:
    """The row's base64 image; a short all-digit cell names the index of the row that holds the image."""
    value = str(frame["image"].iat[position])
    if value.isdigit() and len(value) <= 64:
        matches = frame.index[frame["index"] == value]
        if len(matches) == 0:
            raise ValueError(f"image refers to index {value}, which is not in the TSV")
        value = str(frame["image"].loc[matches[0]])
    return Image.open(io.BytesIO(base64.b64decode(value, validate=True)))


def mmbench_requests(table: MMBenchTable, items: Sequence[MMBenchItem], lang: str = "en",
                     likelihood_target: str = "option") -> list[AnswerRequest]:
    """One request per round; its choices, for answering by likelihood, are the options' texts or their letters."""
    if lang not in ANSWER_INSTRUCTIONS:
        raise ValueError(f"lang must be one of {', '.join(ANSWER_INSTRUCTIONS)}, got {lang!r}.")
    if likelihood_target not in LIKELIHOOD_TARGETS:
        raise ValueError(f"likelihood_target must be one of {', '.join(LIKELIHOOD_TARGETS)}, got {likelihood_target!r}.")
    requests = []
    for item in items:
        record = {
            "question_id": item.question_id,
            "round_id": item.round_id,
            "prompt": item.prompt,
            "options": list(item.options),
            "option_char": list(item.option_char),
        }
        requests.append(
            AnswerRequest(
                key=item.key,
                question=f"{item.prompt}\n{ANSWER_INSTRUCTIONS[lang]}",
                load_image=partial(table.load_image, item.image_row),
                record=record,
                choices=item.options if likelihood_target == "option" else OPTION_LETTERS[: len(item.options)],
            )
        )
    return requests


PUNCTUATION_AROUND_LETTERS = str.maketrans({character: " " for character in ".()[],:;!*#{}"})


def explicit_letter(text: str, letters: Sequence[str]) -> str | None:
    """A letter the text states outright: "B", "B.", "(B)", "B) dog", "B: dog", "The answer is B", "Option B"."""
    allowed = "".join(letters)
    patterns = (
        rf"^\(?([{allowed}])\)?[.:)]?$",
        rf"^\(?([{allowed}])[.:)]\s",
        rf"(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*)\(?([{allowed}])\b",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def single_letter_token(text: str, letters: Sequence[str]) -> str | None:
    """The one option letter standing alone among the words, VLMEvalKit-style.

    A lone "A" in a longer sentence is more likely the article than a choice, so it is not trusted.
    """
    tokens = text.translate(PUNCTUATION_AROUND_LETTERS).split()
    found = [letter for letter in letters if letter in tokens]
    if len(found) != 1 or (found[0] == "A" and len(tokens) > 3):
        return None
    return found[0]


def option_by_text(text: str, options: Sequence[str], letters: Sequence[str]) -> str | None:
    """The option whose text the answer is, or the only option whose text the answer contains."""
    answer = text.strip().rstrip(".").strip().lower()
    normalized = [str(option).strip().rstrip(".").strip().lower() for option in options]
    exact = [letter for letter, option in zip(letters, normalized) if option and option == answer]
    if len(exact) == 1:
        return exact[0]
    contained = [letter for letter, option in zip(letters, normalized) if option and option in answer]
    return contained[0] if len(contained) == 1 else None


def extract_option_letter(prediction: str | None, options: Sequence[str]) -> str | None:
    """The option letter a free-text prediction chose, or None when it names none or several."""
    if not isinstance(prediction, str) or not prediction.strip():
        return None
    text = prediction.strip()
    letters = OPTION_LETTERS[: len(options)]
    return explicit_letter(text, letters) or single_letter_token(text, letters) or option_by_text(text, options, letters)


@dataclass
class Tally:
    correct: int = 0
    total: int = 0

    def add(self, hit: bool) -> None:
        self.correct += int(hit)
        self.total += 1

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


@dataclass
class MMBenchScore:
    """Circular and vanilla accuracy (percent), overall and per category, and what did not count.

    Each category also tallies (as "no_option") how often its original-round prediction named no
    option at all: a model that reads but misreads ("SUM" for "SUN") scores the same as one that
    picks a wrong option, and this tells the two apart.
    """

    circular: Tally
    vanilla: Tally
    per_category: dict[str, dict[str, Tally]]
    per_l2_category: dict[str, dict[str, Tally]]
    rounds_scored: int = 0
    unparsed_predictions: int = 0
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    incomplete_questions: list[int] = field(default_factory=list)
    unanswered_questions: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.circular.accuracy

    def report(self) -> str:
        lines = [
            f"Questions: {self.circular.total} (circular), {self.vanilla.total} (vanilla)",
            f"Circular accuracy: {self.circular.accuracy:.2f}%",
            f"Vanilla accuracy: {self.vanilla.accuracy:.2f}%",
        ]
        for title, table in (("category", self.per_category), ("l2-category", self.per_l2_category)):
            lines += ["", f"| {title} | circular | vanilla | no option named (vanilla) | questions |",
                      "|---|---:|---:|---:|---:|"]
            for name, tallies in sorted(table.items()):
                lines.append(
                    f"| {name} | {tallies['circular'].accuracy:.2f} | {tallies['vanilla'].accuracy:.2f} "
                    f"| {tallies['no_option'].accuracy:.2f} | {tallies['circular'].total} |"
                )
        return "\n".join(lines) + "\n"

    def to_metrics(self) -> dict:
        def breakdown(table):
            return {
                name: {
                    "circular_accuracy": tallies["circular"].accuracy,
                    "vanilla_accuracy": tallies["vanilla"].accuracy,
                    "questions": tallies["circular"].total,
                    "circular_correct": tallies["circular"].correct,
                    "vanilla_correct": tallies["vanilla"].correct,
                    "vanilla_no_option_percent": tallies["no_option"].accuracy,
                }
                for name, tallies in sorted(table.items())
            }

        return {
            "benchmark": "mmbench",
            "accuracy": self.accuracy,
            "circular_accuracy": self.circular.accuracy,
            "vanilla_accuracy": self.vanilla.accuracy,
            "samples": self.circular.total,
            "vanilla_samples": self.vanilla.total,
            "rounds_scored": self.rounds_scored,
            "unparsed_predictions": self.unparsed_predictions,
            "unmatched_results": len(self.unmatched),
            "unmatched_examples": [{"key": key, "reason": reason} for key, reason in self.unmatched[:20]],
            "incomplete_questions": len(self.incomplete_questions),
            "incomplete_examples": self.incomplete_questions[:20],
            "unanswered_questions": len(self.unanswered_questions),
            "unanswered_examples": self.unanswered_questions[:20],
            "per_category": breakdown(self.per_category),
            "per_l2_category": breakdown(self.per_l2_category),
        }


def match_records(records: Iterable[dict], items: Sequence[MMBenchItem]):
    """item key -> its first answer record, and the records no item claims."""
    by_key = {item.key: item for item in items}
    answers, unmatched = {}, []
    for record in records:
        key = (record.get("question_id"), record.get("round_id", 0))
        if key not in by_key:
            unmatched.append((str(key), "no such question/round in the TSV"))
        elif key in answers:
            unmatched.append((str(key), "duplicate answer (the first one is scored)"))
        else:
            answers[key] = record
    return answers, unmatched


def score_mmbench(records: Iterable[dict], items: Sequence[MMBenchItem]) -> MMBenchScore:
    """Vanilla (original round only) and circular (all rounds right) accuracy of answer records."""
    if any(item.answer is None for item in items):
        raise ValueError("This MMBench TSV has no answers (test split); write a submission file instead of scoring.")
    answers, unmatched = match_records(records, items)
    groups: dict[int, list[MMBenchItem]] = {}
    for item in items:
        groups.setdefault(item.group_id, []).append(item)
    score = MMBenchScore(circular=Tally(), vanilla=Tally(), per_category={}, per_l2_category={}, unmatched=unmatched)
    for group_id, rounds in groups.items():
        hits, letters = {}, {}
        for item in rounds:
            if item.key in answers:
                letters[item.key] = extract_option_letter(answers[item.key].get("text"), item.options)
                score.unparsed_predictions += letters[item.key] is None
                score.rounds_scored += 1
                hits[item.key] = letters[item.key] == item.answer
        original = next((item for item in rounds if item.is_original), rounds[0])
        tallies = [
            table.setdefault(name or "unknown", {"circular": Tally(), "vanilla": Tally(), "no_option": Tally()})
            for table, name in ((score.per_category, original.category), (score.per_l2_category, original.l2_category))
        ]
        if original.key in hits:
            score.vanilla.add(hits[original.key])
            for tally in tallies:
                tally["vanilla"].add(hits[original.key])
                tally["no_option"].add(letters[original.key] is None)
        if len(hits) < len(rounds):
            (score.incomplete_questions if hits else score.unanswered_questions).append(group_id)
            continue
        correct = all(hits.values())
        score.circular.add(correct)
        for tally in tallies:
            tally["circular"].add(correct)
    if unmatched:
        logger.warning(
            f"{len(unmatched)} answer(s) match no question of the TSV and are left out; first: "
            + "; ".join(f"{key} ({reason})" for key, reason in unmatched[:SHOWN_PROBLEMS])
        )
    if score.unanswered_questions:
        logger.warning(
            f"{len(score.unanswered_questions)} question(s) have no answer at all and are left out; first: "
            f"{score.unanswered_questions[:SHOWN_PROBLEMS]}"
        )
    if score.incomplete_questions:
        logger.warning(
            f"{len(score.incomplete_questions)} question(s) lack some rounds and are left out of the circular "
            f"accuracy; first: {score.incomplete_questions[:SHOWN_PROBLEMS]}"
        )
    return score


def submission_frame(table: MMBenchTable, records: Iterable[dict], items: Sequence[MMBenchItem]) -> pd.DataFrame:
    """LLaVA's upload table: the TSV minus hint/category/source/image/comment/l2-category, plus "prediction".

    The prediction of a question is the raw answer text of its original round (for rotated rounds the
    letters of later rounds refer to rotated options, which the server does not know about).
    """
    originals = {item.question_id: item for item in items if item.round_id == 0}
    predictions = {}
    for record in records:
        question_id = record.get("question_id")
        if question_id in originals and record.get("round_id", 0) == 0 and question_id not in predictions:
            predictions[question_id] = record.get("text")
    frame = table.frame.drop(columns=[name for name in SUBMISSION_DROPPED_COLUMNS if name in table.frame.columns])
    indices = pd.to_numeric(frame["index"], errors="coerce")
    column = [predictions.get(int(index)) if not math.isnan(index) else None for index in indices]
    frame.insert(min(SUBMISSION_PREDICTION_POSITION, len(frame.columns)), "prediction", column)
    return frame


def write_submission(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the xlsx through a temporary file so an interrupted write never leaves a broken upload."""
    with atomic_output(path, suffix=".xlsx") as temporary:
        frame.to_excel(temporary, index=False, engine="openpyxl")
