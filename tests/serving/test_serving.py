"""Serving pieces that need neither vLLM nor a browser: image checks, conversations, stopping, the CLI.

The servers themselves are tested in test_serving_vllm.py and test_serving_web.py.
"""

from __future__ import annotations

import importlib.metadata
import io
from threading import Event

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from piip_llava.chat_session import ChatSession
from piip_llava.cli import main
from piip_llava.serving.backends import ChatInputError, Conversation, InProcessBackend, load_chat_image


def test_an_image_is_read_as_rgb(tmp_path, rgb_image):
    path = tmp_path / "photo.png"
    rgb_image.convert("RGBA").save(path)
    image = load_chat_image(path)
    assert image.mode == "RGB" and image.size == rgb_image.size


def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are notes")
    with pytest.raises(ChatInputError, match="notes.png is not an image"):
        load_chat_image(path)


def test_an_image_over_the_pixel_limit_is_refused_with_its_size_and_the_limit(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 300), "white").save(path)
    with pytest.raises(ChatInputError, match=r"wide.png is 400x300 pixels \(0.1 megapixels\).*up to 0.1 megapixels"):
        load_chat_image(path, max_pixels=100_000)
    assert load_chat_image(path, max_pixels=120_000).size == (400, 300)


def test_a_conversation_sends_its_image_with_the_first_question_only():
    conversation = Conversation(image=Image.new("RGB", (8, 8)), turns=[("What is it?", "a circle"), ("Colour?", "red")])
    messages = conversation.messages()
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]
    images = [part for message in messages for part in message["content"] if part["type"] == "image"]
    assert len(images) == 1 and messages[0]["content"][0] == {"type": "image"}


def test_the_in_process_backend_answers_as_the_chat_session_does(tiny_model_dir, rgb_image):
    backend = InProcessBackend(tiny_model_dir, max_new_tokens=6)
    first = "".join(backend.stream(Conversation(image=rgb_image), "What colour is the circle?", Event()))
    follow_up = "".join(
        backend.stream(Conversation(image=rgb_image, turns=[("What colour is the circle?", first.strip())]),
                       "And the square?", Event())
    )
    session = ChatSession(backend.model, backend.processor, rgb_image, {"max_new_tokens": 6, "do_sample": False})
    expected = [session.ask(question, stream=io.StringIO()) for question in ("What colour is the circle?", "And the square?")]
    assert [first.strip(), follow_up.strip()] == expected
    assert "parameters" in backend.describe() and tiny_model_dir.name in backend.describe()


def test_stopping_ends_the_answer_early_and_keeps_what_was_generated(tiny_model_dir, rgb_image):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    # min_new_tokens: the tiny random model must not end the answer by itself before the stop.
    options = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False}
    full = ChatSession(model, processor, rgb_image, options).ask("Describe it.", stream=io.StringIO())

    stop = Event()
    session = ChatSession(model, processor, rgb_image, options)
    pieces = []
    for piece in session.stream("Describe it.", stop):
        pieces.append(piece)
        stop.set()
    kept = session.messages[-1]["content"][0]["text"]
    assert kept == "".join(pieces).strip() and full.startswith(kept)
    assert len(processor.tokenizer(kept)["input_ids"]) < len(processor.tokenizer(full)["input_ids"]) - 10


def test_serve_without_web_says_where_the_api_server_is(capsys):
    with pytest.raises(SystemExit, match="add --web.*vllm serve DIR"):
        main(["serve"])
    with pytest.raises(SystemExit, match="--model .* or --api .*, not both"):
        main(["serve", "--web", "--model", "x", "--api", "http://127.0.0.1:1"])


def test_the_vllm_plugin_is_declared_for_every_vllm_process():
    plugins = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("piip_llava") == "piip_llava.serving.vllm_plugin:register"
