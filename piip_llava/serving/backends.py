"""Where the web page's answers come from: the model in this process, or an OpenAI-compatible server.

Both backends answer the same question the same way: a conversation about one image (sent with
the first user turn, as LLaVA was trained), streamed piece by piece, stoppable between tokens.
User mistakes (a file that is not an image, an image too large) raise `ChatInputError` with a
message meant for the page; a server that refuses or cannot be reached raises `ChatBackendError`.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

from PIL import Image, UnidentifiedImageError

from ..images import UnreadableImageError, read_image

# 5000 x 5000: far above any PIIP input size, far below what would exhaust memory when decoded.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000


class ChatInputError(ValueError):
    """Input the user can fix: the message says what is wrong and what is accepted."""


class ChatBackendError(RuntimeError):
    """The model could not answer: the server refused the request or could not be reached."""


def load_chat_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The RGB image in `path`, refusing files that are not images and images over `max_pixels`.

    The size is read from the header before any pixel is decoded, so an oversized image costs
    nothing to refuse.
    """
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ChatInputError(
                    f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
                    f"images up to {max_pixels / 1e6:.1f} megapixels are accepted."
                )
            return read_image(image, name=name)
    except (UnidentifiedImageError, UnreadableImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise ChatInputError(f"{name} is not an image that can be read (PNG, JPEG, WebP, ...): {error}") from None


@dataclass
class Conversation:
    """The image talked about and the finished (question, answer) turns."""

    image: Image.Image | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict]:
        """The finished turns in transformers' message format, the image with the first user turn."""
        messages = []
        for position, (question, answer) in enumerate(self.turns):
            content = [{"type": "text", "text": question}]
            if position == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages


class InProcessBackend:
    """Answers with a model loaded in this process (`generate()` with a token streamer)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 128):
        from ..model_loading import load_model_and_processor

        self.model_dir = Path(model_dir)
        self.model, self.processor = load_model_and_processor(self.model_dir, device=device, dtype=dtype)
        self.max_new_tokens = max_new_tokens

    @property
    def model_name(self) -> str:
        return self.model_dir.resolve().name

    def describe(self) -> str:
        """The model's name and its parameters, for the page's header."""
        model = self.model.model
        millions = {
            "vision tower": sum(p.numel() for p in model.vision_tower.parameters()) / 1e6,
            "projector": sum(p.numel() for p in model.multi_modal_projector.parameters()) / 1e6,
            "language model": sum(p.numel() for p in model.language_model.parameters()) / 1e6,
        }
        total = sum(p.numel() for p in self.model.parameters()) / 1e6
        parts = ", ".join(f"{name} {count:.2f} M" for name, count in millions.items())
        config = self.model.config
        return (
            f"**{self.model_name}** ({type(self.model).__name__}, in this process): {total:.2f} M parameters "
            f"({parts}); {config.num_image_tokens} image tokens per image; "
            f"{self.model.dtype} on {self.model.device}; greedy decoding, up to {self.max_new_tokens} new tokens."
        )

    def stream(self, conversation: Conversation, question: str, stop: Event) -> Iterator[str]:
        from ..chat_session import ChatSession

        session = ChatSession(
            self.model,
            self.processor,
            conversation.image,
            {"max_new_tokens": self.max_new_tokens, "do_sample": False},
            messages=conversation.messages(),
        )
        yield from session.stream(question, stop)


class OpenAIBackend:
    """Answers through an OpenAI-compatible server (`vllm serve DIR` with our plugin), streamed."""

    def __init__(self, url: str, model: str | None = None, max_new_tokens: int = 128, timeout_s: float = 300):
        self.url = url.rstrip("/")
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.model = model or self.served_model()

    def served_model(self) -> str:
        """The id of the first model the server lists (vLLM serves one)."""
        with self.open("GET", "/v1/models") as response:
            models = json.loads(response.read())["data"]
        if not models:
            raise ChatBackendError(f"The server at {self.url} serves no model.")
        return models[0]["id"]

    @property
    def model_name(self) -> str:
        return Path(self.model).name

    def describe(self) -> str:
        return (
            f"**{self.model_name}** (served at {self.url}); "
            f"greedy decoding, up to {self.max_new_tokens} new tokens."
        )

    def open(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            raise ChatBackendError(f"The server refused the request ({error.code}): {error_message(error)}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise ChatBackendError(f"Cannot reach the server at {self.url}: {error}") from None

    def request_messages(self, conversation: Conversation, question: str) -> list[dict]:
        buffer = io.BytesIO()
        conversation.image.save(buffer, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        messages = []
        for position, (user, assistant) in enumerate([*conversation.turns, (question, None)]):
            content = [{"type": "text", "text": user}]
            if position == 0:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
            messages.append({"role": "user", "content": content})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        return messages

    def stream(self, conversation: Conversation, question: str, stop: Event) -> Iterator[str]:
        body = {
            "model": self.model,
            "messages": self.request_messages(conversation, question),
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
            "stream": True,
        }
        # Leaving the loop closes the connection, which makes vLLM abort the request.
        with self.open("POST", "/v1/chat/completions", body) as response:
            for line in response:
                if stop.is_set():
                    return
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise ChatBackendError(f"The server failed while answering: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def error_message(error: urllib.error.HTTPError) -> str:
    """The reason an OpenAI-compatible server gave for refusing a request."""
    raw = error.read().decode(errors="replace")
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.strip() or error.reason
