"""`piip-llava serve --web`: the web chat page, on a model in this process or on an OpenAI-compatible server."""

from __future__ import annotations

from ..chat_session import resolve_model_dir
from ..dtypes import DTYPES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the web chat page (--web)",
        description="Serve a web chat page about images: the bundled demo model by default, any converted "
        "checkpoint with --model, or an OpenAI-compatible server (vllm serve, see docs/serving.md) with --api. "
        "For an OpenAI-compatible API itself, run `vllm serve DIR` in the vLLM environment.",
    )
    parser.add_argument("--web", action="store_true", help="serve the gradio chat page (needs the [web] extra)")
    parser.add_argument("--model", help="model directory (default: the bundled demo model)")
    parser.add_argument("--api", metavar="URL", help="answer through this OpenAI-compatible server instead")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu", help="torch device of the in-process model")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-image-pixels", type=int, default=None, help="largest image accepted (25 megapixels)")
    parser.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    if not args.web:
        raise SystemExit(
            "error: piip-llava serve serves the web page: add --web. For an OpenAI-compatible API, run "
            "`vllm serve DIR` where vLLM and piip-llava are installed (docs/serving.md)."
        )
    if args.api and args.model:
        raise SystemExit("error: give --model (a model in this process) or --api (a server), not both.")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('error: the web page needs gradio: pip install "piip-llava[web]".') from None
    from ..serving.backends import DEFAULT_MAX_IMAGE_PIXELS, ChatBackendError, InProcessBackend, OpenAIBackend
    from ..serving.web import ChatPage

    if args.api:
        try:
            backend = OpenAIBackend(args.api, max_new_tokens=args.max_new_tokens)
        except ChatBackendError as error:
            raise SystemExit(f"error: {error}") from None
    else:
        from ..chat_session import ChatError
        from ..model_loading import ModelLoadingError

        try:
            backend = InProcessBackend(
                resolve_model_dir(args.model), device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens
            )
        except (ChatError, ModelLoadingError) as error:
            raise SystemExit(f"error: {error}") from None
    max_pixels = args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    page = ChatPage(backend, max_image_pixels=max_pixels).build()
    page.queue().launch(server_name=args.host, server_port=args.port, max_file_size="20mb", show_error=True)
    return 0
