"""The web chat page of `piip-llava serve --web`: gradio, talking to one backend.

A conversation is about one image, attached to the first question (LLaVA's single-image
format); later questions follow up on it. Answers stream in as they are generated; Stop ends
the answer being generated, Clear starts a new conversation. Anything the user must fix (no
question, no image, a file that is not an image, an image too large, a second image) is said in
the status line under the chat, and the message box keeps what was typed and attached.
"""

# No `from __future__ import annotations` here: gradio injects `gr.Request` by reading the handlers'
# annotations as real types.
import json
from pathlib import Path
from threading import Event

from .backends import DEFAULT_MAX_IMAGE_PIXELS, ChatBackendError, ChatInputError, Conversation, load_chat_image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

# Stable handles for the browser test and for anyone scripting the page.
ELEMENT_IDS = {
    "header": "model-header",
    "chat": "chat",
    "message": "message",
    "status": "status",
    "stop": "stop",
    "clear": "clear",
}


def bundled_examples() -> list[list]:
    """One (message, ) row per bundled example: the question with its image attached."""
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    return [[{"text": example["question"], "files": [str(EXAMPLES_DIR / example["image"])]}] for example in examples]


def attached_path(file) -> str:
    """The local path of a file attached in the message box (gradio gives a path or a file dict)."""
    return file if isinstance(file, str) else file["path"]


class ChatPage:
    """The page's behaviour, kept apart from its layout so it can be read (and tested) alone."""

    def __init__(self, backend, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.backend = backend
        self.max_image_pixels = max_image_pixels
        self.stop_events: dict[str, Event] = {}

    def respond(self, message: dict, conversation: Conversation | None, chat: list, session: str):
        """Answer `message` ({"text", "files"}), yielding (chat, message box, status, conversation) as it streams.

        On a mistake the chat is unchanged and the message box keeps its content.
        """
        import gradio as gr

        conversation = conversation or Conversation()
        question = (message or {}).get("text", "").strip()
        files = (message or {}).get("files") or []
        try:
            image = self.new_image(files, conversation)
            if not question:
                raise ChatInputError("Type a question about the image.")
        except ChatInputError as error:
            yield chat, gr.update(), f"⚠️ {error}", conversation
            return
        if image is not None:
            conversation = Conversation(image=image)
            chat = [{"role": "user", "content": {"path": attached_path(files[0])}}]  # the image, shown in the chat
        stop = self.stop_events[session] = Event()
        chat = [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        yield chat, gr.update(value=None), "Answering…", conversation
        try:
            for piece in self.backend.stream(conversation, question, stop):
                answer += piece
                chat[-1] = {"role": "assistant", "content": answer}
                yield chat, gr.update(), "Answering…", conversation
        except ChatBackendError as error:
            yield chat[: -3 if image is not None else -2], gr.update(value=message), f"⚠️ {error}", conversation
            return
        answer = answer.strip()
        chat[-1] = {"role": "assistant", "content": answer}
        conversation = Conversation(image=conversation.image, turns=[*conversation.turns, (question, answer)])
        yield chat, gr.update(), "Stopped." if stop.is_set() else "", conversation

    def new_image(self, files: list, conversation: Conversation):
        """The image attached to this message, or None when it follows up on the conversation's image."""
        if len(files) > 1:
            raise ChatInputError("Attach one image: a conversation is about a single image.")
        if files:
            if conversation.turns:
                raise ChatInputError("This conversation is about the image already sent; press Clear to ask about another.")
            return load_chat_image(attached_path(files[0]), self.max_image_pixels)
        if conversation.image is None:
            raise ChatInputError("Attach an image to ask about (the paperclip in the message box), or pick an example.")
        return None

    def stop(self, session: str) -> str:
        event = self.stop_events.get(session)
        if event is not None:
            event.set()
        return "Stopped."

    def build(self, title: str = "PIIP-LLaVA chat"):
        import gradio as gr

        with gr.Blocks(title=title) as page:
            gr.Markdown(f"# {title}\n{self.backend.describe()}", elem_id=ELEMENT_IDS["header"])
            chat = gr.Chatbot(label="Conversation", elem_id=ELEMENT_IDS["chat"], height=620)
            message = gr.MultimodalTextbox(
                placeholder="Attach an image and ask about it; then ask follow-up questions.",
                file_types=["image"],
                file_count="single",
                show_label=False,
                elem_id=ELEMENT_IDS["message"],
            )
            status = gr.Markdown("", elem_id=ELEMENT_IDS["status"])
            with gr.Row():
                stop_button = gr.Button("Stop", elem_id=ELEMENT_IDS["stop"])
                clear_button = gr.Button("Clear", elem_id=ELEMENT_IDS["clear"])
            gr.Examples(examples=bundled_examples(), inputs=[message], label="Examples (click, then press Enter)")
            conversation = gr.State(None)

            def respond(message_value, conversation_value, chat_value, request: gr.Request):
                yield from self.respond(message_value, conversation_value, chat_value, request.session_hash)

            def stop(request: gr.Request):
                return self.stop(request.session_hash)

            message.submit(
                respond, [message, conversation, chat], [chat, message, status, conversation], show_progress="hidden"
            )
            # The stop event ends generation at the next token; the answer so far is kept in the conversation.
            stop_button.click(stop, None, [status])
            clear_button.click(lambda: ([], None, "", None), None, [chat, message, status, conversation])
        return page
