"""Conversation formats the released PIIP-LLaVA checkpoints were trained with.

`vicuna_v1` and `plain` render byte for byte as LLaVA-1.5 does; the processor's chat templates,
the training data formatting and the evaluation prompts all go through this one module, so the
three can never drift apart.

Messages are dicts `{"role": "user" | "assistant" | "system", "content": str | list}`. A list
content follows transformers' multimodal message format: parts `{"type": "image"}` and
`{"type": "text", "text": ...}`; each image part becomes the image placeholder followed by "\n",
placed before the message's text (LLaVA puts the image first).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

# The chat templates' variable that lets a prompt for an answer have no image (the templates refuse one by default).
ALLOW_TEXT_ONLY = "allow_text_only"
NO_IMAGE_MESSAGE = (
    "PIIP-LLaVA answers questions about an image and this conversation has none: attach an image to the first user "
    f"message (or, to ask without one, pass the chat template argument {ALLOW_TEXT_ONLY}=true)."
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ConversationFormat:
    """A prompt format: how a list of turns becomes one string."""

    name: str
    system: str
    user_role: str
    assistant_role: str
    user_separator: str
    assistant_separator: str

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The prompt string for `messages`; with `add_generation_prompt`, an open assistant turn."""
        turns, system = normalise_messages(messages)
        if self.name == "plain":
            # LLaVA's plain format keeps only the image placeholder of a user turn, then the caption.
            return "".join(
                IMAGE_PLACEHOLDER * text.count(IMAGE_PLACEHOLDER) if role == "user" else text + self.assistant_separator
                for role, text in turns
            )
        system = self.system if system is None else system
        prompt = system + self.user_separator
        for role, text in turns:
            if role == "user":
                prompt += f"{self.user_role}: {text}{self.user_separator}"
            else:
                prompt += f"{self.assistant_role}: {text}{self.assistant_separator}"
        if add_generation_prompt:
            prompt += f"{self.assistant_role}:"
        return prompt

    def render_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered prompt cut into (text, supervised) pieces for training labels.

        Supervised pieces are what the model must learn to produce: each assistant reply with its
        end separator (vicuna_v1), or the caption with its newline (plain). Their concatenation
        equals `render(messages)`.
        """
        turns, system = normalise_messages(messages)
        if self.name == "plain":
            if len(turns) != 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
                raise ValueError("A plain-format sample needs exactly one user turn (the image) and one caption.")
            image_part = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0][1] else ""
            return [(image_part, False), (turns[1][1] + self.assistant_separator, True)]
        system = self.system if system is None else system
        segments = [(system + self.user_separator, False)]
        for role, text in turns:
            if role == "user":
                segments.append((f"{self.user_role}: {text}{self.user_separator}{self.assistant_role}: ", False))
            else:
                segments.append((f"{text}{self.assistant_separator}", True))
        return segments


VICUNA_V1 = ConversationFormat(
    name="vicuna_v1",
    system=VICUNA_SYSTEM,
    user_role="USER",
    assistant_role="ASSISTANT",
    user_separator=" ",
    assistant_separator="</s>",
)

# Stage-1 pretraining: the image placeholder, then the caption and a newline; no roles, no system.
PLAIN = ConversationFormat(
    name="plain",
    system="",
    user_role="",
    assistant_role="",
    user_separator="",
    assistant_separator="\n",
)

CONVERSATION_FORMATS = {fmt.name: fmt for fmt in (VICUNA_V1, PLAIN)}


def get_conversation_format(name: str) -> ConversationFormat:
    if name not in CONVERSATION_FORMATS:
        raise ValueError(f"Unknown conversation format {name!r}; known: {', '.join(CONVERSATION_FORMATS)}.")
    return CONVERSATION_FORMATS[name]


def message_text(content) -> str:
    """A message's text with its image parts turned into leading placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TypeError(f"Message content must be a string or a list of parts, got {type(content).__name__}.")
    images = sum(1 for part in content if part.get("type") == "image")
    texts = [part.get("text", "") for part in content if part.get("type") == "text"]
    unknown = [part.get("type") for part in content if part.get("type") not in ("image", "text")]
    if unknown:
        raise ValueError(f"Unsupported message part types {unknown}; use 'image' and 'text'.")
    return (IMAGE_PLACEHOLDER + "\n") * images + "".join(texts)


