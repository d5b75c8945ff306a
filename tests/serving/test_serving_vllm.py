"""vLLM's OpenAI-compatible server on the bundled model: the plugin, answers equal to `generate()`, bad input.

The server runs in the separate vLLM environment (`make .venv-vllm/installed`, see docs/serving.md),
started as a user would start it, `vllm serve DIR` (our package installed there, nothing else
configured: the `vllm.general_plugins` entry point makes the architecture known); offline inference,
`LLM(model=DIR)`, runs there too, in a script that imports nothing of ours. The reference answers
come from `generate()` in this test's own environment. Without that environment these tests skip, saying
how to build it; `.ci/run` builds it and sets PIIP_REQUIRE_SERVING=1, under which a missing
environment fails instead.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from server_process import (
    MAX_IMAGE_PIXELS,
    REPO_ROOT,
    VLLM_ENGINE_OPTIONS,
    VLLM_ENVIRONMENT,
    VLLM_PYTHON,
    log_tail,
    running_vllm_server,
)

from piip_llava.chat_session import BUNDLED_MODEL_DIR
from piip_llava.conversation import ALLOW_TEXT_ONLY

EXAMPLES_DIR = REPO_ROOT / "piip_llava" / "assets" / "examples"
MAX_TOKENS = 16

if not VLLM_PYTHON.exists() and os.environ.get("PIIP_REQUIRE_SERVING") != "1":
    pytest.skip(
        f"the vLLM environment is missing ({VLLM_PYTHON}): build it with `make .venv-vllm/installed`",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"PIIP_REQUIRE_SERVING=1 but the vLLM environment {VLLM_PYTHON} is missing.")
    with running_vllm_server(BUNDLED_MODEL_DIR, tmp_path_factory.mktemp("vllm") / "server.log") as url:
        yield url


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def chat_request(url: str, messages: list[dict], **extra) -> tuple[int, dict]:
    body = {
        "model": str(BUNDLED_MODEL_DIR),
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "return_token_ids": True,
        **extra,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def ask_server(url: str, image_path: Path, prompt: str) -> tuple[list[int], str]:
    """The generated token ids and text of the server's answer."""
    messages = [{"role": "user", "content": [image_part(image_path.read_bytes()), {"type": "text", "text": prompt}]}]
    status, reply = chat_request(url, messages)
    assert status == 200, reply
    choice = reply["choices"][0]
    return choice["token_ids"], choice["message"]["content"]


@pytest.fixture(scope="module")
def generate_answer():
    """`generate()`'s greedy answer in this process, as a user of transformers gets it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED_MODEL_DIR).eval()

    def answer(image_path: Path | None, prompt: str) -> tuple[list[int], str]:
        content = [{"type": "text", "text": prompt}]
        if image_path is None:
            inputs = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", **{ALLOW_TEXT_ONLY: True},
            )
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, *content]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            with Image.open(image_path) as image:
                inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()  # with the end-of-sequence token, as vLLM's
        return new_tokens, processor.decode(new_tokens, skip_special_tokens=True)

    return answer


def bundled_examples(count: int) -> list[dict]:
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    # One question per image first, then more, so every bundled image is asked about.
    seen, first, rest = set(), [], []
    for example in examples:
        (rest if example["image"] in seen else first).append(example)
        seen.add(example["image"])
    return (first + rest)[:count]


def test_offline_llm_answers_as_generate_does_with_nothing_imported_from_piip_llava(tmp_path, generate_answer):
    """`LLM(model=DIR).chat(...)` in the vLLM environment: the plugin alone makes the model known.

    First in the file, so that it runs before the module's server starts.
    """
    examples = bundled_examples(4)
    questions = [{"image": str(EXAMPLES_DIR / example["image"]), "prompt": example["prompt"]} for example in examples]
    request = {"model": str(BUNDLED_MODEL_DIR), "engine": VLLM_ENGINE_OPTIONS, "max_tokens": MAX_TOKENS,
               "questions": questions}
    request_path, answers_path, log_path = tmp_path / "request.json", tmp_path / "answers.json", tmp_path / "llm.log"
    request_path.write_text(json.dumps(request))
    script = Path(__file__).with_name("vllm_offline_chat.py")
    with open(log_path, "wb") as log:
        # Run from tmp_path so that the script imports the installed packages, as a user's script would.
        finished = subprocess.run(
            [str(VLLM_PYTHON), str(script), str(request_path), str(answers_path)], check=False, cwd=tmp_path,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENVIRONMENT}, timeout=900,
        )
    assert finished.returncode == 0, log_tail(log_path)
    answers = json.loads(answers_path.read_text())
    for example, question, answer in zip(examples, questions, answers, strict=True):
        expected_tokens, expected_text = generate_answer(Path(question["image"]), question["prompt"])
        assert answer["token_ids"] == expected_tokens
        assert answer["text"].strip() == expected_text.strip() == example["answer"]


@pytest.mark.parametrize("example", bundled_examples(4), ids=lambda example: f"{example['image']}:{example['question']}")
def test_the_server_answers_as_generate_does(server_url, generate_answer, example):
    image_path = EXAMPLES_DIR / example["image"]
    expected_tokens, expected_text = generate_answer(image_path, example["prompt"])
    tokens, text = ask_server(server_url, image_path, example["prompt"])
    assert tokens == expected_tokens
    # vLLM's incremental detokenizer keeps the first word's leading space, which decode() drops.
    assert text.strip() == expected_text.strip() == example["answer"]


def test_two_requests_at_once_get_their_own_answers(server_url, generate_answer):
    requests = [(EXAMPLES_DIR / example["image"], example["prompt"]) for example in bundled_examples(2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda request: ask_server(server_url, *request), requests))
    expected = [generate_answer(*request) for request in requests]
    assert [tokens for tokens, _ in answers] == [tokens for tokens, _ in expected]
    assert answers[0][1] != answers[1][1]


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_keeps_serving(server_url, generate_answer):
    question = {"type": "text", "text": "What colour is the circle?"}
    not_an_image = [{"role": "user", "content": [image_part(b"this is a text file, not an image"), question]}]
    oversized = [{"role": "user", "content": [image_part(png_bytes(6000, 5000)), question]}]
    refusals = {
        "not an image": (not_an_image, "cannot identify image file"),
        "oversized": (oversized, f"exceed the maximum of {MAX_IMAGE_PIXELS} pixels"),
        "no message": ([], "empty conversation"),
        # Both refused by the model's chat template, which vLLM reports as a 400 with the template's reason.
        "no image": ([{"role": "user", "content": [question]}], "answers questions about an image"),
        "an empty message": ([{"role": "user", "content": ""}], "answers questions about an image"),
    }
    example = bundled_examples(1)[0]
    image_path = EXAMPLES_DIR / example["image"]
    expected = generate_answer(image_path, example["prompt"])[0]
    for name, (messages, reason) in refusals.items():
        status, reply = chat_request(server_url, messages)
        assert status == 400, (name, reply)
        assert reason in reply["error"]["message"], (name, reply)
        assert ask_server(server_url, image_path, example["prompt"])[0] == expected, f"after {name}"


def test_a_text_only_question_is_answered_like_generate_when_the_request_allows_it(server_url, generate_answer):
    """`chat_template_kwargs: {"allow_text_only": true}` lifts the chat template's refusal for one request."""
    question = "What colour is the circle?"
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    status, reply = chat_request(server_url, messages, chat_template_kwargs={ALLOW_TEXT_ONLY: True})
    assert status == 200, reply
    assert reply["choices"][0]["token_ids"] == generate_answer(None, question)[0]
