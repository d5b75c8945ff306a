"""Benchmarks as local Hugging Face datasets: a `save_to_disk` folder, a parquet file, or a folder of parquet files.

Nothing is downloaded: the lmms-lab datasets (lmms-lab/textvqa, lmms-lab/MMBench) are read from a copy
on disk. Images stay undecoded until a question's batch comes up, so one broken image costs that row
only, and the error names the row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image


def load_local_dataset(dataset_path: str | os.PathLike, split: str):
    """A dataset saved with `save_to_disk`, a parquet file, or a folder of parquet files (no download).

    A folder of parquet files named like the hub's (`validation-00000-of-00003.parquet`, `dev-....parquet`)
    gives the files of `split` when there are any, else all of them.
    """
    import datasets

    dataset_path = Path(dataset_path)
    if not dataset_path.exists():
        raise ValueError(f"Dataset path {dataset_path} does not exist; give a local folder or parquet file.")
    if (dataset_path / "dataset_info.json").exists() or (dataset_path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(dataset_path))
        if not isinstance(dataset, datasets.DatasetDict):
            return dataset
        if split not in dataset:
            raise ValueError(f"{dataset_path} has no split {split!r}; it has {sorted(dataset)}.")
        return dataset[split]
    return datasets.load_dataset("parquet", data_files=parquet_files(dataset_path, split), split="train")


def parquet_files(dataset_path: Path, split: str) -> list[str]:
    """The parquet files of `split` under a folder (all of them if none is named after the split), or the file."""
    if dataset_path.is_file():
        return [str(dataset_path)]
    files = sorted(dataset_path.rglob("*.parquet"))
    if not files:
        raise ValueError(f"No parquet files under {dataset_path}.")
    of_split = [path for path in files if path.name.startswith(f"{split}-") or path.stem == split]
    chosen = of_split or files
    folders = sorted({str(path.parent.relative_to(dataset_path)) for path in chosen})
    if len(folders) > 1:
        # lmms-lab/MMBench keeps each language in a folder of its own (en/, cn/, cc/): never mix them.
        raise ValueError(f"{dataset_path} holds parquet files of split {split!r} in several folders {folders}; "
                         "give the one folder to read (e.g. the en/ folder of lmms-lab/MMBench).")
    return [str(path) for path in chosen]


def require_columns(dataset, required: Sequence[str], dataset_path, what: str) -> None:
    """Raise a ValueError naming every missing column, before any question is asked."""
    absent = [name for name in required if name not in dataset.column_names]
    if absent:
        raise ValueError(
            f"Dataset {dataset_path} lacks column(s) {absent}; it has {dataset.column_names}. {what}"
        )


def dataset_image(dataset, row: int, image_column: str) -> Image.Image:
    """The decoded image of one row; any failure is a ValueError that names the row."""
    try:
        image = dataset[row][image_column]
        if image is None:
            raise ValueError("the row has no image")
        if not isinstance(image, Image.Image):
            raise TypeError(f"the {image_column!r} column holds {type(image).__name__}, not an image")
        image.load()
    except (OSError, TypeError, ValueError) as error:
        raise ValueError(f"row {row}: {type(error).__name__}: {error}") from error
    return image
