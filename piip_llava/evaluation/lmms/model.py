"""PIIP-LLaVA as an lmms-eval model: `python -m lmms_eval --model piip_llava --model_args pretrained=DIR`.

Two classes, as lmms-eval 0.7 defines its interfaces: `PIIPLlavaChat` (the default; lmms-eval hands it
the task's chat messages, images inline) and `PIIPLlava` (the "simple" interface, chosen with
`--force_simple`: a text context plus `doc_to_visual`; it also answers `loglikelihood`, which
multiple-choice tasks need and which lmms-eval only sends to simple models). Both render every
request with the checkpoint's own chat template, one user turn holding the image and the text, exactly
as `piip-llava eval` does (`piip_llava.evaluation.generation`), decode greedily in batches of
`--batch_size`, and score likelihoods with `piip_llava.evaluation.likelihood`.

A request whose image cannot be read is answered with an empty string and logged with its task and
document, so one broken row costs that row, not the run. lmms-eval cannot skip a document: the empty
answer is scored as wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from ...chat_session import BUNDLED_MODEL_DIR
from ..generation import complete_prompts, load_model_and_processor
from ..likelihood import score_replies

logger = logging.get_logger(__name__)

# What a task that says nothing about it gets: LLaVA's evaluation scripts generate up to 128 tokens.
DEFAULT_MAX_NEW_TOKENS = 128
# Generation settings that keep decoding greedy; anything else is refused rather than silently ignored.
GREEDY_SETTINGS = {"temperature": (0, 0.0, None), "do_sample": (False, None), "num_beams": (1, None),
                   "top_p": (None, 1, 1.0), "top_k": (None,)}


@dataclass
class PreparedRequest:
    """One generation request ready for the model: its prompt and image, or why it could not be prepared."""

    prompt: str = ""
    image: Image.Image | None = None
    problem: str | None = None


def truncate_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """The text up to the first of the task's stop strings, as lmms-eval's `until` asks."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def stop_strings(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, list):
        raise TypeError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}.")
    return until


def check_greedy(gen_kwargs: dict) -> None:
    """Refuse sampling or beam search: PIIP-LLaVA is evaluated with greedy decoding, as LLaVA's protocol is."""
    for name, allowed in GREEDY_SETTINGS.items():
        if name in gen_kwargs and gen_kwargs[name] not in allowed:
            raise ValueError(f"piip_llava decodes greedily; the task asks for {name}={gen_kwargs[name]!r}. Set "
                             f"{name} to {allowed[0]!r} (or leave it out) in the task's generation_kwargs.")


