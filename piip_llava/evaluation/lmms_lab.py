"""The schemas of lmms-lab's Hugging Face datasets of TextVQA and MMBench, for writing splits in them.

lmms-eval and most current evaluation code read TextVQA and MMBench as lmms-lab/textvqa and
lmms-lab/MMBench (parquet on the hub) rather than LLaVA's JSONL and TSV files. A split written here
has their columns and types, and is laid out as their hub folders are (`<split>-00000-of-00001.parquet`),
so `piip-llava eval --dataset`, our lmms-eval tasks and `datasets.load_dataset("parquet", ...)` read it
like the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

TEXTVQA_SPLIT = "validation"
MMBENCH_SPLIT = "dev"


def textvqa_features():
    """lmms-lab/textvqa's columns: TextVQA_0.5.1_val.json's fields, the image and its OCR tokens."""
    import datasets

    strings = datasets.Sequence(datasets.Value("string"))
    return datasets.Features({
        "image_id": datasets.Value("string"),
        "question_id": datasets.Value("int32"),
        "question": datasets.Value("string"),
        "question_tokens": strings,
        "image": datasets.Image(),
        "image_width": datasets.Value("int32"),
        "image_height": datasets.Value("int32"),
        "flickr_original_url": datasets.Value("string"),
        "flickr_300k_url": datasets.Value("string"),
        "answers": strings,
        "image_classes": strings,
        "set_name": datasets.Value("string"),
        "ocr_tokens": strings,
    })


def mmbench_features():
    """lmms-lab/MMBench's columns: the MMBench TSV's, the image decoded, "L2-category" capitalised."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({
        "index": datasets.Value("int64"),
        "question": text, "hint": text, "A": text, "B": text, "C": text, "D": text, "answer": text,
        "category": text,
        "image": datasets.Image(),
        "source": text,
        "L2-category": text,
        "comment": text,
        "split": text,
    })


def write_parquet_split(rows: list[dict], features, folder: str | os.PathLike, split: str) -> Path:
    """Write `rows` as the single parquet shard of `split` in `folder`; returns the file."""
    import datasets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path
