"""Greedy answer generation for benchmark questions, resumable and model-agnostic.

The model and processor are whatever `AutoProcessor` / `AutoModelForImageTextToText` load from a
folder (our PIIP-LLaVA classes register themselves on `import piip_llava`). Every question becomes
one user turn, `[image, text]`, rendered by the processor's chat template, so the prompt format is
the checkpoint's own and never re-implemented here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .answer_request import ANSWERING_METHODS, AnswerRequest
from .answers_file import append_answers, count_keys, repair_answers_file
from .likelihood import most_likely_replies
from .prompts import chat_prompt

logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationSummary:
    requested: int = 0
    already_answered: int = 0
    generated: int = 0
    skipped: list[tuple[tuple, str]] = field(default_factory=list)

    def describe(self) -> str:
        text = (
            f"{self.requested} requested, {self.already_answered} already answered, {self.generated} generated, "
            f"{len(self.skipped)} skipped"
        )
        if self.skipped:
            text += "; first skipped: " + "; ".join(f"{key}: {reason}" for key, reason in self.skipped[:5])
        return text


def default_device() -> str:
    """The GPU of this process (LOCAL_RANK under torchrun/accelerate), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def load_model_and_processor(model_dir: str, device: str | None = None, dtype: str = "auto"):
    """Load any image-text-to-text checkpoint and its processor, ready for batched greedy decoding."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import piip_llava  # noqa: F401  (registers the PIIP-LLaVA classes with the Auto* factories)

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
    processor = AutoProcessor.from_pretrained(model_dir)
    if getattr(processor, "tokenizer", None) is None:
        raise ValueError(f"The processor in {model_dir} has no tokenizer; evaluation needs one to decode answers.")
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto" if dtype == "auto" else DTYPES[dtype])
    model.to(device or default_device())
    model.eval()
    return model, processor


@torch.inference_mode()
def answer_batch(model, processor, questions: Sequence[str], images: Sequence[Image.Image], max_new_tokens: int):
    """Greedy answers for one batch, decoded from the newly generated tokens only."""
    prompts = [chat_prompt(processor, question) for question in questions]
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, dtype=model.dtype)
    output_ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = output_ids[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def load_batch_images(batch: Sequence[AnswerRequest], summary: GenerationSummary):
    """The requests whose image loads, with their images; the others are logged and counted as skipped."""
    usable, images = [], []
    for request in batch:
        try:
            image = request.load_image().convert("RGB")
        except (OSError, TypeError, ValueError) as error:
            reason = f"image could not be loaded ({type(error).__name__}: {error})"
            logger.warning(f"Skipping question {request.key}: {reason}")
            summary.skipped.append((request.key, reason))
            continue
        usable.append(request)
        images.append(image)
    return usable, images


def answer_record(fields: dict, text: str, model_id: str, metadata: dict | None = None) -> dict:
    """An answer line in LLaVA's field order: the question's fields with "text" after "prompt", then ids."""
    record = {}
    for name, value in fields.items():
        record[name] = value
        if name == "prompt":
            record["text"] = text
    record.setdefault("text", text)
    record.update(answer_id=uuid.uuid4().hex, model_id=model_id, metadata=metadata or {})
    return record


def answers_by_likelihood(model, processor, requests: Sequence[AnswerRequest], images: Sequence[Image.Image],
                          model_id: str) -> list[dict]:
    """Answer records whose text is each request's most likely choice, with every choice's log-likelihood."""
    for request in requests:
        if not request.choices:
            raise ValueError(f"Question {request.key} has no choices, so it cannot be answered by likelihood.")
    chosen = most_likely_replies(model, processor, [request.question for request in requests], images,
                                 [request.choices for request in requests])
    records = []
    for request, (reply, scores) in zip(requests, chosen):
        metadata = {"answer_by": "likelihood", "choices": list(request.choices), "log_likelihoods": scores}
        records.append(answer_record(request.record, reply, model_id, metadata))
    return records


def answering_method(record: dict) -> str:
    return (record.get("metadata") or {}).get("answer_by", "generation")


def check_answering_method(records: Sequence[dict], answer_by: str, answers_path) -> None:
    """Refuse to resume an answers file written by the other method: one file, one protocol."""
    methods = {answering_method(record) for record in records}
    if methods - {answer_by}:
        raise ValueError(f"{answers_path} holds answers made by {', '.join(sorted(methods))}, not by {answer_by}; "
                         "write these answers to another file.")


def pending_requests(requests: Sequence[AnswerRequest], answered: dict) -> list[AnswerRequest]:
    """Requests without an answer yet; repeated keys are matched one answer per request."""
    remaining = dict(answered)
    pending = []
    for request in requests:
        if remaining.get(request.key, 0) > 0:
            remaining[request.key] -= 1
        else:
            pending.append(request)
    return pending


def generate_answers(
    model,
    processor,
    requests: Sequence[AnswerRequest],
    answers_path: str | os.PathLike,
    *,
    key_fields: Sequence[str],
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    description: str = "Answering",
    answer_by: str = "generation",
) -> GenerationSummary:
    """Answer every request not yet in `answers_path`, appending each batch as soon as it is done.

    `answer_by` is "generation" (greedy decoding) or "likelihood" (the most likely of each request's
    `choices`, see `piip_llava.evaluation.likelihood`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if answer_by not in ANSWERING_METHODS:
        raise ValueError(f"answer_by must be one of {', '.join(ANSWERING_METHODS)}, got {answer_by!r}.")
    existing = repair_answers_file(answers_path)
    check_answering_method(existing.records, answer_by, answers_path)
    summary = GenerationSummary(requested=len(requests))
    pending = pending_requests(requests, count_keys(existing.records, key_fields))
    summary.already_answered = len(requests) - len(pending)
    if summary.already_answered:
        logger.info(f"Resuming {answers_path}: {summary.already_answered} of {len(requests)} already answered.")
    progress = tqdm(total=len(pending), desc=description, unit="question")
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        usable, images = load_batch_images(batch, summary)
        if usable:
            if answer_by == "likelihood":
                records = answers_by_likelihood(model, processor, usable, images, model_id)
            else:
                texts = answer_batch(model, processor, [request.question for request in usable], images, max_new_tokens)
                records = [answer_record(request.record, text, model_id) for request, text in zip(usable, texts)]
            append_answers(answers_path, records)
            summary.generated += len(records)
        progress.update(len(batch))
    progress.close()
    return summary
