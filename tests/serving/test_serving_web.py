"""`piip-llava serve --web` driven in a real headless Chromium: upload, ask, streamed answer, follow-up, bad input.

Needs the web environment (`make .venv-web/installed`: gradio and Playwright) and Debian's
chromium at /usr/bin/chromium (Playwright's own browser download is not used). Without them
these tests skip, saying what is missing; `.ci/run` installs both and sets
PIIP_REQUIRE_SERVING=1, under which a missing piece fails instead. With PIIP_UPDATE_SCREENSHOT=1
the conversation's screenshot is written to docs/web_chat.png (`make web-screenshot`).
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from server_process import REPO_ROOT, VLLM_PYTHON, free_port, running_server, running_vllm_server

CHROMIUM = Path(os.environ.get("PIIP_CHROMIUM", "/usr/bin/chromium"))
EXAMPLES_DIR = REPO_ROOT / "piip_llava" / "assets" / "examples"
SCREENSHOT = REPO_ROOT / "docs" / "web_chat.png"
ANSWER_TIMEOUT_MS = 120_000


def missing_pieces() -> list[str]:
    missing = []
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} package")
    if not CHROMIUM.exists():
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium)")
    return missing


if missing_pieces() and os.environ.get("PIIP_REQUIRE_SERVING") != "1":
    pytest.skip(
        f"the web test needs {', '.join(missing_pieces())}: run it with `make test-serving`", allow_module_level=True
    )


@contextmanager
def web_page(log_dir: Path, *options: str):
    """`piip-llava serve --web` with `options`, as a user starts it; yields the page's URL."""
    if missing_pieces():
        pytest.fail(f"PIIP_REQUIRE_SERVING=1 but {', '.join(missing_pieces())} is missing.")
    port = free_port()
    command = [sys.executable, "-m", "piip_llava", "serve", "--web", "--port", str(port), "--max-new-tokens", "24"]
    url = f"http://127.0.0.1:{port}/"
    with running_server([*command, *options], url, log_dir / "page.log", timeout_s=300):
        yield url


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    with web_page(tmp_path_factory.mktemp("web")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, page_url):
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    page.goto(page_url)
    page.wait_for_selector("#message textarea")
    yield page
    page.close()


@pytest.fixture(scope="module")
def chat_answers():
    """What the same model answers in this process, turn by turn (the chat command's own session)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from piip_llava.chat_session import BUNDLED_MODEL_DIR, ChatSession
    from piip_llava.images import read_image

    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED_MODEL_DIR).eval()

    def answers(image_path: Path, questions: list[str]) -> list[str]:
        session = ChatSession(model, processor, read_image(image_path), {"max_new_tokens": 24, "do_sample": False})
        return [session.ask(question, stream=io.StringIO()) for question in questions]

    return answers


def send(page, text: str, file: Path | None = None) -> None:
    if file is not None:
        page.set_input_files("#message input[type=file]", str(file))
        page.wait_for_function("() => !document.querySelector('#message').innerText.includes('Uploading')")
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def watch_last_answer(page) -> None:
    """Record every text the chat's last bot message shows, to see the answer arrive piece by piece."""
    page.evaluate(
        """() => {
            window.answerTexts = [];
            const chat = document.querySelector('#chat');
            new MutationObserver(() => {
                const bots = chat.querySelectorAll('[data-testid="bot"]');
                if (bots.length) window.answerTexts.push(bots[bots.length - 1].innerText.trim());
            }).observe(chat, {subtree: true, childList: true, characterData: true});
        }"""
    )


def wait_for_answer(page, turn: int) -> str:
    """The text of the `turn`-th bot message (1-based) once the page says it is done."""
    page.wait_for_function(
        """(turn) => document.querySelectorAll('#chat [data-testid="bot"]').length >= turn
                 && !document.querySelector('#status').innerText.includes('Answering')""",
        arg=turn,
        timeout=ANSWER_TIMEOUT_MS,
    )
    bots = page.locator('#chat [data-testid="bot"]')
    return bots.nth(turn - 1).inner_text().strip()


def status(page) -> str:
    return page.inner_text("#status").strip()


def test_upload_ask_stream_and_follow_up_in_a_real_browser(page, chat_answers):
    image = EXAMPLES_DIR / "example_shapes.png"
    questions = ["Tell me about the shapes.", "What is written in the image?"]
    expected = chat_answers(image, questions)

    header = page.inner_text("#model-header")
    assert "demo_model" in header and "M parameters" in header and "up to 24 new tokens" in header

    watch_last_answer(page)
    send(page, questions[0], image)
    assert wait_for_answer(page, 1) == expected[0]
    shown = [text for text in dict.fromkeys(page.evaluate("window.answerTexts")) if text]
    assert len(shown) >= 2 and shown[-1] == expected[0]  # it arrived in pieces, each a prefix of the answer
    assert all(expected[0].startswith(text) for text in shown)

    send(page, questions[1])  # a follow-up about the same image, no new upload
    assert wait_for_answer(page, 2) == expected[1]
    assert status(page) == ""

    screenshot = page.screenshot(full_page=True)
    assert len(screenshot) > 10_000
    if os.environ.get("PIIP_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(screenshot)

    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 0")
    send(page, questions[1])
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Attach an image')")


def png_file(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), "white").save(path)
    return path


