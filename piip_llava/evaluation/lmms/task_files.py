"""Task files that point our packaged lmms-eval task definitions at local copies of the lmms-lab datasets.

The definitions (`tasks/_piip_*_yaml`: prompt, generation settings, scoring) ship with the package and
are no tasks by themselves; a task file written here includes one of them and adds where the data is,
in a form lmms-eval loads without the hub: parquet files through the `parquet` builder, a
`save_to_disk` DatasetDict through `load_from_disk`, a saved single split through the `arrow` builder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..answers_file import atomic_write_text
from ..lmms_lab import MMBENCH_SPLIT, TEXTVQA_SPLIT
from ..local_datasets import parquet_files
from . import TASKS_DIR


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    template: str
    default_split: str


TEXTVQA_TASK = TaskDefinition("piip_textvqa_val", "_piip_textvqa_yaml", TEXTVQA_SPLIT)
MMBENCH_TASK = TaskDefinition("piip_mmbench_en_dev", "_piip_mmbench_yaml", MMBENCH_SPLIT)
MMBENCH_LIKELIHOOD_TASK = TaskDefinition("piip_mmbench_en_dev_likelihood", "_piip_mmbench_likelihood_yaml",
                                         MMBENCH_SPLIT)


def dataset_source(dataset_path: str | os.PathLike, split: str) -> dict:
    """The dataset_path / dataset_kwargs / test_split keys of a task config that loads `split` of a local copy."""
    dataset_path = Path(dataset_path).resolve()
    if not dataset_path.exists():
        raise ValueError(f"Dataset path {dataset_path} does not exist; give a local folder or parquet file.")
    if (dataset_path / "dataset_dict.json").exists():
        splits = json.loads((dataset_path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split not in splits:
            raise ValueError(f"{dataset_path} has no split {split!r}; it has {splits}.")
        return {"dataset_path": str(dataset_path), "dataset_kwargs": {"load_from_disk": True}, "test_split": split}
    if (dataset_path / "state.json").exists():
        state = json.loads((dataset_path / "state.json").read_text(encoding="utf-8"))
        files = [str(dataset_path / entry["filename"]) for entry in state.get("_data_files", [])]
        if not files:
            raise ValueError(f"{dataset_path}/state.json lists no data files; is this a save_to_disk folder?")
        return {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: files}}, "test_split": split}
    return {"dataset_path": "parquet", "dataset_kwargs": {"data_files": {split: parquet_files(dataset_path, split)}},
            "test_split": split}


def write_task_file(out_dir: str | os.PathLike, task: TaskDefinition, dataset_path: str | os.PathLike,
                    split: str | None = None) -> Path:
    """Write `<out_dir>/<task name>.yaml`: the packaged definition plus the local dataset; returns its path."""
    config = {"task": task.name, "include": str(TASKS_DIR / task.template),
              **dataset_source(dataset_path, split or task.default_split)}
    path = Path(out_dir) / f"{task.name}.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path