def generation_group(gen_kwargs: dict) -> str:
    """Requests with the same generation settings share batches."""
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def batches_in_order(requests: Sequence[Instance], key: Callable[[Instance], str], size: int):
    """(indices, requests) batches of at most `size`, in request order, never mixing keys."""
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(key(request), []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            yield chunk, [requests[index] for index in chunk]


def only_image(visuals, where: str) -> Image.Image:
    """The request's single image, in RGB; PIIP-LLaVA answers about exactly one image per question."""
    images = [visual for visual in (visuals or []) if isinstance(visual, Image.Image)]
    if len(images) != 1 or len(images) != len(visuals or []):
        raise ValueError(f"{where}: PIIP-LLaVA takes exactly one image per question, the task gave "
                         f"{[type(visual).__name__ for visual in (visuals or [])]}")
    return images[0].convert("RGB")


class PIIPLlava(lmms):
    """The simple interface: `generate_until` and `loglikelihood` over a text context and `doc_to_visual`.

    Model arguments (`--model_args`): `pretrained` (a PIIP-LLaVA directory; default: the bundled demo
    model), `device` (default: the GPU of this process if there is one, else the CPU), `dtype` (auto,
    float32, float16, bfloat16), `batch_size` (also set by `--batch_size`), `max_new_tokens` (used when
    the task sets none). lmms-eval's `--max_batch_size` is accepted and unused: batches have a fixed size.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
                 max_batch_size: int | str | None = None, **unknown) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("piip_llava runs in one process under lmms-eval (every process would answer every "
                             "question); run lmms-eval without accelerate launch, or shard `piip-llava eval`.")
        if unknown:
            raise ValueError(f"Unknown piip_llava model argument(s) {sorted(unknown)}; known: pretrained, device, "
                             "dtype, batch_size, max_new_tokens.")
        if str(batch_size).startswith("auto"):
            raise ValueError("piip_llava needs a fixed --batch_size; 'auto' is not supported.")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.max_new_tokens = int(max_new_tokens)
        self.pretrained = str(pretrained or BUNDLED_MODEL_DIR)
        self.model, self.processor = load_model_and_processor(self.pretrained, device=device, dtype=dtype)

    def document(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def prepare_simple(self, request: Instance) -> PreparedRequest:
        context, _, doc_to_visual, doc_id, task, split = request.args
        where = f"{task} document {doc_id}"
        try:
            image = only_image(doc_to_visual(self.document(task, split, doc_id)), where)
        except (OSError, TypeError, ValueError) as error:
            return PreparedRequest(problem=f"{where}: the image cannot be read ({type(error).__name__}: {error})")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return PreparedRequest(prompt=prompt, image=image)

    def prepare(self, request: Instance) -> PreparedRequest:
        return self.prepare_simple(request)

    def generation_kwargs(self, request: Instance) -> dict:
        return request.args[1]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers in batches of `batch_size`; requests are batched in their order, by generation settings."""
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="piip_llava generating", disable=self.rank != 0)
        for indices, batch in batches_in_order(requests, lambda request: generation_group(self.generation_kwargs(request)),
                                               self.batch_size):
            gen_kwargs = dict(self.generation_kwargs(batch[0]))
            check_greedy(gen_kwargs)
            until = stop_strings(gen_kwargs)
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            prepared = [self.prepare(request) for request in batch]
            for request_index, item in zip(indices, prepared):
                if item.problem is not None:
                    logger.error(f"{item.problem}; answered with an empty string.")
            usable = [(request_index, item) for request_index, item in zip(indices, prepared) if item.problem is None]
            if usable:
                texts = complete_prompts(self.model, self.processor, [item.prompt for _, item in usable],
                                         [item.image for _, item in usable], max_new_tokens)
                for (request_index, _), text in zip(usable, texts):
                    answers[request_index] = truncate_at_stop_strings(text, until).strip()
            progress.update(len(batch))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(-log P(continuation | image, context), whether greedy decoding writes it), per request.

        The continuation is scored as the assistant's whole reply under the chat template (leading
        whitespace, lmms-eval's target delimiter, removed), as `piip-llava eval --answer-by likelihood`
        scores options; the choices of one question share one encoding of its image and prompt. The
        value is the negative log-likelihood, summed over the reply's tokens: lmms-eval's multiple-choice
        scoring picks the choice with the smallest value (its own models return a loss), so the most
        likely choice wins. A question whose image cannot be read gets +inf for every choice, and is logged.

        Each pair is returned wrapped in a `GenerationResult`: lmms-eval 0.7.3 passes every model output
        through `unwrap_generation_output`, which turns a bare (float, bool) tuple into its string (and its
        multiple-choice scoring then fails); a GenerationResult's payload reaches the task unchanged.
        """
        questions: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            questions.setdefault((task, split, doc_id, context), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        keys = list(questions)
        progress = tqdm(total=len(keys), desc="piip_llava scoring", disable=self.rank != 0)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start : start + self.batch_size]
            usable, contexts, images, replies = [], [], [], []
            for key in batch:
                task, split, doc_id, context = key
                first = requests[questions[key][0]]
                try:
                    document = self.document(task, split, doc_id)
                    image = only_image(first.args[2](document), f"{task} document {doc_id}")
                except (OSError, TypeError, ValueError) as error:
                    logger.error(f"{task} document {doc_id}: the image cannot be read ({type(error).__name__}: "
                                 f"{error}); every choice scored +inf.")
                    for index in questions[key]:
                        results[index] = (float("inf"), False)
                    continue
                usable.append(key)
                contexts.append(context)
                images.append(image)
                replies.append([self.continuation(requests[index], document).lstrip() for index in questions[key]])
            scores = score_replies(self.model, self.processor, contexts, images, replies) if usable else []
            for key, row in zip(usable, scores):
                for index, score in zip(questions[key], row):
                    results[index] = (-score.log_likelihood, score.is_greedy)
            progress.update(len(batch))
        progress.close()
        return [GenerationResult(text=pair) for pair in results]

    @staticmethod
    def continuation(request: Instance, document: dict) -> str:
        target = request.args[1]
        return target if isinstance(target, str) else str(target(document))

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("piip_llava answers single-turn tasks; multi-round generation is not supported.")


class PIIPLlavaChat(PIIPLlava):
    """The chat interface (lmms-eval's default for piip_llava): the task's messages, images inline.

    Text and images are kept in their order within each turn; the conversation must hold exactly one
    image. Multiple-choice (loglikelihood) tasks need the simple interface: add `--force_simple`.
    """

    is_simple = False

    def generation_kwargs(self, request: Instance) -> dict:
        return request.args[2]

    def prepare(self, request: Instance) -> PreparedRequest:
        _, doc_to_messages, _, doc_id, task, split = request.args
        where = f"{task} document {doc_id}"
        try:
            messages = doc_to_messages(self.document(task, split, doc_id))
            conversation, visuals = chat_messages_for_processor(messages)
            image = only_image(visuals, where)
        except (OSError, TypeError, ValueError) as error:
            return PreparedRequest(problem=f"{where}: the messages cannot be read ({type(error).__name__}: {error})")
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return PreparedRequest(prompt=prompt, image=image)


def chat_messages_for_processor(messages: list[dict]) -> tuple[list[dict], list]:
    """lmms-eval's messages ({"type": "image", "url": PIL image}, ...) as our processor's, and their images."""
    conversation, visuals = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                parts.append({"type": "image"})
                visuals.append(part.get("url", part.get("image")))
            else:
                raise ValueError(f"PIIP-LLaVA reads text and images, not {part['type']!r}")
        conversation.append({"role": message["role"], "content": parts})
    return conversation, visuals
