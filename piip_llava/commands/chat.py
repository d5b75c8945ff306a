"""`piip-llava chat`: talk about an image with a PIIP-LLaVA model, tokens streaming as they are generated."""

from __future__ import annotations

import argparse
import sys

from piip_llava.chat_session import ChatError, ChatSession, ContextFullError, UnusableQuestionError, resolve_model_dir
from piip_llava.dtypes import DTYPES


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
