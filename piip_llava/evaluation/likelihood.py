"""Multiple choice by likelihood: the option the model is most likely to reply with, nothing generated.

MMBench's own protocol generates a reply and matches it to an option; a reply that names no option
(a misread word, a digit off in a number) is wrong, whatever the model thought of the options. The
likelihood protocol, lm-evaluation-harness's way of scoring multiple choice, asks instead how probable
each option is as the whole reply: the chat template renders the option as the assistant's turn (end
marker included, so "CAR" and "CART" differ), and the sum of its tokens' log-probabilities under the
model ranks the options. It measures what the model knows when it does not follow the instruction to
answer with a letter; it is reported beside the generation score, never in its place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def reply_texts(processor, question: str, reply: str) -> tuple[str, str]:
    """The prompt up to the open assistant turn, and the same conversation with `reply` as the assistant's turn."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template([user, assistant], tokenize=False)
    return prompt, full


def reply_token_count(tokenizer, prompt: str, full: str) -> int:
    """How many tokens the assistant's turn adds to the prompt; the prompt's tokens must be a prefix of the whole's."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(
            "The chat template's assistant turn does not extend the generation prompt token by token, so a "
            f"reply's likelihood cannot be read off: prompt ends {prompt[-40:]!r}, conversation ends {full[-40:]!r}."
        )
    return len(full_ids) - len(prompt_ids)


@torch.inference_mode()
def reply_log_likelihoods(model, processor, questions: Sequence[str], images: Sequence[Image.Image],
                          replies: Sequence[Sequence[str]]) -> list[list[float]]:
    """log P(reply | image, question) for each question's replies, as whole assistant turns, in one forward pass.

    Every (question, reply) pair is a row; rows are left-padded (`load_model_and_processor`), so each reply's
    tokens end its row and the logits one position earlier predict them.
    """
    if processor.tokenizer.padding_side != "left":
        raise ValueError("Likelihood scoring reads each reply at the end of its row: the tokenizer must pad on the left.")
    texts, row_images, reply_lengths = [], [], []
    for question, image, choices in zip(questions, images, replies, strict=True):
        if not choices:
            raise ValueError(f"No replies to score for question {question[:60]!r}.")
        for reply in choices:
            prompt, full = reply_texts(processor, question, reply)
            texts.append(full)
            row_images.append(image)
            reply_lengths.append(reply_token_count(processor.tokenizer, prompt, full))
    inputs = processor(text=texts, images=row_images, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, dtype=model.dtype)
    log_probabilities = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
    input_ids = inputs["input_ids"]
    row_scores = []
    for row, length in enumerate(reply_lengths):
        targets = input_ids[row, -length:]
        predicted = log_probabilities[row, -length - 1 : -1]
        row_scores.append(predicted.gather(-1, targets.unsqueeze(-1)).sum().item())
    scores, start = [], 0
    for choices in replies:
        scores.append(row_scores[start : start + len(choices)])
        start += len(choices)
    return scores


def most_likely_replies(model, processor, questions: Sequence[str], images: Sequence[Image.Image],
                        replies: Sequence[Sequence[str]]) -> list[tuple[str, list[float]]]:
    """Each question's reply with the highest log-likelihood (the first on a tie), with every reply's log-likelihood."""
    chosen = []
    for choices, scores in zip(replies, reply_log_likelihoods(model, processor, questions, images, replies)):
        best = max(range(len(choices)), key=lambda index: (scores[index], -index))
        chosen.append((choices[best], scores))
    return chosen
