"""Write a synthetic dataset: training records in LLaVA's formats and evaluation splits in the benchmarks' formats.

Layout of `out_dir`:
    images/                      train_000000.png ..., eval_000000.png ...
    pretrain.json                stage 1: one caption per training image (`plain` format records)
    finetune.json                stage 2: 1-3 question/answer turns per training image (LLaVA format)
    eval/textvqa_questions.jsonl LLaVA's TextVQA question file (question_id = image id, as LLaVA's is)
    eval/textvqa_annotations.json in TextVQA_0.5.1_val.json's format, the answer repeated 10 times
    eval/mmbench_dev.tsv         MMBench dev TSV: one multiple-choice question per evaluation image
    eval/question_types.json     TextVQA question_id -> question type (MMBench has a category column)
    eval/lmms-lab/textvqa/       with lmms_lab=True: the TextVQA split in lmms-lab/textvqa's schema (parquet)
    eval/lmms-lab/mmbench/       with lmms_lab=True: the MMBench split in lmms-lab/MMBench's schema (parquet)
    stats.json                   counts per question type, chance and majority-answer accuracies

Each image is drawn from its own seed, a string naming the dataset seed, the split and the index,
so the training and evaluation splits never share a random stream and any image can be rebuilt alone.
Each evaluation image gets one TextVQA question and one MMBench question; their types cycle through
QUESTION_TYPES (offset by three, so an image is never asked the same type twice) to keep the types
balanced, and text_small / text_large questions are asked about scenes drawn with that text size.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..conversation import IMAGE_PLACEHOLDER, VICUNA_SYSTEM, get_conversation_format
from ..evaluation.lmms_lab import (
    MMBENCH_SPLIT,
    TEXTVQA_SPLIT,
    mmbench_features,
    textvqa_features,
    write_parquet_split,
)
from .questions import (
    COUNT_QUESTION,
    L2_CATEGORIES,
    QUESTION_TYPES,
    TEXT_QUESTION,
    TEXT_QUESTION_TYPES,
    MultipleChoice,
    Question,
    all_questions,
    caption,
    caption_conversation,
    chance_accuracy,
    finetune_items,
    make_multiple_choice,
    qa_conversation,
    questions_of_type,
)
from .scenes import (
    DEFAULT_IMAGE_SIZE,
    PALETTE,
    SHAPE_KINDS,
    SHAPE_PLURALS,
    SHAPE_POSITIONS,
    WORDS,
    Scene,
    check_image_size,
    generate_scene,
    place_shape,
    place_text,
    render_scene,
)

TEXTVQA_ANSWER_COUNT = 10
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")
MMBENCH_OPTION_COUNT = 4
MAX_SCENE_ATTEMPTS = 1000
# Shifts the MMBench question type against the TextVQA one on the same image; 3 pairs text_small with
# shape and text_large with count, so the two never ask for different text sizes.
MMBENCH_TYPE_OFFSET = 3
EXAMPLE_SEED = 20240607


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image with its TextVQA question and its MMBench question."""

    image_id: str
    scene: Scene
    open_question: Question
    choice: MultipleChoice