def normalise_messages(messages: list[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """(role, text) turns alternating user/assistant, and the system text if one was given."""
    system = None
    turns = []
    for position, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            if position != 0:
                raise ValueError("A system message may only come first.")
            system = message_text(message["content"])
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"Message {position} has role {role!r}; expected 'user', 'assistant' or 'system'.")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"Message {position} has role {role!r} where a {expected!r} turn was expected.")
        turns.append((role, message_text(message["content"])))
    if not turns:
        raise ValueError("The conversation has no user or assistant turn.")
    return turns, system


def jinja_chat_template(fmt: ConversationFormat) -> str:
    """A Jinja chat template that renders exactly like `fmt.render` (checked by the tests).

    Multi-turn formats mark each answer with transformers' `{% generation %}` tag, so
    `apply_chat_template(..., return_assistant_tokens_mask=True)` finds the assistant's tokens.

    Asking for an answer (`add_generation_prompt`) to a conversation with no image (no image part,
    no placeholder in a text) is refused with `NO_IMAGE_MESSAGE`: every inference path of this
    package asks about an image, and a chat template's refusal is what inference servers report to
    the client (vLLM answers it with a 400, docs/serving.md). `allow_text_only=True` (an
    `apply_chat_template` argument, or vLLM's `chat_template_kwargs`) asks anyway. Whole
    conversations, as training renders them, are never refused: LLaVA-1.5's instruction data mixes
    text-only conversations in.
    """
    part_text = (
        "{%- macro text(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}"
        "{%- for part in content if part['type'] == 'image' -%}" + IMAGE_PLACEHOLDER + "{{ '\\n' }}{%- endfor -%}"
        "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
    ) + jinja_image_check()
    if fmt.name == "plain":
        return part_text + (
            "{%- for message in messages if message['role'] != 'system' -%}"
            "{%- if message['role'] == 'assistant' -%}{{ text(message['content']) }}{{ '\\n' }}"
            "{%- elif message['content'] is string -%}{{ '" + IMAGE_PLACEHOLDER + "' * message['content'].count('"
            + IMAGE_PLACEHOLDER + "') }}"
            "{%- else -%}{%- for part in message['content'] if part['type'] == 'image' -%}" + IMAGE_PLACEHOLDER +
            "{%- endfor -%}{%- endif -%}"
            "{%- endfor -%}"
        )
    return part_text + (
        "{%- if messages[0]['role'] == 'system' -%}{{ text(messages[0]['content']) }}"
        "{%- else -%}" + fmt.system + "{%- endif -%}"
        "{{ ' ' }}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}" + fmt.user_role + ": {{ text(message['content']) }}{{ ' ' }}"
        "{%- else -%}" + fmt.assistant_role + ":{{ ' ' }}"
        # `{% generation %}` marks the answer for `return_assistant_tokens_mask` (renders nothing itself).
        "{%- generation -%}{{ text(message['content']) }}" + fmt.assistant_separator + "{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + fmt.assistant_role + ":{%- endif -%}"
    )


def jinja_image_check() -> str:
    """Jinja that raises `NO_IMAGE_MESSAGE` when asked for an answer with no image in any message.

    `allow_text_only` set to true lets such a prompt through.
    """
    return (
        "{%- set image_count = namespace(value=0) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set image_count.value = image_count.value + message['content'].count('" + IMAGE_PLACEHOLDER + "') -%}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}"
        "{%- set image_count.value = image_count.value + 1 -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and image_count.value == 0 and not " + ALLOW_TEXT_ONLY + " | default(false) -%}"
        "{{ raise_exception('" + NO_IMAGE_MESSAGE + "') }}"
        "{%- endif -%}"
    )
