"""A conversation about one image with a PIIP-LLaVA model: questions checked against the model's
context, answers streamed as they are generated.

`piip-llava chat` and the web page (`piip-llava serve --web`) both talk to the model through
`ChatSession`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event, Thread

from .conversation import IMAGE_PLACEHOLDER

# Where the bundled demo model lives once it has been trained and shipped with the package.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"


class ChatError(Exception):
    """A turn that cannot be answered; the message says why."""


class UnusableQuestionError(ChatError):
    """A question the chat cannot put to the model as it is (the session can go on with another one)."""


class ContextFullError(ChatError):
    """The conversation and the new question leave no room in the model's context for an answer."""


def resolve_model_dir(model: str | None) -> str:
    if model is not None:
        return model
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return str(BUNDLED_MODEL_DIR)
    raise ChatError(
        "no model given and the bundled demo model is not installed; pass --model DIR "
        "(a saved or converted PIIP-LLaVA directory, see README 'Using the released checkpoints')."
    )


@dataclass
class PreparedTurn:
    """A question checked and tokenised against the conversation so far, ready to be answered."""

    messages: list[dict]
    inputs: dict
    max_new_tokens: int


class ChatSession:
    """A multi-turn conversation about one image; the image goes with the first user turn.

    `messages` holds the turns so far (transformers' message format); the web page rebuilds a
    session from its own history before each answer.
    """

    def __init__(self, model, processor, image, generation_options: dict, messages: list[dict] | None = None):
        self.model = model
        self.processor = processor
        self.image = image
        self.generation_options = generation_options
        self.messages: list[dict] = list(messages or [])

    @property
    def context_length(self) -> int | None:
        """Tokens the language model attends to at most (prompt and answer together), if its config says."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        return getattr(text_config, "max_position_embeddings", None)

    def restart(self) -> None:
        """Forget the conversation; the next question starts a new one about the same image."""
        self.messages = []

    def prepare(self, question: str) -> PreparedTurn:
        """Check `question` and build the model inputs for it; nothing is generated or remembered yet."""
        placeholder = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        if placeholder in question:
            raise UnusableQuestionError(
                f"the question contains {placeholder!r}, the image placeholder; the image is already part of the "
                f"conversation, so ask without writing {placeholder!r}."
            )
        if not self.messages:
            content = [{"type": "image"}, {"type": "text", "text": question}]
        else:
            content = [{"type": "text", "text": question}]
        messages = [*self.messages, {"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        try:
            inputs = self.processor(text=[prompt], images=[self.image], return_tensors="pt")
        except ValueError as error:
            raise UnusableQuestionError(f"the processor cannot prepare this question: {error}") from error
        max_new_tokens = self.generation_options["max_new_tokens"]
        if self.context_length is not None:
            prompt_tokens = inputs["input_ids"].shape[1]
            room = self.context_length - prompt_tokens
            if room < 1:
                raise ContextFullError(
                    f"the conversation has filled the model's context: with this question it takes {prompt_tokens} "
                    f"tokens (the image counts {getattr(self.processor, 'num_image_tokens', '?')}), and the model "
                    f"reads at most {self.context_length}."
                )
            max_new_tokens = min(max_new_tokens, room)
        return PreparedTurn(messages, inputs.to(self.model.device), max_new_tokens)

    def stream_answer(self, turn: PreparedTurn, stop: Event | None = None) -> Iterator[str]:
        """Answer a prepared turn, yielding the answer's text piece by piece as it is generated.

        `generate` runs in a worker thread that feeds the streamer; whatever it raises ends the stream
        and is raised here as a `ChatError`, so a failed generation never leaves the reader waiting.
        Setting `stop` (or closing the generator) ends generation at the next token; the turn is then
        recorded in `messages` with what was generated until then.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = Event()  # set when the reader is done, so the generating thread does not run on
        stopping = StoppingCriteriaList([StopWhenSet(closed, *([stop] if stop is not None else []))])
        options = {**self.generation_options, "max_new_tokens": turn.max_new_tokens}
        failures: list[Exception] = []

        def generate() -> None:
            try:
                self.model.generate(**turn.inputs, **options, streamer=streamer, stopping_criteria=stopping)
            except Exception as error:  # noqa: BLE001 (handed to the reading thread, which reports it)
                failures.append(error)
                streamer.end()

        # A daemon thread: Ctrl-C in the reading thread ends the program without waiting for generation.
        worker = Thread(target=generate, daemon=True)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            closed.set()
            worker.join()
            if not failures:
                answer = "".join(pieces).strip()
                self.messages = [*turn.messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        if failures:
            error = failures[0]
            raise ChatError(f"the model could not answer: {type(error).__name__}: {error}") from error

    def stream(self, question: str, stop: Event | None = None) -> Iterator[str]:
        """Check and answer one question, yielding the answer piece by piece (see `stream_answer`)."""
        yield from self.stream_answer(self.prepare(question), stop)

    def answer(self, turn: PreparedTurn, stream=None) -> str:
        """Answer a prepared turn, writing the answer to `stream` (default `sys.stdout`) as it comes."""
        stream = sys.stdout if stream is None else stream
        for piece in self.stream_answer(turn):
            stream.write(piece)
            stream.flush()
        stream.write("\n")
        return self.messages[-1]["content"][0]["text"]

    def ask(self, question: str, stream=None) -> str:
        """Answer one turn, writing the answer to `stream` (the current `sys.stdout` by default) as it is generated."""
        return self.answer(self.prepare(question), stream)


class StopWhenSet:
    """A stopping criterion (transformers' `StoppingCriteria` call) ending generation once any event is set."""

    def __init__(self, *events: Event):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
