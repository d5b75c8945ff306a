"""The bundled demo model: it loads from the package and answers the bundled examples correctly."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from piip_llava.commands.chat import BUNDLED_MODEL_DIR, ChatSession, load_image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "piip_llava" / "assets" / "examples"


@pytest.fixture(scope="module")
def demo_session_factory():
    model = AutoModelForImageTextToText.from_pretrained(BUNDLED_MODEL_DIR).eval()
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR)

    def new_session(image_path: Path) -> ChatSession:
        return ChatSession(model, processor, load_image(str(image_path)), {"max_new_tokens": 8, "do_sample": False})

    return new_session


def test_bundled_model_ships_within_its_size_budget():
    files = list(BUNDLED_MODEL_DIR.iterdir())
    assert (BUNDLED_MODEL_DIR / "model.safetensors").exists() and (BUNDLED_MODEL_DIR / "processor_config.json").exists()
    assert sum(path.stat().st_size for path in files) < 30 * 2**20


@pytest.mark.parametrize("example", json.loads((EXAMPLES_DIR / "examples.json").read_text()), ids=lambda e: e["image"])
def test_bundled_model_answers_the_bundled_examples(demo_session_factory, example):
    session = demo_session_factory(EXAMPLES_DIR / example["image"])
    answer = session.ask(example["prompt"], stream=io.StringIO())
    assert answer.strip().rstrip(".").lower() == example["answer"].lower()


def test_chat_command_uses_the_bundled_model_by_default():
    image = EXAMPLES_DIR / "example_shapes.png"
    completed = subprocess.run(
        [sys.executable, "-m", "piip_llava", "chat", "--image", str(image), "--prompt", "What colour is the circle?"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert completed.stdout.strip().lower().rstrip(".") == "red"
