"""Stage 0 of the demo recipe: scene-attribute targets, encoder pretraining and language pretraining."""

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy
import pytest
import torch
from demo_recipe import precision
from demo_recipe.pipeline import (
    Recipe,
    SideBySideProcess,
    build_llm,
    pretrain_llm,
    stage2_records,
    write_number_choice_records,
    write_questions_without_text,
)
from demo_recipe.pretraining import (
    DIGIT_PLACES,
    ENCODER_TRAIN_SPLIT,
    LANGUAGE_CHECK_SPLIT,
    METRICS_FILE,
    SCENE_ATTRIBUTES,
    CellAttributeEmbedding,
    CellTokenConversations,
    EncoderBatches,
    EncoderPretraining,
    LanguageBatches,
    LanguagePretraining,
    PretrainingImage,
    SceneAttributeHeads,
    attribute_loss,
    batch_tensors,
    cell_index,
    cell_token_loss,
    corner_texts,
    encoder_to_pretrain,
    length_grouped_loss,
    look_alike_text,
    pretrain_encoder,
    pretrain_language_model,
    pretraining_images,
    scene_targets,
    step_batches,
    text_kind_key,
    training_sample,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from piip_llava import PIIPImageProcessor, PIIPVisionConfig, PIIPVisionModel
from piip_llava.synthetic import export_dataset, item_rng
from piip_llava.synthetic.questions import caption, qa_conversation, questions_of_type, scene_statements
from piip_llava.synthetic.scenes import TEXT_POSITIONS, WORDS, Scene, SceneText, Shape, generate_scene, render_scene
from piip_llava.training import TRAINING_PAD_MULTIPLE

TINY_CONFIG = "configs/tiny_convnext_clip.json"


def scene_with(shapes, text) -> Scene:
    return Scene(image_size=256, background=(255, 255, 255), shapes=tuple(shapes), text=text)


def test_targets_put_each_attribute_in_its_cell_and_name_the_number_and_its_digits():
    shapes = [
        Shape(kind="circle", colour="red", size="large", position="top", centre=(128, 42), radius=30),
        Shape(kind="star", colour="blue", size="small", position="right", centre=(213, 128), radius=10),
    ]
    text = SceneText(content="47", size_class="small", font_size=11, position="bottom left", origin=(10, 240),
                     glyph_height=8)
    targets = scene_targets(scene_with(shapes, text))
    top, right, bottom_left = 1, 5, 6
    assert SCENE_ATTRIBUTES["shape_kind"][targets["shape_kind"][top]] == "circle"
    assert SCENE_ATTRIBUTES["shape_colour"][targets["shape_colour"][right]] == "blue"
    assert SCENE_ATTRIBUTES["shape_size"][targets["shape_size"][right]] == "small"
    assert SCENE_ATTRIBUTES["text"][targets["text"][bottom_left]] == "47"
    assert SCENE_ATTRIBUTES["text_size"][targets["text_size"][bottom_left]] == "small"
    assert SCENE_ATTRIBUTES["shape_position"][targets["shape_position"][right]] == "right"
    assert SCENE_ATTRIBUTES["object"][targets["object"][top]] == "red circle"
    assert SCENE_ATTRIBUTES["object_position"][targets["object_position"][right]] == "blue star right"
    assert DIGIT_PLACES == ("digit_0", "digit_1")  # every number has two digits
    assert [SCENE_ATTRIBUTES[place][targets[place][bottom_left]] for place in DIGIT_PLACES] == ["4", "7"]
    # Every other cell holds nothing, for every attribute.
    occupied = {"shape_kind": {top, right}, "shape_colour": {top, right}, "shape_size": {top, right},
                "shape_position": {top, right}, "object": {top, right}, "object_position": {top, right},
                "text": {bottom_left}, "text_size": {bottom_left}, "digit_0": {bottom_left},
                "digit_1": {bottom_left}}
    for name, cells in occupied.items():
        assert {cell for cell, value in enumerate(targets[name]) if value} == cells, name


def test_word_targets_name_the_word_and_leave_digits_empty():
    text = SceneText(content="CAT", size_class="large", font_size=23, position="top right", origin=(180, 40),
                     glyph_height=16)
    targets = scene_targets(scene_with([], text))
    assert SCENE_ATTRIBUTES["text"][targets["text"][2]] == "CAT"
    assert all(value == 0 for place in DIGIT_PLACES for value in targets[place])


def test_corner_texts_fill_every_free_corner_with_its_own_targets_and_pixels():
    scene = generate_scene(random.Random(5))
    extra = corner_texts(scene, random.Random(6))
    assert sorted([scene.text.position, *(text.position for text in extra)]) == sorted(TEXT_POSITIONS)
    targets = scene_targets(scene, extra)
    for text in (scene.text, *extra):
        cell = cell_index(TEXT_POSITIONS[text.position])
        label = SCENE_ATTRIBUTES["text"][targets["text"][cell]]
        assert label == text.content
        assert SCENE_ATTRIBUTES["text_size"][targets["text_size"][cell]] == text.size_class
    # The shapes' targets are the scene's own, and the extra texts are drawn inside their corner cells only.
    alone = scene_targets(scene)
    assert all(targets[name] == alone[name] for name in SCENE_ATTRIBUTES if name.startswith(("shape", "object")))
    plain = numpy.asarray(render_scene(scene), dtype=int)
    printed = numpy.asarray(PretrainingImage(scene, extra).render(), dtype=int)
    changed_rows, changed_columns = numpy.nonzero(numpy.abs(printed - plain).sum(-1))
    side = scene.image_size / 3
    changed_cells = {(int(row // side), int(column // side)) for row, column in zip(changed_rows, changed_columns)}
    assert changed_cells == {TEXT_POSITIONS[text.position] for text in extra}
    with pytest.raises(ValueError, match="share a corner cell"):
        scene_targets(scene, (scene.text,))


def test_pretraining_images_keep_their_scenes_with_or_without_corner_texts():
    plain = pretraining_images("encoder-pretraining", 3, 4, seed=0, image_size=128)
    printed = pretraining_images("encoder-pretraining", 3, 4, seed=0, image_size=128, with_corner_texts=True)
    assert [image.scene for image in plain] == [image.scene for image in printed]
    assert all(image.extra_texts == () for image in plain)
    assert all(len(image.extra_texts) == 3 for image in printed)


def test_heads_give_per_cell_logits_and_a_finite_loss():
    rng = random.Random(3)
    scenes = [generate_scene(rng, image_size=128) for _ in range(2)]
    heads = SceneAttributeHeads([8, 4])
    logits = heads((torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)))
    for name, classes in SCENE_ATTRIBUTES.items():
        assert logits[name].shape == (2, 9, len(classes))
    targets = {name: torch.tensor([scene_targets(scene)[name] for scene in scenes]) for name in SCENE_ATTRIBUTES}
    loss = attribute_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and heads.classifiers["text"].weight.grad.abs().sum() > 0


def test_encoder_pretraining_lowers_the_loss_saves_a_loadable_encoder_and_is_skipped_once_done(tmp_path):
    out_dir = tmp_path / "encoder"
    settings = EncoderPretraining(steps=12, batch_size=4, learning_rate=3e-3, check_images=8)
    pretrain_encoder(TINY_CONFIG, out_dir, settings)
    metrics = json.loads((out_dir / METRICS_FILE).read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    assert set(metrics["held_out_accuracy"]) <= set(SCENE_ATTRIBUTES)
    assert all(0.0 <= value <= 1.0 for value in metrics["held_out_accuracy"].values())
    encoder = PIIPVisionModel.from_pretrained(out_dir)
    assert encoder.config.num_branches == 2
    assert not (tmp_path / "encoder.tmp").exists()
    stamp = (out_dir / "model.safetensors").stat().st_mtime_ns
    pretrain_encoder(TINY_CONFIG, out_dir, settings)
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_encoder_pretrains_channels_last_with_the_same_outputs():
    config = PIIPVisionConfig(**json.loads(Path(TINY_CONFIG).read_text()))
    torch.manual_seed(0)
    encoder = encoder_to_pretrain(config)
    convolutions = [module.weight for module in encoder.modules() if isinstance(module, torch.nn.Conv2d)]
    assert convolutions and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convolutions)
    assert encoder.training
    torch.manual_seed(0)
    contiguous = PIIPVisionModel(config)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    maps = encoder.eval()(pixel_values).feature_maps
    expected = contiguous.eval()(pixel_values).feature_maps
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_data_loader_worker_builds_the_same_encoder_batches_in_the_same_order():
    settings = EncoderPretraining(steps=3, batch_size=2)
    build = EncoderBatches(settings, PIIPImageProcessor(size=64), image_size=64)
    in_process = list(step_batches(build, settings.steps, workers=0))
    from_worker = list(step_batches(build, settings.steps, workers=1))
    assert len(in_process) == len(from_worker) == 3
    for (pixels, targets), (worker_pixels, worker_targets) in zip(in_process, from_worker):
        assert torch.equal(pixels, worker_pixels)
        assert all(torch.equal(targets[name], worker_targets[name]) for name in SCENE_ATTRIBUTES)
    # Step 1 is scenes 2 and 3 of the training split, with their corner texts, as the loop drew them in process.
    pixels, targets = batch_tensors(pretraining_images(ENCODER_TRAIN_SPLIT, 2, 2, settings.seed, 64, True),
                                    PIIPImageProcessor(size=64))
    assert torch.equal(in_process[1][0], pixels)
    assert all(torch.equal(in_process[1][1][name], targets[name]) for name in SCENE_ATTRIBUTES)
    assert not torch.equal(in_process[0][0], in_process[1][0])


@pytest.mark.parametrize("corner", [True, False])
def test_encoder_pretraining_trains_on_corner_texts_and_checks_on_single_texts(corner, tmp_path, monkeypatch):
    from demo_recipe import pretraining

    drawn = []
    original = pretraining.pretraining_images

    def recording(split, start, count, seed, image_size, with_corner_texts=False):
        images = original(split, start, count, seed, image_size, with_corner_texts)
        drawn.append((split, {len(image.extra_texts) for image in images}))
        return images

    monkeypatch.setattr(pretraining, "pretraining_images", recording)
    pretrain_encoder(TINY_CONFIG, tmp_path / "encoder",
                     EncoderPretraining(steps=2, batch_size=2, check_images=2, corner_texts=corner, data_workers=0))
    assert {split: texts for split, texts in drawn} == {"encoder-pretraining": {3 if corner else 0},
                                                        "encoder-check": {0}}


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("synthetic")
    export_dataset(data_dir, seed=0, num_train_images=24, num_eval_images=4, image_size=64, progress=False)
    return data_dir


def test_cell_tokens_take_the_image_tokens_places(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    model = AutoModelForCausalLM.from_pretrained(random_dir).eval()
    conversations = CellTokenConversations(tokenizer, max_length=512)
    scene = generate_scene(random.Random(3))
    other = generate_scene(random.Random(4))
    sample = conversations.encode(qa_conversation(questions_of_type(scene, "count")[:1]), "vicuna_v1")
    image_positions = [position for position, token in enumerate(sample[0]) if token == conversations.image_token_id]
    assert len(image_positions) == 9 and image_positions == list(range(image_positions[0], image_positions[0] + 9))
    supervised = [token for token, label in zip(*sample) if label != -100]
    assert tokenizer.decode(supervised).strip() == f"{len(scene.shapes)}</s>"
    cell_embedding = CellAttributeEmbedding(tokenizer, model.get_input_embeddings())
    with torch.no_grad():
        logits = cell_token_loss(model, cell_embedding, conversations.batch([sample], [scene]),
                                 conversations.image_token_id).logits
        other_logits = cell_token_loss(model, cell_embedding, conversations.batch([sample], [other]),
                                       conversations.image_token_id).logits
    first = image_positions[0]
    # Causal: the text before the image cannot see the cells; everything from the first cell on does.
    assert torch.equal(logits[0, :first], other_logits[0, :first])
    assert not torch.allclose(logits[0, image_positions[-1]:], other_logits[0, image_positions[-1]:])


def test_cell_tokens_start_from_the_words_of_each_attribute_and_conjunctions_from_random_vectors(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    words = AutoModelForCausalLM.from_pretrained(random_dir).get_input_embeddings()
    cell_embedding = CellAttributeEmbedding(tokenizer, words)
    assert torch.count_nonzero(cell_embedding.offsets["shape_colour"].weight) == 0
    conjunction = cell_embedding.offsets["object"].weight
    assert torch.count_nonzero(conjunction[0]) == 0 and torch.count_nonzero(conjunction[1:]) == conjunction[1:].numel()
    scene = scene_with([Shape(kind="circle", colour="red", size="large", position="top", centre=(128, 42), radius=30)],
                       None)
    targets = {name: torch.tensor([values]) for name, values in scene_targets(scene).items()}
    with torch.no_grad():
        cells = cell_embedding(targets, words)[0]
    top = 1
    expected = sum(words(torch.tensor(tokenizer(word, add_special_tokens=False)["input_ids"])).mean(0)
                   for word in ("circle", "red", "large", "top"))
    expected = expected + cell_embedding.offsets["object"].weight[SCENE_ATTRIBUTES["object"].index("red circle")]
    expected = expected + cell_embedding.offsets["object_position"].weight[
        SCENE_ATTRIBUTES["object_position"].index("red circle top")]
    assert torch.allclose(cells[top], expected, atol=1e-6)
    assert torch.count_nonzero(cells[0]) == 0  # an empty cell is the zero vector until training moves "none"


def test_digit_place_codes_tell_a_numbers_digits_apart_by_place(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    words = AutoModelForCausalLM.from_pretrained(random_dir).get_input_embeddings()

    def number_cell(cell_embedding, content: str) -> torch.Tensor:
        text = SceneText(content=content, size_class="large", font_size=23, position="top left", origin=(10, 40),
                         glyph_height=16)
        targets = {name: torch.tensor([values]) for name, values in scene_targets(scene_with([], text)).items()}
        with torch.no_grad():
            return cell_embedding(targets, words)[0, 0]

    torch.manual_seed(0)
    bag = CellAttributeEmbedding(tokenizer, words)
    # From the digits' words alone (the number's own class starts as the same bag), the same digits in another
    # order give the same cell token.
    assert torch.allclose(number_cell(bag, "31"), number_cell(bag, "13"), atol=1e-6)
    torch.manual_seed(0)
    coded = CellAttributeEmbedding(tokenizer, words, digit_place_codes=True)
    assert not torch.allclose(number_cell(coded, "31"), number_cell(coded, "13"), atol=1e-3)
    for place in DIGIT_PLACES:
        offsets = coded.offsets[place].weight
        assert torch.count_nonzero(offsets[0]) == 0 and torch.count_nonzero(offsets[1:]) == offsets[1:].numel()
    # The conjunctions draw the same random vectors either way (the digits' codes are drawn after them).
    assert torch.equal(coded.offsets["object_position"].weight, bag.offsets["object_position"].weight)


def test_question_loss_supervises_the_turns_after_the_image_but_measuring_keeps_answers_only(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    conversations = CellTokenConversations(tokenizer, max_length=512, question_loss=True)
    scene = generate_scene(random.Random(3))
    conversation = qa_conversation(questions_of_type(scene, "count")[:1])
    input_ids, labels = conversations.encode(conversation, "vicuna_v1")
    last_image = max(position for position, token in enumerate(input_ids) if token == conversations.image_token_id)
    assert all(label == -100 for label in labels[:last_image + 1])
    assert labels[last_image + 1:] == input_ids[last_image + 1:]
    assert "How many shapes are there?" in tokenizer.decode(labels[last_image + 1:])
    _, answer_labels = conversations.encode(conversation, "vicuna_v1", answers_only=True)
    assert tokenizer.decode([label for label in answer_labels if label != -100]).strip() == f"{len(scene.shapes)}</s>"


def test_length_grouped_loss_equals_the_loss_of_the_whole_batch_in_one_pass(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    model = AutoModelForCausalLM.from_pretrained(random_dir).eval()
    conversations = CellTokenConversations(tokenizer, max_length=1024, question_loss=True)
    cell_embedding = CellAttributeEmbedding(tokenizer, model.get_input_embeddings())
    settings = LanguagePretraining(max_turns=4)
    drawn = [training_sample(conversations, 0, index, settings) for index in range(7)]
    assert len({len(sample.tokens[0]) for sample in drawn}) > 1
    scenes, samples, _ = zip(*drawn)
    assert conversations.batch(list(samples), list(scenes))["input_ids"].shape[1] % TRAINING_PAD_MULTIPLE == 0
    with torch.no_grad():
        whole = cell_token_loss(model, cell_embedding, conversations.batch(list(samples), list(scenes)),
                                conversations.image_token_id).loss
        for groups in (1, 2, 3):
            grouped = length_grouped_loss(model, cell_embedding, conversations, drawn,
                                          LanguagePretraining(max_turns=4, length_groups=groups))
            assert torch.allclose(grouped, whole, atol=1e-5)


def test_training_samples_are_captions_or_question_turns_with_a_supervised_listing_turn(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    conversations = CellTokenConversations(tokenizer, max_length=1024)
    listed = LanguagePretraining(caption_rate=0.0, statement_rate=1.0, max_turns=3)
    unlisted = LanguagePretraining(caption_rate=0.0, statement_rate=0.0, max_turns=3)
    captions = LanguagePretraining(caption_rate=1.0)
    with_statements = 0
    for index in range(12):
        scene, (input_ids, labels), _ = training_sample(conversations, 0, index, listed)
        replies = tokenizer.decode([label for label in labels if label != -100])
        statements = scene_statements(scene, random.Random(0))
        if statements:
            with_statements += 1
            assert "List the shapes." in tokenizer.decode(input_ids)
            # The labels are the same whatever order the entries come in: compare the listed words.
            for entry in statements.rstrip(".").split("; "):
                assert all(word in replies for word in entry.split())
        _, (input_ids, _), _ = training_sample(conversations, 0, index, unlisted)
        assert "List the shapes." not in tokenizer.decode(input_ids)
        scene, (input_ids, labels), _ = training_sample(conversations, 0, index, captions)
        assert tokenizer.decode([label for label in labels if label != -100]).replace(" ", "").startswith(
            caption(scene).replace(" ", "")[:20])
    assert with_statements > 0


def test_a_data_loader_worker_draws_the_same_language_samples_in_the_same_order(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    conversations = CellTokenConversations(AutoTokenizer.from_pretrained(random_dir), max_length=1024)
    settings = LanguagePretraining(steps=2, batch_size=3, max_turns=3, look_alike_text_rate=0.5)
    build = LanguageBatches(conversations, settings)
    in_process = list(step_batches(build, settings.steps, workers=0))
    assert in_process == list(step_batches(build, settings.steps, workers=1))
    assert in_process[1] == [training_sample(conversations, settings.seed, index, settings) for index in (3, 4, 5)]


def test_language_pretraining_rejects_an_unknown_question_pool():
    with pytest.raises(ValueError, match="question_pool"):
        LanguagePretraining(question_pool="every")


def test_the_stage_0_check_keys_text_questions_by_what_is_written():
    (number,) = scenes_with_text("number", 1)
    (word,) = scenes_with_text("word", 1)
    assert number.text.content.isdigit() and not word.text.content.isdigit()
    assert (text_kind_key(number), text_kind_key(word)) == ("text_numbers", "text_words")


def test_language_pretraining_learns_to_answer_from_cell_tokens(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    settings = LanguagePretraining(steps=30, batch_size=8, learning_rate=3e-3, check_scenes=4, max_length=1024,
                                   max_turns=3)
    out_dir = pretrain_language_model(random_dir, tmp_path / "llm", settings)
    metrics = json.loads((out_dir / METRICS_FILE).read_text())
    assert metrics["final_loss"] < metrics["first_loss"] - 1.0
    accuracy = metrics["held_out_answer_accuracy"]
    assert {"colour", "count", "position"} <= set(accuracy) and all(0 <= value <= 1 for value in accuracy.values())
    # The open text questions are scored again split into words and numbers, for the check scenes that have them.
    check_scenes = [generate_scene(item_rng(0, LANGUAGE_CHECK_SPLIT, index, "scene")) for index in range(4)]
    scenes_of = Counter(text_kind_key(scene) for scene in check_scenes if scene.text)
    assert scenes_of and {key for key in accuracy if key in ("text_words", "text_numbers")} == set(scenes_of)
    # Each kind is scored over its own scenes (a whole number of them right), and together they are the sizes' questions.
    right = {key: accuracy[key] * count for key, count in scenes_of.items()}
    assert all(value == pytest.approx(round(value)) for value in right.values())
    sizes = Counter(f"text_{scene.text.size_class}" for scene in check_scenes if scene.text)
    assert sum(right.values()) == pytest.approx(sum(accuracy[key] * count for key, count in sizes.items()))
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(random_dir).config.vocab_size
    assert AutoTokenizer.from_pretrained(out_dir).get_vocab() == AutoTokenizer.from_pretrained(random_dir).get_vocab()
    stamp = (out_dir / "model.safetensors").stat().st_mtime_ns
    pretrain_language_model(random_dir, out_dir, settings)
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_language_pretraining_replaces_an_unfinished_or_foreign_directory(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    out_dir = tmp_path / "llm"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    settings = LanguagePretraining(steps=2, batch_size=4, check_scenes=2, max_length=1024, max_turns=2)
    pretrain_language_model(random_dir, out_dir, settings)
    assert (out_dir / METRICS_FILE).exists()
    assert AutoModelForCausalLM.from_pretrained(out_dir).config.vocab_size > 0


def test_bf16_language_pretraining_keeps_float32_weights_and_attention_and_learns(small_export, tmp_path, monkeypatch):
    kernel_calls = []

    def recording_sdpa(module, query, key, value, *arguments, **options):
        kernel_calls.append((torch.is_autocast_enabled("cpu"), query.dtype))
        return sdpa_attention_forward(module, query, key, value, *arguments, **options)

    monkeypatch.setattr(precision, "sdpa_attention_forward", recording_sdpa)
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    settings = LanguagePretraining(steps=12, batch_size=4, learning_rate=3e-3, check_scenes=2, max_length=1024,
                                   max_turns=2, bf16=True)
    out_dir = pretrain_language_model(random_dir, tmp_path / "llm", settings)
    metrics = json.loads((out_dir / METRICS_FILE).read_text())
    assert metrics["settings"]["bf16"] is True and metrics["final_loss"] < metrics["first_loss"] - 1.0
    # Every training step's attention ran in float32 with autocast off (the held-out check runs without autocast).
    assert len(kernel_calls) >= settings.steps and set(kernel_calls) == {(False, torch.float32)}
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_language_pretraining_needs_one_image_token_per_cell(small_export, tmp_path):
    with pytest.raises(ValueError, match="projector_grid must be 3"):
        pretrain_llm(tmp_path, small_export, Recipe(projector_grid=0))


def test_recipe_options_parse_from_the_command_line_including_switches():
    parser = argparse.ArgumentParser()
    Recipe.add_arguments(parser)
    defaults = Recipe.from_arguments(parser.parse_args([]))
    assert defaults == Recipe()
    changed = Recipe.from_arguments(parser.parse_args(["--no-freeze-vision-branches", "--projector-grid", "0",
                                                       "--encoder-pretraining-steps", "10"]))
    assert not changed.freeze_vision_branches and changed.projector_grid == 0
    assert changed.encoder_pretraining_steps == 10 and changed.describe_turns is False


def settings_and_commands_of_the_pipeline(recipe: Recipe, tmp_path, monkeypatch) -> dict:
    """What the pipeline hands each stage for `recipe`: both stage-0 settings and the `piip-llava` commands of
    `train init` and stages 1 and 2, recorded instead of run."""
    from demo_recipe import pipeline, pretraining

    seen = {}
    monkeypatch.setattr(pretraining, "pretrain_encoder", lambda config, out, settings: seen.setdefault("encoder", settings))
    monkeypatch.setattr(pretraining, "pretrain_language_model",
                        lambda random_dir, out, settings, before_step: seen.setdefault("llm", settings))
    monkeypatch.setattr(pipeline, "build_llm", lambda llm_dir, data_dir, recipe: llm_dir)
    monkeypatch.setattr(pipeline, "run_cli", lambda *arguments, threads: seen.setdefault("commands", []).append(arguments))
    pipeline.pretrain_vision_encoder(tmp_path, Path(TINY_CONFIG), recipe)
    pipeline.pretrain_llm(tmp_path, tmp_path, recipe)
    pipeline.train_two_stages(tmp_path, tmp_path / "encoder", tmp_path, tmp_path / "llm", recipe)
    return seen


@pytest.mark.parametrize("switches", [[], ["--no-encoder-corner-texts", "--no-projector-antialias",
                                            "--no-digit-place-codes"]], ids=["on", "off"])
def test_recipe_reading_switches_reach_both_stage_0s_and_train_init(switches, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    Recipe.add_arguments(parser)
    recipe = Recipe.from_arguments(parser.parse_args(switches))
    expected = not switches
    assert (recipe.encoder_corner_texts, recipe.projector_antialias, recipe.digit_place_codes) == (expected,) * 3
    seen = settings_and_commands_of_the_pipeline(recipe, tmp_path, monkeypatch)
    assert seen["encoder"].corner_texts is expected and seen["encoder"].antialias is expected
    assert seen["llm"].digit_place_codes is expected
    init = next(arguments for arguments in seen["commands"] if arguments[:2] == ("train", "init"))
    assert ("--projector-antialias" in init) is expected


@pytest.mark.parametrize(("bf16", "language_pretraining_bf16", "llm_in_bf16"),
                         [(True, True, True), (True, False, False), (False, True, False)],
                         ids=["bf16", "bf16-but-the-stage-0-llm", "float32"])
def test_the_recipe_precision_and_llm_rate_reach_stage_0_and_stages_1_and_2(bf16, language_pretraining_bf16,
                                                                             llm_in_bf16, tmp_path, monkeypatch):
    recipe = Recipe(bf16=bf16, language_pretraining_bf16=language_pretraining_bf16, language_pretraining_lr=1e-3)
    seen = settings_and_commands_of_the_pipeline(recipe, tmp_path, monkeypatch)
    assert seen["llm"].bf16 is llm_in_bf16
    assert seen["llm"].learning_rate == 1e-3
    stages = [arguments for arguments in seen["commands"] if arguments[:2] == ("train", "--stage")]
    assert [arguments[2] for arguments in stages] == ["pretrain", "finetune"]
    assert all(("--bf16" in arguments) is bf16 for arguments in stages)


def test_stage2_records_without_text_keep_every_other_turn_and_one_image_placeholder(small_export):
    records = json.loads((small_export / "finetune.json").read_text())
    subset = json.loads(write_questions_without_text(small_export).read_text())
    kept_ids = {record["id"] for record in subset}
    for record in records:
        pairs = [(record["conversations"][i]["value"], record["conversations"][i + 1]["value"])
                 for i in range(0, len(record["conversations"]), 2)]
        expected = [(question.replace("<image>\n", ""), answer) for question, answer in pairs
                    if "is written in the image" not in question]
        if not expected:
            assert record["id"] not in kept_ids
            continue
        (match,) = [item for item in subset if item["id"] == record["id"]]
        turns = match["conversations"]
        assert [(turns[i]["value"].replace("<image>\n", ""), turns[i + 1]["value"])
                for i in range(0, len(turns), 2)] == expected
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(turn["value"].count("<image>") for turn in turns) == 1
    assert "is written in the image" in json.dumps(records)
    assert "is written in the image" not in json.dumps(subset)
    assert stage2_records(small_export, Recipe(text_questions=True)).name == "finetune.json"
    with pytest.raises(ValueError, match="describe_turns"):
        stage2_records(small_export, Recipe(describe_turns=True, text_questions=False))


def test_number_choice_records_add_one_turn_choices_about_each_number_and_keep_every_conversation(small_export):
    from piip_llava.evaluation.mmbench import extract_option_letter

    records = json.loads((small_export / "finetune.json").read_text())
    path = stage2_records(small_export, Recipe(number_choice_records=2))
    assert path == write_number_choice_records(small_export, 2, seed=0)
    written = json.loads(path.read_text())
    assert written[:len(records)] == records
    extra = written[len(records):]
    numbers = {}
    for record in records:
        for human, gpt in zip(record["conversations"][0::2], record["conversations"][1::2]):
            if "is written in the image" in human["value"] and gpt["value"].isdigit():
                numbers[record["image"]] = gpt["value"]
    assert numbers and len(extra) == 2 * len(numbers)
    option_sets = []
    for record in extra:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        options = [line[3:] for line in human["value"].split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
        assert len(options) == 4 and gpt["value"] == numbers[record["image"]] and gpt["value"] in options
        assert all(len(option) == len(gpt["value"]) for option in options)
        # The reply names its option, as MMBench's answer matching reads it.
        letter = "ABCD"[options.index(gpt["value"])]
        assert extract_option_letter(gpt["value"], options) == letter
        option_sets.append((record["image"], tuple(options)))
    # Each image's two records offer different options.
    by_image = {}
    for image, options in option_sets:
        by_image.setdefault(image, set()).add(options)
    assert all(len(sets) == 2 for sets in by_image.values())
    with pytest.raises(ValueError, match="number_choice_records"):
        stage2_records(small_export, Recipe(number_choice_records=1, describe_turns=True))


def scenes_with_text(kind: str, count: int) -> list[Scene]:
    scenes = (generate_scene(random.Random(seed)) for seed in range(1000))
    return [scene for scene in scenes if scene.text and scene.text.is_number == (kind == "number")][:count]


def test_a_look_alike_misreads_only_the_text_keeping_its_form():
    rng = random.Random(0)
    for scene in scenes_with_text("number", 20):
        other = look_alike_text(scene, rng)
        content, misread = scene.text.content, other.text.content
        assert len(misread) == len(content) and misread != content and misread[0] != "0" and misread.isdigit()
        assert other.shapes == scene.shapes and other.text.position == scene.text.position
    for scene in scenes_with_text("word", 20):
        misread = look_alike_text(scene, rng).text.content
        assert misread in WORDS and misread != scene.text.content


def test_look_alike_conversations_blur_the_text_cell_and_ask_text_only_as_multiple_choice(small_export, tmp_path):
    random_dir = build_llm(tmp_path / "llm_random", small_export, Recipe(vocab_size=300))
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    model = AutoModelForCausalLM.from_pretrained(random_dir).eval()
    conversations = CellTokenConversations(tokenizer, max_length=2048)
    cell_embedding = CellAttributeEmbedding(tokenizer, model.get_input_embeddings())
    always = LanguagePretraining(caption_rate=0.0, max_turns=12, look_alike_text_rate=1.0)
    never = LanguagePretraining(caption_rate=0.0, max_turns=12)
    blurred = 0
    for index in range(12):
        sample, plain = training_sample(conversations, 0, index, always), training_sample(conversations, 0, index, never)
        assert plain.look_alike is None and plain.scene == sample.scene
        if sample.scene.text is None:
            assert sample.look_alike is None and sample.tokens == plain.tokens
            continue
        blurred += 1
        prompt = tokenizer.decode(sample.tokens[0])
        asked = prompt.count("written in the image?")
        assert asked > 0 and asked == prompt.count("written in the image?\nA.")
        with torch.no_grad():
            shown = conversations.batch([sample.tokens], [sample.scene], look_alikes=[sample.look_alike])
            cells = (cell_embedding(shown["targets"], model.get_input_embeddings()),
                     cell_embedding(shown["look_alike_targets"], model.get_input_embeddings()))
            unblurred = conversations.batch([sample.tokens], [sample.scene])
            logits = cell_token_loss(model, cell_embedding, shown, conversations.image_token_id).logits
            plain_logits = cell_token_loss(model, cell_embedding, unblurred, conversations.image_token_id).logits
        # Only the text cell differs between the scene and its look-alike, so only it is blurred.
        differing = (cells[0] != cells[1]).any(-1)[0].nonzero().flatten().tolist()
        assert len(differing) == 1
        assert not torch.allclose(logits, plain_logits)
    assert blurred > 0


def test_a_side_by_side_process_shares_the_threads_until_it_is_done_then_gives_them_back():
    threads_before = torch.get_num_threads()
    with SideBySideProcess(time.sleep, (2.0,), threads=2, name="sleeper") as beside:
        assert torch.get_num_threads() == 1
        beside()
        assert beside.process.is_alive() and torch.get_num_threads() == 1
        beside.process.join()
        beside()
        assert torch.get_num_threads() == threads_before
    assert beside.process.exitcode == 0 and torch.get_num_threads() == threads_before


def test_a_failed_side_by_side_process_stops_the_work_beside_it_with_its_exit_code():
    threads_before = torch.get_num_threads()
    failed = pytest.raises(RuntimeError, match=r"failer: the process failed \(exit code 3\)")
    with failed, SideBySideProcess(sys.exit, (3,), threads=2, name="failer") as beside:
        beside.process.join()
        beside()
    assert torch.get_num_threads() == threads_before


def test_an_error_beside_a_side_by_side_process_stops_it():
    threads_before = torch.get_num_threads()
    with pytest.raises(KeyError, match="here"), SideBySideProcess(time.sleep, (60.0,), threads=2, name="sleeper") as beside:
        raise KeyError("here")
    assert not beside.process.is_alive() and beside.process.exitcode != 0
    assert torch.get_num_threads() == threads_before
    with pytest.raises(ValueError, match="at least 2 threads"):
        SideBySideProcess(time.sleep, (1.0,), threads=1, name="alone")


def test_stage_0_trains_the_encoder_in_a_child_process_beside_the_llm(small_export, tmp_path, monkeypatch):
    from demo_recipe import pipeline, pretraining

    recipe = Recipe(language_pretraining_steps=3, encoder_pretraining_steps=3, threads=2)

    def not_in_this_process(*arguments):
        raise AssertionError("the encoder trained in the LLM's process")

    threads_per_step, events = [], []

    def recording_loss(*arguments, **keywords):
        threads_per_step.append(torch.get_num_threads())
        events.append("step")
        return length_grouped_loss(*arguments, **keywords)

    check_child = pipeline.SideBySideProcess.__call__

    def recording_check(beside):
        events.append("check")
        check_child(beside)

    monkeypatch.setattr(pretraining, "pretrain_encoder", not_in_this_process)
    monkeypatch.setattr(pretraining, "length_grouped_loss", recording_loss)
    monkeypatch.setattr(pipeline.SideBySideProcess, "__call__", recording_check)
    threads_before = torch.get_num_threads()
    llm_dir, encoder_dir = pipeline.pretrain_stage_zero(tmp_path, small_export, tmp_path / "piip", Path(TINY_CONFIG),
                                                        recipe)
    # The child starts before the LLM is loaded, and importing torch takes it longer than that.
    assert threads_per_step[0] == 1 and len(threads_per_step) == recipe.language_pretraining_steps
    # Whether the child is done is looked at before every LLM step, so the LLM takes the threads back at once.
    assert events == ["check", "step"] * recipe.language_pretraining_steps
    assert torch.get_num_threads() == threads_before
    assert (llm_dir, encoder_dir) == (tmp_path / "llm", tmp_path / "piip" / "encoder")
    encoder_metrics = json.loads((encoder_dir / METRICS_FILE).read_text())
    assert encoder_metrics["settings"]["steps"] == recipe.encoder_pretraining_steps
    assert json.loads((llm_dir / METRICS_FILE).read_text())["settings"]["steps"] == recipe.language_pretraining_steps


def test_stage_0_trains_the_unfinished_half_alone_on_every_thread(tmp_path, monkeypatch):
    from demo_recipe import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "pretrain_llm", lambda *arguments, **keywords: calls.append(("llm", keywords)))
    monkeypatch.setattr(pipeline, "pretrain_vision_encoder", lambda *arguments: calls.append(("encoder", {})))
    monkeypatch.setattr(pipeline, "SideBySideProcess", None)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / METRICS_FILE).write_text("{}")
    pipeline.pretrain_stage_zero(tmp_path, tmp_path, tmp_path / "piip", Path(TINY_CONFIG), Recipe(threads=2))
    assert calls == [("llm", {}), ("encoder", {})]
