"""`piip-llava chat`: talk about an image with a PIIP-LLaVA model, tokens streaming as they are generated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event, Thread

from transformers.utils import logging

from piip_llava.conversation import IMAGE_PLACEHOLDER
from piip_llava.dtypes import DTYPES

logger = logging.get_logger(__name__)

# Where the bundled demo model lives once it has been trained and shipped with the package.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"



def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="ask questions about an image",
        description="Chat about an image. With --prompt, answer once; otherwise start an interactive session "
        "(empty line or Ctrl-D to quit). Exit status: 0 when every question was answered, 1 on an error "
        "(message on stderr), 2 for bad arguments.",
    )
    parser.add_argument("--model", help="model directory (default: the bundled demo model)")
    parser.add_argument("--image", required=True, help="image file to talk about")
    parser.add_argument("--prompt", help="one question; without it the session is interactive")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype the model runs in (default: float32; bfloat16/float16 halve the memory)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="longest answer, in tokens (default: 128; less when the model's context runs out)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="sampling temperature; 0 (the default) means greedy decoding")
    parser.set_defaults(handler=run_chat)


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


def build_session(args) -> ChatSession:
    from piip_llava.images import read_image
    from piip_llava.model_loading import load_model_and_processor

    image = read_image(args.image)
    model, processor = load_model_and_processor(resolve_model_dir(args.model), device=args.device, dtype=args.dtype)
    options = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature)
    else:
        options.update(do_sample=False)
    return ChatSession(model, processor, image, options)


def offer_restart(error: ContextFullError) -> bool:
    """Say that the context is full and ask whether to start a new conversation about the image."""
    print(f"{error}")
    try:
        reply = input("Start a new conversation about the same image and ask this question again? [y/N] ")
    except EOFError:
        return False
    return reply.strip().lower() in ("y", "yes")


def interactive_session(session: ChatSession) -> int:
    """Questions from stdin until an empty line or end of input; 0, or 1 when a question went unanswered."""
    print("Ask about the image (empty line or Ctrl-D to quit).")
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            return 0
        if not question:
            return 0
        try:
            turn = session.prepare(question)
        except UnusableQuestionError as error:
            print(f"Cannot ask that: {error}")
            continue
        except ContextFullError as error:
            if not offer_restart(error):
                print("Conversation ended: the model's context is full.")
                return 1
            session.restart()
            turn = session.prepare(question)  # too long even on its own: a ContextFullError for run_chat
        sys.stdout.write("ASSISTANT: ")
        session.answer(turn)


def run_chat(args) -> int:
    from piip_llava.images import UnreadableImageError
    from piip_llava.model_loading import ModelLoadingError

    try:
        session = build_session(args)
        if args.prompt is not None:
            session.ask(args.prompt)
            return 0
        return interactive_session(session)
    except (ChatError, ModelLoadingError, UnreadableImageError) as error:
        print(f"piip-llava chat: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
