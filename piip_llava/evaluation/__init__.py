"""Benchmark evaluation: TextVQA and MMBench with their official scoring protocols.

Scoring works alone on existing answer files (LLaVA's JSONL format), so numbers from our runs and
from LLaVA's own scripts are comparable line for line. Generation is model-agnostic: anything that
`AutoProcessor` / `AutoModelForImageTextToText` can load is evaluated the same way.

Names are imported on first use, so `piip-llava --help` does not pay for torch.
"""

import importlib

_EXPORTS = {
    "normalize_answer": "answer_normalization",
    "vqa_accuracy": "answer_normalization",
    "MMBenchScore": "mmbench",
    "extract_option_letter": "mmbench",
    "load_mmbench_items": "mmbench",
    "read_mmbench_table": "mmbench",
    "score_mmbench": "mmbench",
    "TextVQAScore": "textvqa",
    "load_textvqa_questions": "textvqa",
    "score_textvqa": "textvqa",
    "generate_answers": "generation",
    "load_model_and_processor": "generation",
}

__all__ = [
    "MMBenchScore",
    "TextVQAScore",
    "extract_option_letter",
    "generate_answers",
    "load_mmbench_items",
    "load_model_and_processor",
    "load_textvqa_questions",
    "normalize_answer",
    "read_mmbench_table",
    "score_mmbench",
    "score_textvqa",
    "vqa_accuracy",
]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
