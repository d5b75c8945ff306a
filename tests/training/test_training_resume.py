"""A 2-process training run stopped in its second epoch and resumed trains on exactly the samples, in the
order, of an uninterrupted run, with the same losses, for LLaVA's grouped sampler and the Trainer's own.

The processes run `distributed_resume_worker.py` under torchrun on the CPU (gloo); each writes the dataset
indices it read and the logged losses of every phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from launchers import free_port
from training_fixtures import write_llava_dataset, write_tiny_llm, write_vision_config

from piip_llava.training.assembly import assemble_piip_llava, load_vision_encoder, save_initial_model

TESTS = Path(__file__).resolve().parent
SAMPLES, PER_DEVICE_BATCH, PROCESSES = 16, 2, 2
STEPS_PER_EPOCH = SAMPLES // (PER_DEVICE_BATCH * PROCESSES)  # 4 steps; 3 epochs in all
STOP_STEP = STEPS_PER_EPOCH + 2  # halfway through the second epoch


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> dict:
    """rank -> sampler -> phase ("straight", "interrupted", "resumed") -> {"read", "losses", "global_step"}."""
    root = tmp_path_factory.mktemp("resume")
    vision = load_vision_encoder(vision_config_path=write_vision_config(root / "vision.json"))
    model, processor = assemble_piip_llava(write_tiny_llm(root / "llm"), vision, projector_num_groups=8)
    save_initial_model(model, processor, root / "init")
    write_llava_dataset(root / "data", SAMPLES, "finetune", text_only_every=4)
    results = root / "results"
    results.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_port",
               str(free_port()), str(TESTS / "distributed_resume_worker.py"), str(root), str(results), str(STOP_STEP)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parents[1]), os.environ.get("PYTHONPATH")]))}
    log = root / "worker.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=600)
    if result.returncode != 0:
        pytest.fail(f"the 2-process run failed ({result.returncode}):\n" + log.read_text()[-4000:])
    return {rank: json.loads((results / f"rank-{rank}.json").read_text()) for rank in range(PROCESSES)}


@pytest.mark.parametrize("sampler", ["modality_length_grouped", "trainer_default"])
def test_a_run_resumed_in_its_second_epoch_trains_on_the_samples_of_an_uninterrupted_one(phases, sampler):
    done = STOP_STEP * PER_DEVICE_BATCH  # samples each process trained on before the interruption
    for rank in range(PROCESSES):
        straight, interrupted, resumed = (phases[rank][sampler][name] for name in ("straight", "interrupted", "resumed"))
        assert interrupted["global_step"] == STOP_STEP and resumed["global_step"] == 3 * STEPS_PER_EPOCH
        # The data loader reads one batch ahead, so the interrupted run may have read (not trained on) one more.
        assert interrupted["read"][:done] == straight["read"][:done]
        assert resumed["read"] == straight["read"][done:], f"rank {rank} trained on other samples after resuming"
        # The losses logged after resuming (the resumed state keeps the earlier ones) are the uninterrupted run's.
        torch.testing.assert_close(resumed["losses"], straight["losses"], rtol=1e-6, atol=1e-6)
    # Over both processes, each epoch of the resumed run trains on every sample exactly once.
    per_epoch = SAMPLES // PROCESSES
    for epoch in range(3):
        trained = Counter()
        for rank in range(PROCESSES):
            run = phases[rank][sampler]
            order = run["interrupted"]["read"][:done] + run["resumed"]["read"]
            trained.update(order[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert trained == Counter(range(SAMPLES)), f"epoch {epoch}: {sorted(trained.items())}"