def item_rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    """A random stream of its own for one item; string seeds are hashed with SHA-512, so stable across runs."""
    return random.Random(f"piip-llava-synthetic/{seed}/{split}/{index}/{purpose}")


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def png_bytes(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def train_records(seed: int, index: int, image_size: int) -> tuple[bytes, dict, dict, list]:
    """PNG bytes, the pretraining record, the instruction-tuning record and its question items."""
    name = image_id("train", index)
    scene = generate_scene(item_rng(seed, "train", index, "scene"), image_size=image_size)
    items = finetune_items(scene, item_rng(seed, "train", index, "questions"))
    pretrain = {"id": name, "image": f"{name}.png", "conversations": caption_conversation(scene)}
    finetune = {"id": name, "image": f"{name}.png", "conversations": qa_conversation(items)}
    return png_bytes(scene), pretrain, finetune, items


def eval_question_types(index: int) -> tuple[str, str]:
    """The TextVQA and MMBench question types asked about evaluation image `index`."""
    count = len(QUESTION_TYPES)
    return QUESTION_TYPES[index % count], QUESTION_TYPES[(index + MMBENCH_TYPE_OFFSET) % count]


def forced_text_size(question_types: tuple[str, ...]) -> str | None:
    """"small"/"large" when one of the types asks about text of that size, else None (random size)."""
    sizes = {question_type.removeprefix("text_") for question_type in question_types if question_type in
             TEXT_QUESTION_TYPES}
    if len(sizes) > 1:
        raise ValueError(f"Question types {question_types} ask about both text sizes on one image.")
    return sizes.pop() if sizes else None


def eval_item(seed: int, index: int, image_size: int) -> EvalItem:
    """Draw scenes until one can answer both of this image's question types, then pick the questions."""
    open_type, choice_type = eval_question_types(index)
    text_size = forced_text_size((open_type, choice_type))
    for attempt in range(MAX_SCENE_ATTEMPTS):
        rng = item_rng(seed, "eval", index, f"scene-{attempt}")
        scene = generate_scene(rng, image_size=image_size, text_size_class=text_size)
        open_candidates = questions_of_type(scene, open_type)
        choice_candidates = questions_of_type(scene, choice_type)
        if open_candidates and choice_candidates:
            break
    else:
        raise RuntimeError(f"No scene in {MAX_SCENE_ATTEMPTS} attempts answers {open_type} and {choice_type}.")
    rng = item_rng(seed, "eval", index, "questions")
    open_question = canonical_question(open_candidates, rng)
    choice = make_multiple_choice(canonical_question(choice_candidates, rng), rng, MMBENCH_OPTION_COUNT)
    return EvalItem(image_id=image_id("eval", index), scene=scene, open_question=open_question, choice=choice)


def canonical_question(candidates: list[Question], rng: random.Random) -> Question:
    """Evaluation asks "What is written in the image?" and "How many shapes are there?" (whose answers are
    spread evenly, unlike per-kind counts, which are mostly 1); other types pick a question at random."""
    canonical = [question for question in candidates if question.text in (TEXT_QUESTION, COUNT_QUESTION)]
    return canonical[0] if canonical else rng.choice(candidates)


def textvqa_question_line(item: EvalItem) -> dict:
    """A line of LLaVA's question file, without the "Reference OCR token" line (we have no OCR)."""
    return {"question_id": item.image_id, "image": f"{item.image_id}.png", "text": item.open_question.prompt}


def textvqa_annotation(item: EvalItem, question_number: int) -> dict:
    """An entry of TextVQA_0.5.1_val.json; the scorer matches it by (image_id, lower-cased question)."""
    question = item.open_question
    return {
        "question": question.text,
        "image_id": item.image_id,
        "image_classes": [],
        "flickr_original_url": "",
        "flickr_300k_url": "",
        "image_width": item.scene.image_size,
        "image_height": item.scene.image_size,
        "answers": [question.answer] * TEXTVQA_ANSWER_COUNT,
        "question_tokens": question.text.rstrip("?").lower().split(),
        "question_id": question_number,
        "set_name": "val",
    }


def mmbench_row(item: EvalItem, index: int, image_base64: str) -> dict:
    choice = item.choice
    options = dict(zip(("A", "B", "C", "D"), choice.options))
    return {
        "index": index,
        "question": choice.question.text,
        "hint": None,
        **{letter: options.get(letter) for letter in ("A", "B", "C", "D")},
        "answer": choice.answer,
        "category": choice.question_type,
        "l2-category": L2_CATEGORIES[choice.question_type],
        "image": image_base64,
    }


def lmms_lab_textvqa_row(annotation: dict, image: bytes) -> dict:
    """The annotation entry as a row of lmms-lab/textvqa: its fields, the image, and no OCR tokens (we have no OCR)."""
    return {**annotation, "image": {"bytes": image, "path": None}, "ocr_tokens": []}


def lmms_lab_mmbench_row(row: dict, image: bytes) -> dict:
    """The TSV row as a row of lmms-lab/MMBench: the image decoded, "L2-category" capitalised."""
    fields = {name: value for name, value in row.items() if name not in ("image", "l2-category")}
    return {**fields, "image": {"bytes": image, "path": None}, "L2-category": row["l2-category"],
            "source": "piip-llava synthetic", "comment": None, "split": MMBENCH_SPLIT}


def write_lmms_lab_splits(eval_dir: Path, textvqa_rows: list[dict], mmbench_rows: list[dict]) -> None:
    write_parquet_split(textvqa_rows, textvqa_features(), eval_dir / "lmms-lab" / "textvqa", TEXTVQA_SPLIT)
    write_parquet_split(mmbench_rows, mmbench_features(), eval_dir / "lmms-lab" / "mmbench", MMBENCH_SPLIT)


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")


def write_mmbench_tsv(path: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows, columns=list(MMBENCH_COLUMNS)).to_csv(path, sep="\t", index=False)


def majority_share(answers: list[str]) -> float:
    """Accuracy of always giving the most common answer: the bar a model must clear to show it looks."""
    if not answers:
        return 0.0
    return Counter(answers).most_common(1)[0][1] / len(answers)


def answers_by_type(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped = {question_type: [] for question_type in QUESTION_TYPES}
    for question_type, answer in pairs:
        grouped[question_type].append(answer)
    return grouped


def dataset_stats(seed: int, image_size: int, train_items: list[list], eval_items: list[EvalItem]) -> dict:
    """Counts per question type, and the accuracies of uniform guessing and of the majority answer."""
    turns = [item for items in train_items for item in items]
    open_answers = answers_by_type([(item.open_question.question_type, item.open_question.answer)
                                    for item in eval_items])
    choice_answers = answers_by_type([(item.choice.question_type, item.choice.answer) for item in eval_items])
    return {
        "seed": seed,
        "image_size": image_size,
        "train": {
            "images": len(train_items),
            "pretrain_records": len(train_items),
            "finetune_records": len(train_items),
            "finetune_turns": len(turns),
            "finetune_turns_per_type": dict(Counter(item.question_type for item in turns).most_common()),
            "multiple_choice_turns": sum(isinstance(item, MultipleChoice) for item in turns),
        },
        "eval": {
            "images": len(eval_items),
            "textvqa_questions": len(eval_items),
            "textvqa_questions_per_type": {kind: len(answers) for kind, answers in open_answers.items()},
            "mmbench_questions": len(eval_items),
            "mmbench_questions_per_category": {kind: len(answers) for kind, answers in choice_answers.items()},
        },
        "chance_accuracy": {
            "textvqa": {kind: chance_accuracy(kind) for kind in QUESTION_TYPES},
            "mmbench": {
                kind: {"vanilla": 1 / MMBENCH_OPTION_COUNT, "circular": (1 / MMBENCH_OPTION_COUNT) ** MMBENCH_OPTION_COUNT}
                for kind in QUESTION_TYPES
            },
        },
        "majority_answer_accuracy": {
            "textvqa": {kind: majority_share(answers) for kind, answers in open_answers.items()},
            "mmbench_vanilla": {kind: majority_share(answers) for kind, answers in choice_answers.items()},
        },
    }


def check_counts(num_train_images: int, num_eval_images: int) -> None:
    for name, value in (("num_train_images", num_train_images), ("num_eval_images", num_eval_images)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def export_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train_images: int = 400,
    num_eval_images: int = 120,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: bool = True,
    lmms_lab: bool = False,
) -> dict:
    """Write the training and evaluation splits under `out_dir` (see the module docstring); returns the stats.

    With `lmms_lab`, the evaluation splits are also written in lmms-lab's dataset schemas.
    """
    check_counts(num_train_images, num_eval_images)
    check_image_size(image_size)
    out_dir = Path(out_dir)
    image_dir, eval_dir = out_dir / "images", out_dir / "eval"
    image_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=num_train_images + num_eval_images, desc="synthetic images", unit="img", disable=not progress)

    pretrain, finetune, train_items = [], [], []
    for index in range(num_train_images):
        image, pretrain_record, finetune_record, items = train_records(seed, index, image_size)
        (image_dir / pretrain_record["image"]).write_bytes(image)
        pretrain.append(pretrain_record)
        finetune.append(finetune_record)
        train_items.append(items)
        bar.update()

    eval_items, question_lines, annotations, mmbench_rows = [], [], [], []
    lmms_lab_rows = {"textvqa": [], "mmbench": []}
    for index in range(num_eval_images):
        item = eval_item(seed, index, image_size)
        image = png_bytes(item.scene)
        (image_dir / f"{item.image_id}.png").write_bytes(image)
        question_lines.append(textvqa_question_line(item))
        annotations.append(textvqa_annotation(item, question_number=index))
        mmbench_rows.append(mmbench_row(item, index, base64.b64encode(image).decode("ascii")))
        if lmms_lab:
            lmms_lab_rows["textvqa"].append(lmms_lab_textvqa_row(annotations[-1], image))
            lmms_lab_rows["mmbench"].append(lmms_lab_mmbench_row(mmbench_rows[-1], image))
        eval_items.append(item)
        bar.update()
    bar.close()

    write_json(out_dir / "pretrain.json", pretrain)
    write_json(out_dir / "finetune.json", finetune)
    write_jsonl(eval_dir / "textvqa_questions.jsonl", question_lines)
    write_json(eval_dir / "textvqa_annotations.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                       "dataset_version": "0.5.1", "data": annotations})
    write_mmbench_tsv(eval_dir / "mmbench_dev.tsv", mmbench_rows)
    if lmms_lab:
        write_lmms_lab_splits(eval_dir, lmms_lab_rows["textvqa"], lmms_lab_rows["mmbench"])
    write_json(eval_dir / "question_types.json",
               {item.image_id: item.open_question.question_type for item in eval_items})
    stats = dataset_stats(seed, image_size, train_items, eval_items)
    write_json(out_dir / "stats.json", stats)
    return stats


def vocabulary_texts() -> list[str]:
    """Every word an answer or a prompt can use, whether or not this export happened to draw it."""
    return [
        " ".join(PALETTE), " ".join(SHAPE_KINDS), " ".join(SHAPE_PLURALS.values()), " ".join(SHAPE_POSITIONS),
        " ".join(WORDS), " ".join(str(digit) for digit in range(10)), "A B C D", VICUNA_SYSTEM, "USER: ASSISTANT:",
    ]


def rendered_training_texts(records: list[dict], conversation_format: str) -> list[str]:
    """Each record as the LLM reads it in training (template words and all), image placeholders removed."""
    from ..training.records import record_conversation_messages  # the training package imports torch

    fmt = get_conversation_format(conversation_format)
    return [fmt.render(record_conversation_messages(record)).replace(IMAGE_PLACEHOLDER, "") for record in records]


def tokenizer_corpus(out_dir: str | os.PathLike) -> list[str]:
    """The texts of an export as the LLM reads them in training, at their real frequencies.

    Captions come as stage 1 renders them (`plain`) and conversations as stage 2 does (`vicuna_v1`,
    system prompt included), so BPE spends its merges where the training tokens are: on a 512-id
    vocabulary trained on each text once, the system prompt took 96 tokens, more than the rest of
    an average conversation; trained on the rendered records (640 ids) it takes one per word, 24.
    Every possible answer and the template's words come too, so a tiny model wastes no ids.
    """
    out_dir = Path(out_dir)
    texts = vocabulary_texts()
    for name, conversation_format in (("pretrain.json", "plain"), ("finetune.json", "vicuna_v1")):
        path = out_dir / name
        if not path.exists():
            raise ValueError(f"{path} is missing; run export_dataset (or `piip-llava synthetic`) into {out_dir} first.")
        texts.extend(rendered_training_texts(json.loads(path.read_text(encoding="utf-8")), conversation_format))
    question_file = out_dir / "eval" / "textvqa_questions.jsonl"
    if question_file.exists():
        lines = question_file.read_text(encoding="utf-8").splitlines()
        texts.extend(json.loads(line)["text"] for line in lines if line.strip())
    return [text for text in texts if text]


def example_scenes(image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Scene]:
    """The bundled example images: shapes with a small word, one shape with a large word, one with a small number."""
    rng = random.Random(EXAMPLE_SEED)
    shapes_scene = Scene(
        image_size=image_size,
        background=(255, 255, 255),
        shapes=(
            place_shape(rng, "square", "blue", "small", "left", image_size),
            place_shape(rng, "circle", "red", "large", "centre", image_size),
        ),
        text=place_text(rng, "SUN", "small", "bottom right", image_size),
    )
    text_scene = Scene(
        image_size=image_size,
        background=(255, 255, 255),
        shapes=(place_shape(rng, "triangle", "green", "small", "right", image_size),),
        text=place_text(rng, "CAT", "large", "top left", image_size),
    )
    # Drawn after the first two, so they stay as they were before it was added.
    number_scene = Scene(
        image_size=image_size,
        background=(255, 255, 255),
        shapes=(place_shape(rng, "star", "orange", "large", "bottom", image_size),),
        text=place_text(rng, "47", "small", "top right", image_size),
    )
    return {"example_shapes": shapes_scene, "example_text": text_scene, "example_number": number_scene}


# The bundled example questions, at least one of each question type: (image name, question text).
EXAMPLE_QUESTIONS = (
    ("example_shapes", "What colour is the circle?"),
    ("example_shapes", "What shape is the blue object?"),
    ("example_shapes", COUNT_QUESTION),
    ("example_shapes", "Where is the red circle?"),
    ("example_shapes", TEXT_QUESTION),
    ("example_text", TEXT_QUESTION),
    ("example_text", "What colour is the triangle?"),
    ("example_number", TEXT_QUESTION),
    ("example_number", "What shape is the orange object?"),
)


def example_questions(scenes: dict[str, Scene]) -> list[tuple[str, Question]]:
    """The bundled example questions with their answers, taken from the generator's own questions."""
    examples = []
    for name, text in EXAMPLE_QUESTIONS:
        (question,) = [question for question in all_questions(scenes[name]) if question.text == text]
        examples.append((name, question))
    return examples


def write_examples(folder: str | os.PathLike) -> list[dict]:
    """Write the example images and `examples.json` (image, question, prompt, expected answer, type)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = example_scenes()
    for name, scene in scenes.items():
        (folder / f"{name}.png").write_bytes(png_bytes(scene))
    listing = [
        {
            "image": f"{name}.png",
            "question": question.text,
            "prompt": question.prompt,
            "answer": question.answer,
            "question_type": question.question_type,
            "caption": caption(scenes[name]),
        }
        for name, question in example_questions(scenes)
    ]
    write_json(folder / "examples.json", listing)
    return listing
