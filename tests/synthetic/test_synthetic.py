"""The synthetic dataset: determinism, answers that follow from the scene, small text that a 64 px view
cannot read, and evaluation files that the benchmark harness scores unchanged."""

import argparse
import base64
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from piip_llava.commands import synthetic as commands
from piip_llava.conversation import VICUNA_SYSTEM
from piip_llava.evaluation.mmbench import extract_option_letter, load_mmbench_items, read_mmbench_table, score_mmbench
from piip_llava.evaluation.textvqa import load_annotations, questions_from_jsonl, score_textvqa
from piip_llava.synthetic import export_dataset, tokenizer_corpus
from piip_llava.synthetic.export import (
    MMBENCH_COLUMNS,
    example_questions,
    example_scenes,
    png_bytes,
    write_examples,
)
from piip_llava.synthetic.questions import (
    LISTING_PROMPT,
    QUESTION_TYPES,
    Question,
    all_questions,
    caption,
    make_multiple_choice,
    questions_of_type,
    scene_statements,
    shuffled_questions,
)
from piip_llava.synthetic.scenes import (
    PALETTE,
    SHAPE_POSITIONS,
    TEXT_FONT_SIZES,
    WORDS,
    Scene,
    generate_scene,
    glyph_height,
    place_shape,
    place_text,
    scaled_font_size,
)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "piip_llava" / "assets" / "examples"
LOW_RESOLUTION = 64


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    export_dataset(out_dir, seed=3, num_train_images=12, num_eval_images=12, progress=False)
    return out_dir


def random_scenes(count: int, seed: int = 0) -> list[Scene]:
    return [generate_scene(random.Random(f"test/{seed}/{index}")) for index in range(count)]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        export_dataset(tmp_path / name, seed=seed, num_train_images=5, num_eval_images=6, progress=False)
    first, again, other = (folder_bytes(tmp_path / name) for name in ("first", "again", "other"))
    assert first == again
    assert first.keys() == other.keys()
    assert first["images/train_000000.png"] != other["images/train_000000.png"]
    assert first["finetune.json"] != other["finetune.json"]


def test_scene_from_a_seed_renders_identically():
    first = generate_scene(random.Random(11))
    assert generate_scene(random.Random(11)) == first
    assert png_bytes(generate_scene(random.Random(11))) == png_bytes(first)
    assert png_bytes(generate_scene(random.Random(12))) != png_bytes(first)


def test_training_and_evaluation_images_differ(export_dir):
    images = folder_bytes(export_dir / "images")
    train = {data for name, data in images.items() if name.startswith("train_")}
    evaluation = {data for name, data in images.items() if name.startswith("eval_")}
    assert len(train) == 12 and len(evaluation) == 12
    assert not train & evaluation


def test_shapes_sit_in_distinct_cells_and_inside_them():
    for scene in random_scenes(200):
        positions = [shape.position for shape in scene.shapes]
        assert 1 <= len(positions) <= 4 and len(set(positions)) == len(positions)
        side = scene.image_size / 3
        for shape in scene.shapes:
            row, column = SHAPE_POSITIONS[shape.position]
            x, y = shape.centre
            assert column * side <= x - shape.radius and x + shape.radius <= (column + 1) * side
            assert row * side <= y - shape.radius and y + shape.radius <= (row + 1) * side


def test_answers_follow_from_the_scene_metadata():
    for scene in random_scenes(200, seed=1):
        for question in all_questions(scene):
            if question.text == "How many shapes are there?":
                assert question.answer == str(len(scene.shapes))
            elif question.question_type == "colour":
                kind = question.text.removeprefix("What colour is the ").removesuffix("?")
                [shape] = [shape for shape in scene.shapes if shape.kind == kind]
                assert question.answer == shape.colour
            elif question.question_type == "shape":
                colour = question.text.split()[4]
                [shape] = [shape for shape in scene.shapes if shape.colour == colour]
                assert question.answer == shape.kind
            elif question.question_type == "position":
                colour, kind = question.text.removesuffix("?").split()[-2:]
                [shape] = [shape for shape in scene.shapes if (shape.colour, shape.kind) == (colour, kind)]
                assert question.answer == shape.position
            elif question.question_type in ("text_small", "text_large"):
                assert question.answer == scene.text.content
                assert question.question_type == f"text_{scene.text.size_class}"


