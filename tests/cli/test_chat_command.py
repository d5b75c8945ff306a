"""`piip-llava chat` with bad inputs: one clear message and a non-zero exit, never a hang or a traceback."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from PIL import Image

from piip_llava.cli import main

# Long enough for a tiny model on a loaded machine; a hang (what a failing generate() used to cause) never ends.
CHAT_TIME_LIMIT_S = 120


@pytest.fixture
def image_file(tmp_path, rgb_image):
    path = tmp_path / "image.png"
    rgb_image.save(path)
    return path


def edited_model(tiny_model_dir, tmp_path, **text_or_top_level) -> str:
    """A copy of the tiny model whose config.json has some values replaced (`text_config__key` for text_config)."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in text_or_top_level.items():
        if key.startswith("text_config__"):
            config["text_config"][key.removeprefix("text_config__")] = value
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def run_chat(arguments: list[str]) -> int:
    """`piip-llava chat ARGUMENTS`, failing the test if it has not finished within CHAT_TIME_LIMIT_S."""
    outcome = {}

    def target():
        try:
            outcome["status"] = main(["chat", *arguments])
        except BaseException as error:  # noqa: BLE001 (reported to the test below)
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(CHAT_TIME_LIMIT_S)
    assert not worker.is_alive(), f"chat {arguments} still running after {CHAT_TIME_LIMIT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]


@pytest.mark.parametrize("wrong_setting", [{"image_token_index": 5}, {"projector_output_grid_size": 4}])
def test_a_failing_generation_ends_with_one_message_and_status_1(
    wrong_setting, tiny_model_dir, tmp_path, image_file, capsys
):
    # The model then finds no image token (the processor never writes token 5), or 16 image features for the
    # processor's 64 image tokens: generate() raises in its thread.
    model = edited_model(tiny_model_dir, tmp_path, **wrong_setting)
    status = run_chat(["--model", model, "--image", str(image_file), "--prompt", "What colour?", "--max-new-tokens", "4"])
    assert status == 1
    error = capsys.readouterr().err
    assert "the model could not answer" in error and "image tokens do not match" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_new_tokens_below_one_is_refused_before_loading(value, image_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_chat(["--image", str(image_file), "--prompt", "Hi", "--max-new-tokens", value])
    assert exit_info.value.code == 2
    assert "--max-new-tokens: must be at least 1" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_says_so(tiny_model_dir, image_file, capsys):
    status = run_chat(["--model", str(tiny_model_dir), "--image", str(image_file), "--prompt", "word " * 600])
    assert status == 1
    error = capsys.readouterr().err
    assert "filled the model's context" in error and "reads at most 512" in error


def test_the_image_placeholder_in_a_question_is_refused_with_a_reason(tiny_model_dir, image_file, capsys):
    status = run_chat(["--model", str(tiny_model_dir), "--image", str(image_file), "--prompt", "<image> What is it?"])
    assert status == 1
    error = capsys.readouterr().err
    assert "contains '<image>', the image placeholder" in error and "Traceback" not in error


def context_for_one_long_question(tiny_model_dir, question: str) -> int:
    """Prompt tokens of a fresh conversation asking `question` about an image."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[Image.new("RGB", (8, 8))], return_tensors="pt")["input_ids"].shape[1]


@pytest.mark.parametrize("restart", [True, False])
def test_an_interactive_session_that_fills_its_context_offers_to_start_over(
    restart, tiny_model_dir, tmp_path, image_file, capsys, monkeypatch
):
    long_question = "What colour is the circle? " * 6
    # Room for the long question alone (plus a short answer), not for it after a first turn.
    context = context_for_one_long_question(tiny_model_dir, long_question) + 4
    model = edited_model(tiny_model_dir, tmp_path, text_config__max_position_embeddings=context)
    replies = iter(["What colour?", "<image> again", long_question, "y" if restart else "n", ""])
    prompts = []

    def answer_prompt(prompt=""):
        prompts.append(prompt)
        return next(replies)

    monkeypatch.setattr("builtins.input", answer_prompt)
    status = run_chat(["--model", model, "--image", str(image_file), "--max-new-tokens", "3"])
    output = capsys.readouterr().out
    assert "Cannot ask that: the question contains '<image>'" in output  # the session goes on after it
    assert f"reads at most {context}" in output
    assert prompts[3].startswith("Start a new conversation about the same image")
    assert output.count("ASSISTANT:") == (2 if restart else 1)  # the first question, then the restarted one
    if restart:
        assert status == 0 and prompts[-1] == "USER: "
    else:
        assert status == 1 and "Conversation ended: the model's context is full." in output


def test_a_missing_or_broken_image_is_named(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for name, problem in (("missing.png", "does not exist"), ("broken.png", "cannot decode image")):
        status = run_chat(["--model", str(tiny_model_dir), "--image", str(tmp_path / name), "--prompt", "Hi"])
        assert status == 1
        assert problem in capsys.readouterr().err
