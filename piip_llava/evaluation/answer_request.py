"""The unit of work of answer generation, kept free of torch so loading questions stays light."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

# How a request is answered: greedy decoding, or the most likely of its `choices`.
ANSWERING_METHODS = ("generation", "likelihood")
# What answering an MMBench round by likelihood scores as the assistant's reply: each option's text, or its letter.
LIKELIHOOD_TARGETS = ("option", "letter")


@dataclass
class AnswerRequest:
    """One question to put to the model.

    `key` identifies the answer for resuming (e.g. (question_id, round_id)); `record` holds the
    fields LLaVA's answer files carry besides the generated text; `load_image` is called only when
    the request's batch comes up, so a broken image costs one skipped question, not the run.
    `choices` are the replies a multiple-choice question can be answered with, for answering by
    likelihood (`piip_llava.evaluation.likelihood`); empty for open questions.
    """

    key: tuple
    question: str
    load_image: Callable[[], Image.Image]
    record: dict
    choices: tuple[str, ...] = ()