def test_ambiguous_questions_are_not_asked():
    rng = random.Random(0)
    scene = Scene(
        image_size=256,
        background=(255, 255, 255),
        shapes=(
            place_shape(rng, "circle", "red", "large", "left", 256),
            place_shape(rng, "circle", "red", "small", "right", 256),
            place_shape(rng, "square", "black", "small", "top", 256),
        ),
        text=place_text(rng, "CAT", "large", "top left", 256),
    )
    texts = {question.text: question.answer for question in all_questions(scene)}
    assert "What colour is the circle?" not in texts
    assert "What shape is the red object?" not in texts
    assert "Where is the red circle?" not in texts
    assert "What shape is the black object?" not in texts  # the text is black too
    assert texts["What colour is the square?"] == "black"
    assert texts["How many circles are there?"] == "2"
    assert texts["How many shapes are there?"] == "3"


def test_shuffled_questions_ask_every_question_of_the_scene_up_to_the_turn_limit():
    scene = generate_scene(random.Random(11))
    every = {question.text for question in all_questions(scene)}
    items = shuffled_questions(scene, random.Random(0), max_turns=len(every) + 5)
    assert {item.text for item in items} == every and len(items) == len(all_questions(scene))
    capped = shuffled_questions(scene, random.Random(0), max_turns=2)
    assert len(capped) == 2


def test_scene_statements_label_each_unique_shape_with_its_attributes():
    listed = 0
    for seed in range(30):
        scene = generate_scene(random.Random(seed))
        statements = scene_statements(scene, random.Random(seed))
        unique = [shape for shape in scene.shapes
                  if len(scene.shapes_of_kind(shape.kind)) == 1 and len(scene.shapes_of_colour(shape.colour)) == 1]
        entries = [entry.split() for entry in statements.rstrip(".").split("; ")] if statements else []
        assert len(entries) == len(unique)
        for first, second, position in entries:
            (shape,) = [shape for shape in unique if {first, second} == {shape.kind, shape.colour}]
            assert position == shape.position
        listed += len(entries)
    assert listed > 0


def test_multiple_choice_letter_points_at_the_answer():
    rng = random.Random(5)
    for scene in random_scenes(50, seed=2):
        for question in all_questions(scene):
            choice = make_multiple_choice(question, rng)
            assert len(set(choice.options)) == 4
            assert choice.options["ABCD".index(choice.answer)] == question.answer
            # The training reply names the right option; the MMBench scorer maps it to that option's letter.
            assert choice.reply == question.reply == question.answer
            assert extract_option_letter(choice.reply, choice.options) == choice.answer
            assert choice.prompt.endswith("\nAnswer with the option's letter from the given choices directly.")


def test_small_text_is_under_three_pixels_at_64_px_and_large_text_is_not():
    scale = LOW_RESOLUTION / 256
    samples = [*WORDS, "10", "55", "99"]
    for size in TEXT_FONT_SIZES["small"]:
        heights = [glyph_height(text, scaled_font_size(size, 256)) for text in samples]
        assert 7 <= min(heights) and max(heights) <= 9  # cap height at 256 px
        assert max(heights) * scale < 3
    for size in TEXT_FONT_SIZES["large"]:
        assert min(glyph_height(text, scaled_font_size(size, 256)) for text in samples) * scale >= 3


