"""The chat prompt every benchmark question becomes, shared by answering by generation and by likelihood."""

from __future__ import annotations


def user_turn(question: str) -> dict:
    """The chat message every benchmark question becomes: the image, then the question."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def chat_prompt(processor, question: str) -> str:
    """One user turn holding the image and the question, followed by an open assistant turn."""
    return processor.apply_chat_template([user_turn(question)], add_generation_prompt=True, tokenize=False)