def test_bad_input_gets_a_clear_message_and_loses_nothing(page, tmp_path, chat_answers):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not an image")
    oversized = png_file(tmp_path / "huge.png", 6000, 5000)

    send(page, "What colour is the circle?")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Attach an image')")

    send(page, "What colour is the circle?", not_an_image)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('is not an image')")
    assert "notes.png" in status(page)
    assert page.input_value("#message textarea") == "What colour is the circle?"  # the question is kept

    page.reload()
    page.wait_for_selector("#message textarea")
    send(page, "What colour is the circle?", oversized)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('megapixels')")
    assert "6000x5000" in status(page)

    page.reload()
    page.wait_for_selector("#message textarea")
    image = EXAMPLES_DIR / "example_text.png"
    send(page, "   ", image)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Type a question')")
    assert page.locator("#chat [data-testid=\"bot\"]").count() == 0

    # The page still answers, with the image that stayed attached.
    page.fill("#message textarea", "What is written in the image?")
    page.press("#message textarea", "Enter")
    assert wait_for_answer(page, 1) == chat_answers(image, ["What is written in the image?"])[0]


def test_the_page_answers_through_the_vllm_server_with_api(browser, tmp_path, chat_answers):
    """`--api URL`: the page streams vLLM's answers, which equal the in-process model's."""
    from piip_llava.chat_session import BUNDLED_MODEL_DIR

    if not VLLM_PYTHON.exists():
        if os.environ.get("PIIP_REQUIRE_SERVING") == "1":
            pytest.fail(f"PIIP_REQUIRE_SERVING=1 but the vLLM environment {VLLM_PYTHON} is missing.")
        pytest.skip(f"the vLLM environment is missing ({VLLM_PYTHON}): build it with `make .venv-vllm/installed`")
    image = EXAMPLES_DIR / "example_number.png"
    questions = ["What is written in the image?", "What shape is the orange object?"]
    expected = chat_answers(image, questions)
    with (
        running_vllm_server(BUNDLED_MODEL_DIR, tmp_path / "vllm.log") as api_url,
        web_page(tmp_path, "--api", api_url) as page_url,
    ):
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(page_url)
        page.wait_for_selector("#message textarea")
        assert f"served at {api_url}" in page.inner_text("#model-header")
        send(page, questions[0])  # no image: the page says so, whatever answers it
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Attach an image')")
        send(page, questions[0], image)
        assert wait_for_answer(page, 1) == expected[0]
        send(page, questions[1])
        assert wait_for_answer(page, 2) == expected[1]
        page.close()


class ScriptedBackend:
    """A backend answering with fixed pieces, pressing the page's Stop after `stop_after` of them."""

    def __init__(self, page_logic, pieces: list[str], stop_after: int | None = None, fail: bool = False):
        self.page_logic, self.pieces, self.stop_after, self.fail = page_logic, pieces, stop_after, fail

    def stream(self, conversation, question, stop):
        from piip_llava.serving.backends import ChatBackendError

        if self.fail:
            raise ChatBackendError("Cannot reach the server at http://127.0.0.1:9: connection refused")
        for count, piece in enumerate(self.pieces, start=1):
            if stop.is_set():
                return
            yield piece
            if count == self.stop_after:
                self.page_logic.stop("session")


def test_stop_keeps_the_answer_so_far_and_the_conversation_goes_on(tmp_path):
    from piip_llava.serving.web import ChatPage

    image = png_file(tmp_path / "photo.png", 32, 32)
    logic = ChatPage(backend=None)
    logic.backend = ScriptedBackend(logic, ["square", " blue", " left", " and more"], stop_after=2)
    *_, (chat, _, status_line, conversation) = logic.respond(
        {"text": "Tell me about the shapes.", "files": [str(image)]}, None, [], "session"
    )
    assert status_line == "Stopped." and chat[-1] == {"role": "assistant", "content": "square blue"}
    assert conversation.turns == [("Tell me about the shapes.", "square blue")]

    logic.backend = ScriptedBackend(logic, ["red"])
    *_, (chat, _, status_line, conversation) = logic.respond({"text": "Colour?", "files": []}, conversation, chat, "session")
    assert status_line == "" and conversation.turns[-1] == ("Colour?", "red") and len(conversation.turns) == 2


def test_a_server_that_fails_is_said_and_the_message_is_given_back(tmp_path):
    from piip_llava.serving.web import ChatPage

    image = png_file(tmp_path / "photo.png", 32, 32)
    logic = ChatPage(backend=None)
    logic.backend = ScriptedBackend(logic, [], fail=True)
    message = {"text": "What colour is the circle?", "files": [str(image)]}
    *_, (chat, box, status_line, conversation) = logic.respond(message, None, [], "session")
    assert chat == [] and box["value"] == message
    assert "Cannot reach the server" in status_line and conversation.turns == []
