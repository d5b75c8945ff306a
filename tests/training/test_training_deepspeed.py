"""Both training stages as real 2-process DeepSpeed runs on the CPU (ZeRO-2 for stage 1, ZeRO-3 for stage 2).

Launched exactly as on a GPU node (`deepspeed --num_gpus 2 --module piip_llava train ...`), with
DeepSpeed's CPU accelerator (gloo). The first launch on a machine compiles DeepSpeed's shared-memory
communication op, which takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from launchers import DEEPSPEED, free_port
from training_fixtures import write_llava_dataset, write_tiny_llm, write_vision_config

from piip_llava import PIIPLlavaForConditionalGeneration
from piip_llava.training.assembly import assemble_piip_llava, load_vision_encoder, save_initial_model
from piip_llava.training.trainer import load_processor

REPO = Path(__file__).resolve().parents[2]


def launch(arguments: list[str], log: Path) -> None:
    """Run `piip-llava train` on 2 CPU processes through the DeepSpeed launcher; fail with the log's tail."""
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
               "--module", "piip_llava", "train", "--use-cpu", *arguments]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, cwd=REPO, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=600)
    if result.returncode != 0:
        pytest.fail(f"deepspeed run failed ({result.returncode}):\n" + log.read_text()[-4000:])


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_two_stage_deepspeed_run_on_two_cpu_processes(tmp_path):
    llm_dir = write_tiny_llm(tmp_path / "llm")
    vision = load_vision_encoder(vision_config_path=write_vision_config(tmp_path / "vision.json"))
    model, processor = assemble_piip_llava(llm_dir, vision, projector_num_groups=8)
    init_dir = save_initial_model(model, processor, tmp_path / "init")
    captions, images = write_llava_dataset(tmp_path / "data", 32, "pretrain", with_bad=True)
    conversations, _ = write_llava_dataset(tmp_path / "data", 32, "finetune", text_only_every=4)
    common = ["--image-folder", str(images), "--per-device-batch-size", "2", "--max-steps", "10",
              "--logging-steps", "1", "--save-steps", "5", "--warmup-ratio", "0"]

    stage1 = tmp_path / "stage1"
    launch(["--stage", "pretrain", "--model", str(init_dir), "--data", str(captions), "--output-dir", str(stage1),
            "--learning-rate", "1e-2", "--deepspeed", str(REPO / "scripts/zero2.json"), *common],
           tmp_path / "stage1.log")
    stage2 = tmp_path / "stage2"
    launch(["--stage", "finetune", "--model", str(stage1), "--data", str(conversations), "--output-dir", str(stage2),
            "--learning-rate", "2e-3", "--projector-lr", "1e-2", "--deepspeed", str(REPO / "scripts/zero3.json"),
            *common], tmp_path / "stage2.log")

    for output_dir in (stage1, stage2):
        losses = logged_losses(output_dir)
        assert len(losses) == 10
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall in {output_dir.name}: {losses}"
        assert (output_dir / "checkpoint-5").is_dir() and (output_dir / "checkpoint-10").is_dir()

    # Stage 1 trained only the projector; stage 2 the whole model. Both met the bad records on one rank or another.
    stage1_trainable = (stage1 / "trainable_parameters.txt").read_text().split()
    assert stage1_trainable and all("multi_modal_projector" in name for name in stage1_trainable)
    assert (stage2 / "frozen_parameters.txt").read_text().split() == []
    skipped = json.loads((stage1 / "skipped_samples.json").read_text())
    assert skipped["by_reason"] == {"corrupt_image": 1, "empty_conversation": 1, "missing_image": 1}

    # The ZeRO-3 output is a complete, ordinary checkpoint: every weight present and generation works.
    trained = PIIPLlavaForConditionalGeneration.from_pretrained(stage2)
    reference = PIIPLlavaForConditionalGeneration.from_pretrained(init_dir)
    assert trained.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in trained.state_dict().items():
        assert tensor.shape == reference.state_dict()[name].shape, name
    processor = load_processor(stage2, trained.config.num_image_tokens, "vicuna_v1")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == trained.config.image_token_index
    from PIL import Image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(text=[prompt], images=[Image.open(images / "0000.png")], return_tensors="pt")
    with torch.no_grad():
        generated = trained.eval().generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
