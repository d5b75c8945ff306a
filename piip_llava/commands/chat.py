"""`piip-llava chat`: talk about an image with a PIIP-LLaVA model, tokens streaming as they are generated."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from threading import Event, Thread

from transformers.utils import logging

logger = logging.get_logger(__name__)

# Where the bundled demo model lives once it has been trained and shipped with the package.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="ask questions about an image",
        description="Chat about an image. With --prompt, answer once; otherwise start an interactive session "
        "(empty line or Ctrl-D to quit).",
    )
    parser.add_argument("--model", help="model directory (default: the bundled demo model)")
    parser.add_argument("--image", required=True, help="image file to talk about")
    parser.add_argument("--prompt", help="one question; without it the session is interactive")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    parser.set_defaults(handler=run_chat)


def resolve_model_dir(model: str | None) -> Path:
    if model is not None:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: {path} is not a model directory (no config.json).")
        return path
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return BUNDLED_MODEL_DIR
    raise SystemExit(
        "error: no model given and the bundled demo model is not installed; pass --model DIR "
        "(a saved or converted PIIP-LLaVA directory, see README 'Using the released checkpoints')."
    )


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"error: image {path} does not exist.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: cannot read image {path}: {error}") from None


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

    def stream(self, question: str, stop: Event | None = None) -> Iterator[str]:
        """Answer one turn, yielding the answer's text piece by piece as it is generated.

        Setting `stop` (or closing the generator) ends generation at the next token; the turn is
        recorded in `messages` with what was generated until then.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        closed = Event()  # set when this generator ends early, so the generating thread does not run on
        if not self.messages:
            content = [{"type": "image"}, {"type": "text", "text": question}]
        else:
            content = [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[prompt], images=[self.image], return_tensors="pt").to(self.model.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = {
            **inputs,
            **self.generation_options,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([StopWhenSet(closed, *([stop] if stop is not None else []))]),
        }
        worker = Thread(target=self.model.generate, kwargs=options)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            closed.set()
            worker.join()
            answer = "".join(pieces).strip()
            self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})

    def ask(self, question: str, stream=None) -> str:
        """Answer one turn, writing the answer to `stream` (the current `sys.stdout` by default) as it is generated."""
        stream = sys.stdout if stream is None else stream
        for piece in self.stream(question):
            stream.write(piece)
            stream.flush()
        stream.write("\n")
        return self.messages[-1]["content"][0]["text"]


class StopWhenSet:
    """A stopping criterion (transformers' `StoppingCriteria` call) ending generation once any event is set."""

    def __init__(self, *events: Event):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def build_session(args) -> ChatSession:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import piip_llava  # noqa: F401  (registers the model classes)

    model_dir = resolve_model_dir(args.model)
    image = load_image(args.image)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    options = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature)
    else:
        options.update(do_sample=False)
    return ChatSession(model, processor, image, options)


def run_chat(args) -> int:
    session = build_session(args)
    if args.prompt is not None:
        session.ask(args.prompt)
        return 0
    print("Ask about the image (empty line or Ctrl-D to quit).")
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            break
        if not question:
            break
        sys.stdout.write("ASSISTANT: ")
        session.ask(question)
    return 0
