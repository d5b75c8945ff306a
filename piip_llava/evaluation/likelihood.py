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
from dataclasses import dataclass

import torch
from PIL import Image

from .prompts import chat_prompt, user_turn


@dataclass(frozen=True)
class ReplyScore:
    """How likely a reply is as the assistant's whole turn, and whether greedy decoding would write it."""

    log_likelihood: float
    is_greedy: bool


def conversation_with_reply(processor, question: str, reply: str) -> str:
    """The benchmark conversation with `reply` as the assistant's turn, rendered by the chat template."""
    assistant = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
    return processor.apply_chat_template([user_turn(question), assistant], tokenize=False)


def reply_token_ids(tokenizer, prompt_ids: list[int], full: str) -> list[int]:
    """The tokens the assistant's turn adds to the prompt; the prompt's tokens must be a prefix of the whole's."""
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(
            "The chat template's assistant turn does not extend the generation prompt token by token, so a "
            f"reply's likelihood cannot be read off: the conversation ends {full[-40:]!r}."
        )
    return full_ids[len(prompt_ids):]


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences as one id tensor padded on the right, and its attention mask."""
    width = max(len(ids) for ids in sequences)
    ids = torch.tensor([[*row, *[pad_id] * (width - len(row))] for row in sequences])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in sequences])
    return ids, mask


def prompts_and_reply_ids(processor, questions: Sequence[str],
                          replies: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """Each question's chat prompt, and the token ids of every reply's assistant turn (all questions, in order)."""
    tokenizer = processor.tokenizer
    prompts, reply_ids = [], []
    for question, choices in zip(questions, replies, strict=True):
        if not choices:
            raise ValueError(f"No replies to score for question {question[:60]!r}.")
        prompt = chat_prompt(processor, question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompts.append(prompt)
        reply_ids.extend(reply_token_ids(tokenizer, prompt_ids, conversation_with_reply(processor, question, reply))
                         for reply in choices)
    return prompts, reply_ids


def summed_reply_log_probabilities(first_token: torch.Tensor, later_tokens: torch.Tensor, question_of_row: torch.Tensor,
                                   reply_ids: list[list[int]]) -> list[ReplyScore]:
    """Per reply row: log P(first token) from its prompt's last position plus its later tokens' log-probabilities,
    and whether greedy decoding picks each of its tokens."""
    scores = []
    for row, ids in enumerate(reply_ids):
        first = first_token[question_of_row[row]]
        total = first[ids[0]]
        greedy = bool(first.argmax() == ids[0])
        if len(ids) > 1:
            steps = torch.arange(len(ids) - 1, device=later_tokens.device)
            later_ids = torch.tensor(ids[1:], device=later_tokens.device)
            total = total + later_tokens[row, steps, later_ids].sum()
            greedy = greedy and bool((later_tokens[row, steps].argmax(dim=-1) == later_ids).all())
        scores.append(ReplyScore(log_likelihood=total.item(), is_greedy=greedy))
    return scores


@torch.inference_mode()
def score_replies(model, processor, questions: Sequence[str], images: Sequence[Image.Image],
                  replies: Sequence[Sequence[str]]) -> list[list[ReplyScore]]:
    """log P(reply | image, question) for each question's replies, as whole assistant turns, and greediness.

    Two forward passes: the prompts (left-padded, images and all), then every reply at once, each row
    continuing its question's key/value cache (repeated once per reply) and right-padded after it. The
    image and the prompt are encoded once per question instead of once per reply (docs/training.md has the
    time saved); the scores are the same as for whole conversations (tests compare the two).
    """
    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise ValueError("Likelihood scoring continues each prompt at the end of its row: the tokenizer must pad on "
                         "the left.")
    prompts, reply_ids = prompts_and_reply_ids(processor, questions, replies)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, dtype=model.dtype)
    # Only the last prompt position's logits are needed (they predict each reply's first token): with a 32k
    # vocabulary and 600 image tokens, the full logits of a 16-question batch would take 1.4 GB in float32.
    prompt_pass = model(**inputs, use_cache=True, logits_to_keep=1)
    first_token = torch.log_softmax(prompt_pass.logits[:, -1].float(), dim=-1)

    counts = torch.tensor([len(choices) for choices in replies], device=model.device)
    question_of_row = torch.repeat_interleave(torch.arange(len(prompts), device=model.device), counts)
    cache = prompt_pass.cache
    cache.reorder_cache(question_of_row)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reply_input, reply_mask = right_padded(reply_ids, pad_id)
    attention_mask = torch.cat([inputs["attention_mask"][question_of_row], reply_mask.to(model.device)], dim=1)
    reply_pass = model(input_ids=reply_input.to(model.device), attention_mask=attention_mask, cache=cache)
    later_tokens = torch.log_softmax(reply_pass.logits.float(), dim=-1)

    row_scores = summed_reply_log_probabilities(first_token, later_tokens, question_of_row, reply_ids)
    scores, start = [], 0
    for choices in replies:
        scores.append(row_scores[start : start + len(choices)])
        start += len(choices)
    return scores


def reply_log_likelihoods(model, processor, questions: Sequence[str], images: Sequence[Image.Image],
                          replies: Sequence[Sequence[str]]) -> list[list[float]]:
    """log P(reply | image, question) for each question's replies (see `score_replies`)."""
    return [[score.log_likelihood for score in row] for row in score_replies(model, processor, questions, images, replies)]


def most_likely_replies(model, processor, questions: Sequence[str], images: Sequence[Image.Image],
                        replies: Sequence[Sequence[str]]) -> list[tuple[str, list[float]]]:
    """Each question's reply with the highest log-likelihood (the first on a tie), with every reply's log-likelihood."""
    chosen = []
    for choices, scores in zip(replies, reply_log_likelihoods(model, processor, questions, images, replies)):
        best = max(range(len(choices)), key=lambda index: (scores[index], -index))
        chosen.append((choices[best], scores))
    return chosen