def test_scene_text_records_its_measured_height_and_stays_in_its_corner():
    scenes = [scene for scene in random_scenes(100, seed=3) if all(shape.colour != "black" for shape in scene.shapes)]
    for scene in scenes:
        text = scene.text
        assert text.glyph_height == glyph_height(text.content, text.font_size)
        # Only the text is drawn in black here: its dark pixels give its drawn height and place.
        dark = np.asarray(Image.open(io.BytesIO(png_bytes(scene)))).max(axis=2) < 128
        rows, columns = np.nonzero(dark)
        assert rows.max() - rows.min() + 1 == pytest.approx(text.glyph_height, abs=1)
        side = scene.image_size / 3
        row, column = {"top left": (0, 0), "top right": (0, 2), "bottom left": (2, 0), "bottom right": (2, 2)}[
            text.position]
        assert row * side <= rows.min() and rows.max() < (row + 1) * side
        assert column * side <= columns.min() and columns.max() < (column + 1) * side


def test_captions_name_every_shape_and_the_text():
    for scene in random_scenes(30, seed=4):
        text = caption(scene)
        for shape in scene.shapes:
            assert f"{shape.size} {shape.colour} {shape.kind}" in text
        assert scene.text.content in text and scene.text.position in text


def test_finetune_records_are_llava_conversations(export_dir):
    records = json.loads((export_dir / "finetune.json").read_text())
    listed = 0
    for record in records:
        turns = record["conversations"]
        assert (export_dir / "images" / record["image"]).exists()
        assert turns[0]["value"].startswith("<image>\n")
        assert 2 <= len(turns) <= 14 and [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all("<image>" not in turn["value"] for turn in turns[1:])
        prompts = [turn["value"].removeprefix("<image>\n") for turn in turns[0::2]]
        listed += LISTING_PROMPT in prompts
        assert prompts.count(LISTING_PROMPT) <= 1 and sum("is written in the image" in prompt for prompt in prompts) <= 1
        for prompt, reply in zip(prompts, [turn["value"] for turn in turns[1::2]]):
            options = dict(re.findall(r"^([A-D])\. (.+)$", prompt, flags=re.MULTILINE))
            if prompt == LISTING_PROMPT:
                assert re.fullmatch(r"(\w+ \w+ \w+)(; \w+ \w+ \w+)*\.", reply)
            elif options:
                assert len(reply.split()) == 1 and list(options.values()).count(reply) == 1
            else:
                assert len(reply.split()) == 1
    assert listed > len(records) // 2
    pretrain = json.loads((export_dir / "pretrain.json").read_text())
    assert [record["conversations"][0]["value"] for record in pretrain] == ["<image>"] * len(pretrain)


def test_textvqa_files_have_the_official_fields_and_score_perfect_answers_fully(export_dir):
    eval_dir = export_dir / "eval"
    lines = [json.loads(line) for line in (eval_dir / "textvqa_questions.jsonl").read_text().splitlines()]
    assert all(set(line) == {"question_id", "image", "text"} for line in lines)
    assert all(line["text"].endswith("\nAnswer the question using a single word or phrase.") for line in lines)
    data = json.loads((eval_dir / "textvqa_annotations.json").read_text())["data"]
    assert all(len(entry["answers"]) == 10 and len(set(entry["answers"])) == 1 for entry in data)
    types = json.loads((eval_dir / "question_types.json").read_text())
    assert set(types) == {line["question_id"] for line in lines} and set(types.values()) == set(QUESTION_TYPES)

    loaded = questions_from_jsonl(eval_dir / "textvqa_questions.jsonl", export_dir / "images")
    assert not loaded.skipped and loaded.requests[0].load_image().size == (256, 256)
    answers = {entry["image_id"]: entry["answers"][0] for entry in data}
    records = [dict(request.record, text=answers[request.record["question_id"]]) for request in loaded.requests]
    score = score_textvqa(records, load_annotations(eval_dir / "textvqa_annotations.json"))
    assert score.accuracy == 100.0 and score.samples == len(lines) and not score.unmatched


def test_mmbench_tsv_round_trips_and_scores_perfect_answers_fully(export_dir):
    path = export_dir / "eval" / "mmbench_dev.tsv"
    frame = pd.read_csv(path, sep="\t", dtype=str)
    assert tuple(frame.columns) == MMBENCH_COLUMNS
    assert set(frame["category"]) == set(QUESTION_TYPES)
    assert set(frame["l2-category"]) == {"perception", "text"}
    image = Image.open(io.BytesIO(base64.b64decode(frame["image"][0])))
    assert image.size == (256, 256)
    assert base64.b64decode(frame["image"][0]) == (export_dir / "images" / "eval_000000.png").read_bytes()

    table = read_mmbench_table(path)
    items, skipped = load_mmbench_items(table, rounds="rotate")
    assert not skipped and len(items) == 4 * len(frame)
    records = [{"question_id": item.question_id, "round_id": item.round_id, "text": item.answer} for item in items]
    score = score_mmbench(records, items)
    assert score.circular.accuracy == 100.0 and score.circular.total == len(frame)


def test_stats_count_questions_and_give_chance_accuracy(export_dir):
    stats = json.loads((export_dir / "stats.json").read_text())
    assert stats["train"]["images"] == 12 and stats["eval"]["textvqa_questions"] == 12
    assert sum(stats["eval"]["textvqa_questions_per_type"].values()) == 12
    assert stats["eval"]["textvqa_questions_per_type"] == {question_type: 2 for question_type in QUESTION_TYPES}
    turns = sum(len(record["conversations"]) // 2 for record in json.loads((export_dir / "finetune.json").read_text()))
    assert sum(stats["train"]["finetune_turns_per_type"].values()) == stats["train"]["finetune_turns"] == turns
    chance = stats["chance_accuracy"]
    assert chance["textvqa"]["colour"] == pytest.approx(1 / len(PALETTE))
    assert chance["textvqa"]["position"] == pytest.approx(1 / 5)
    assert chance["textvqa"]["count"] == pytest.approx(1 / 4)
    assert chance["mmbench"]["colour"] == {"vanilla": 0.25, "circular": 0.25**4}


def test_tokenizer_corpus_covers_every_answer_without_placeholders(export_dir):
    corpus = tokenizer_corpus(export_dir)
    words = set(" ".join(corpus).split())
    assert {*PALETTE, *WORDS, "circle", "crosses", "centre"} <= words
    assert not any("<image>" in text for text in corpus)
    # Texts come at the frequency training sees them: the system prompt once per conversation.
    assert sum(VICUNA_SYSTEM in text for text in corpus) == len(json.loads((export_dir / "finetune.json").read_text())) + 1
    with pytest.raises(ValueError, match="pretrain.json is missing"):
        tokenizer_corpus(export_dir / "eval")


def test_bundled_examples_match_the_generator(tmp_path):
    listing = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert [entry["answer"] for entry in listing] == ["red", "square", "2", "centre", "SUN", "CAT", "green", "47", "star"]
    assert {entry["question_type"] for entry in listing} == set(QUESTION_TYPES)
    assert write_examples(tmp_path) == listing
    scenes = example_scenes()
    for entry, (name, question) in zip(listing, example_questions(scenes)):
        assert isinstance(question, Question) and question in questions_of_type(scenes[name], entry["question_type"])
        bundled = np.asarray(Image.open(EXAMPLES_DIR / entry["image"]).convert("RGB"), dtype=np.int16)
        fresh = np.asarray(Image.open(tmp_path / entry["image"]).convert("RGB"), dtype=np.int16)
        assert np.abs(bundled - fresh).mean() < 1.0  # equal up to font rasterisation across Pillow versions


def test_cli_writes_the_dataset_and_reports_bad_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(["synthetic", "--out", str(tmp_path), "--train-size", "2", "--eval-size", "6",
                              "--no-progress"])
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "stats.json").read_text())["eval"]["images"] == 6
    bad = parser.parse_args(["synthetic", "--out", str(tmp_path), "--image-size", "32", "--no-progress"])
    assert bad.handler(bad) == 2
    assert "image_size must be an integer of at least 64" in capsys.readouterr().err
