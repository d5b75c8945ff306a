"""One process of a 2-process CPU training run that is interrupted and resumed (launched by torchrun).

Used by `test_training_resume.py`: for each sampler it trains straight through, then trains again
stopping after a checkpoint, then resumes from that checkpoint, and writes what each phase trained
on (the dataset indices this rank read, in order) and the logged losses to `RESULTS/rank-N.json`.

    torchrun --nproc_per_node 2 tests/training/distributed_resume_worker.py WORKSPACE RESULTS STOP_STEP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from piip_llava.training.arguments import PIIPLlavaTrainingArguments, StageOptions
from piip_llava.training.data import LlavaSupervisedDataset
from piip_llava.training.trainer import run_training

SAMPLERS = {"modality_length_grouped": True, "trainer_default": False}


class RecordingDataset(LlavaSupervisedDataset):
    """The training dataset, remembering which indices this process read."""

    read: list[int] = []

    def __getitem__(self, index):
        RecordingDataset.read.append(index)
        return super().__getitem__(index)


class StopAfterSave(TrainerCallback):
    """Ends the run right after the checkpoint at `step` is written, as a kill after a save would."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def arguments(output_dir: Path, group_by_modality_length: bool, save_steps: int) -> PIIPLlavaTrainingArguments:
    return PIIPLlavaTrainingArguments(
        output_dir=str(output_dir), num_train_epochs=3, per_device_train_batch_size=2, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="steps", save_steps=save_steps,
        logging_steps=1, report_to="none", remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
        group_by_modality_length=group_by_modality_length, log_level="warning",
    )


def phase(options, output_dir, group_by_modality_length, save_steps, resume=None, callbacks=None) -> dict:
    RecordingDataset.read = []
    trainer = run_training(options, arguments(output_dir, group_by_modality_length, save_steps), resume=resume,
                           callbacks=callbacks)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"read": list(RecordingDataset.read), "losses": losses, "global_step": trainer.state.global_step}


def main(workspace: Path, results: Path, stop_step: int) -> None:
    torch.set_num_threads(1)
    import piip_llava.training.trainer as trainer_module

    # Every dataset the runs build records its reads.
    trainer_module.LlavaSupervisedDataset = RecordingDataset
    options = StageOptions(stage="finetune", model_dir=str(workspace / "init"),
                           data_path=str(workspace / "data" / "finetune.json"),
                           image_folder=str(workspace / "data" / "images"), max_length=256)
    outcome = {}
    for name, grouped in SAMPLERS.items():
        runs = results / name
        straight = phase(options, runs / "straight", grouped, save_steps=1000)
        interrupted = phase(options, runs / "interrupted", grouped, save_steps=stop_step,
                            callbacks=[StopAfterSave(stop_step)])
        resumed = phase(options, runs / "interrupted", grouped, save_steps=1000, resume="auto")
        outcome[name] = {"straight": straight, "interrupted": interrupted, "resumed": resumed}
    rank = torch.distributed.get_rank()
    (results / f"rank-{rank}.json").write_text(json.dumps(outcome))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
