"""The task-model training script as a real 2-process DeepSpeed (ZeRO-2) run on the CPU, launched as on a GPU node."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from launchers import DEEPSPEED, free_port

REPO = Path(__file__).resolve().parents[2]


def test_segmenter_trains_on_two_deepspeed_cpu_processes(tmp_path):
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
        str(REPO / "scripts" / "train_perception_tasks.py"), "--task", "segmentation",
        "--work-dir", str(tmp_path / "work"), "--docs-dir", str(tmp_path / "docs"), "--image-size", "64",
        "--num-train-images", "16", "--num-eval-images", "4", "--batch-size", "2", "--segmentation-steps", "2",
        "--deepspeed", str(REPO / "scripts" / "zero2.json"),
    ]  # fmt: skip
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    log = tmp_path / "deepspeed.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=600)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"deepspeed run failed ({result.returncode}):\n" + log.read_text()[-4000:])
    results = json.loads((tmp_path / "work" / "segmentation" / "results.json").read_text())
    assert results["training"]["world_size"] == 2 and results["training"]["steps"] == 2
    assert math.isfinite(results["training"]["train_loss"])
    assert 0 <= results["trained"]["mean_iou"] <= 1
    assert (tmp_path / "work" / "segmentation" / "model" / "model.safetensors").is_file()
