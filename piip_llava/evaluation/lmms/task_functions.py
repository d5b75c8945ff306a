"""The functions our lmms-eval task definitions (`tasks/*`) name: prompts, documents and scores of `piip-llava eval`.

TextVQA: the question then LLaVA-1.5's "Answer the question using a single word or phrase." (no OCR
tokens, the question as the dataset spells it; lmms-eval's stock textvqa_val capitalises it), scored
by our `score_textvqa` (EvalAI normalisation, VQA accuracy against the ten human answers, in percent).

MMBench: LLaVA-1.5's prompt, "{hint}\\n{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from
the given choices directly." (lmms-eval's stock mmbench_en_dev writes "Hint: ...", "Question: ..." and
"Options:" lines instead, and has GPT match free-form answers). Every question is asked once per
rotation of its options (circular evaluation), expanded by `mmbench_process_docs` exactly as
`piip-llava eval mmbench` expands a TSV, and scored by our `score_mmbench` (rule-based letter extraction,
no judge): circular and vanilla accuracy in percent.

Aggregations rebuild our answer records from the per-document results and call our scorers on them, so
the numbers are the ones `piip-llava score` gives for the same answers.
"""

from __future__ import annotations

from ..local_datasets import require_columns
from ..mmbench import (
    ANSWER_INSTRUCTIONS,
    OPTION_LETTERS,
    MMBenchItem,
    load_mmbench_items,
    mmbench_table_from_dataset,
    score_mmbench,
)
from ..textvqa import resolve_id_column, score_textvqa, with_answer_instruction

# The fields of an MMBench round kept in its lmms-eval document (the image is kept from the source row).
ROUND_FIELDS = ("question_id", "round_id", "group_id", "is_original", "question", "hint", "options", "option_char",
                "answer", "category", "l2_category")


def textvqa_process_docs(dataset):
    """The split as it is, once it is known to have the columns the task reads (else a ValueError naming them)."""
    require_columns(dataset, [resolve_id_column(dataset.column_names, None), "question", "image", "answers"],
                    "(the task's TextVQA split)", "Our TextVQA task reads lmms-lab/textvqa's schema.")
    return dataset


def textvqa_doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def textvqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return with_answer_instruction(doc["question"])


def textvqa_process_results(doc: dict, results: list[str]) -> dict:
    """The answer as our answer record (question_id is the image id, as in LLaVA's files), with its human answers."""
    record = {
        "question_id": doc[resolve_id_column(list(doc), None)],
        "prompt": textvqa_doc_to_text(doc),
        "text": results[0],
        "question": doc["question"],
        "answers": list(doc["answers"]),
    }
    return {"accuracy": record}


def textvqa_accuracy(records: list[dict]) -> float:
    """Our TextVQA accuracy (percent) of the answers, against the human answers they carry."""
    annotations = {(record["question_id"], record["question"].lower()): record["answers"] for record in records}
    return score_textvqa(records, annotations).accuracy


def mmbench_process_docs(dataset):
    """One document per round: every rotation of each question's options (or the rows, when the split already
    holds VLMEvalKit's rotated copies), unusable rows left out and logged, as `piip-llava eval mmbench` does."""
    items, _ = load_mmbench_items(mmbench_table_from_dataset(dataset, "(the task's MMBench split)"), rounds="auto")
    rounds = dataset.select([item.image_row for item in items]).select_columns(["image"])
    for name in ROUND_FIELDS:
        rounds = rounds.add_column(name, [getattr(item, name) for item in items])
    return rounds.add_column("image_row", [item.image_row for item in items])


def mmbench_item(doc: dict) -> MMBenchItem:
    fields = {name: doc[name] for name in ROUND_FIELDS}
    fields.update(options=tuple(doc["options"]), option_char=tuple(doc["option_char"]))
    return MMBenchItem(image_row=doc["image_row"], **fields)


def mmbench_doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def mmbench_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return f"{mmbench_item(doc).prompt}\n{ANSWER_INSTRUCTIONS['en']}"


def mmbench_doc_to_choice(doc: dict) -> list[str]:
    """The options' texts, in the round's order: what `piip-llava eval mmbench --answer-by likelihood` scores."""
    return list(doc["options"])


def mmbench_doc_to_target(doc: dict) -> int:
    """The position of the right option in the round (its answer is the letter shown with it)."""
    return OPTION_LETTERS.index(doc["answer"])


def mmbench_process_results(doc: dict, results: list[str]) -> dict:
    """The round's answer as our answer record, with the round it answers."""
    item = mmbench_item(doc)
    record = {"question_id": item.question_id, "round_id": item.round_id, "prompt": item.prompt, "text": results[0],
              "round": {name: doc[name] for name in ROUND_FIELDS} | {"image_row": doc["image_row"]}}
    return {"circular_accuracy": record, "vanilla_accuracy": record}


def mmbench_score(records: list[dict]):
    items = [mmbench_item(record["round"]) for record in records]
    return score_mmbench(records, items)


def mmbench_circular_accuracy(records: list[dict]) -> float:
    """Our circular accuracy (percent): a question counts when every round of it is answered right."""
    return mmbench_score(records).circular.accuracy


def mmbench_vanilla_accuracy(records: list[dict]) -> float:
    """Our vanilla accuracy (percent): the original round of each question alone."""
    return mmbench_score(records).vanilla.accuracy
