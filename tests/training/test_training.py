"""Training runs in one process (no DeepSpeed): what trains, resuming, LoRA merging, bad data, the CLI's checks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from training_fixtures import write_llava_dataset, write_tiny_llm, write_vision_config
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from piip_llava import PIIPLlavaForConditionalGeneration
from piip_llava.cli import main as cli_main
from piip_llava.training import precision
from piip_llava.training.arguments import PIIPLlavaTrainingArguments, StageOptions
from piip_llava.training.assembly import assemble_piip_llava, load_vision_encoder, save_initial_model
from piip_llava.training.data import TRAINING_PAD_MULTIPLE
from piip_llava.training.freezing import (
    LANGUAGE_MODEL,
    PROJECTOR,
    VISION_BRANCHES,
    VISION_INTERACTIONS,
    parameter_part,
)
from piip_llava.training.trainer import checkpoint_problem, resolve_resume_checkpoint, run_training


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A stage-1 starting model (tiny LLaMA + tiny 2-branch PIIP) and both stages' datasets."""
    root = tmp_path_factory.mktemp("training")
    vision = load_vision_encoder(vision_config_path=write_vision_config(root / "vision.json"))
    model, processor = assemble_piip_llava(write_tiny_llm(root / "llm"), vision, projector_num_groups=8)
    # Random interaction weights stand in for a trained tower, so every vision parameter gets gradients.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter_part(name) == VISION_INTERACTIONS:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    init_dir = save_initial_model(model, processor, root / "init")
    captions, images = write_llava_dataset(root / "data", 16, "pretrain", with_bad=True)
    conversations, _ = write_llava_dataset(root / "data", 16, "finetune", text_only_every=4)
    return {"root": root, "init": init_dir, "captions": captions, "conversations": conversations, "images": images}


def training_arguments(output_dir, max_steps=3, learning_rate=1e-2, **overrides) -> PIIPLlavaTrainingArguments:
    options = {
        "output_dir": str(output_dir), "max_steps": max_steps, "per_device_train_batch_size": 2,
        "learning_rate": learning_rate, "save_strategy": "steps", "save_steps": 100, "logging_steps": 1,
        "report_to": "none", "remove_unused_columns": False, "use_cpu": True, "seed": 0, "warmup_steps": 0,
        "lr_scheduler_type": "constant", "disable_tqdm": True,
    }
    options.update(overrides)
    return PIIPLlavaTrainingArguments(**options)


def stage_options(workspace, stage, model_dir=None, **switches) -> StageOptions:
    data = workspace["captions"] if stage == "pretrain" else workspace["conversations"]
    return StageOptions(stage=stage, model_dir=str(model_dir or workspace["init"]), data_path=str(data),
                        image_folder=str(workspace["images"]), max_length=256, **switches)


def weights(directory) -> dict[str, torch.Tensor]:
    return PIIPLlavaForConditionalGeneration.from_pretrained(directory).state_dict()


def changed_parts(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(parts with at least one changed tensor, parts whose tensors are all bit-identical)."""
    changed, unchanged = set(), set()
    for name, tensor in before.items():
        (unchanged if torch.equal(tensor, after[name]) else changed).add((parameter_part(name), name))
    changed_parts_ = {part for part, _ in changed}
    return changed_parts_, {part for part, _ in unchanged} - changed_parts_


@pytest.mark.parametrize(
    ("stage", "switches", "trained", "frozen"),
    [
        ("pretrain", {}, {PROJECTOR}, {VISION_BRANCHES, VISION_INTERACTIONS, LANGUAGE_MODEL}),
        ("finetune", {}, {PROJECTOR, VISION_BRANCHES, VISION_INTERACTIONS, LANGUAGE_MODEL}, set()),
        ("finetune", {"freeze_vision_branches": True}, {PROJECTOR, VISION_INTERACTIONS, LANGUAGE_MODEL},
         {VISION_BRANCHES}),
        ("finetune", {"freeze_vision_tower": True}, {PROJECTOR, LANGUAGE_MODEL}, {VISION_BRANCHES, VISION_INTERACTIONS}),
        ("finetune", {"freeze_llm": True}, {PROJECTOR, VISION_BRANCHES, VISION_INTERACTIONS}, {LANGUAGE_MODEL}),
    ],
    ids=["stage1", "stage2", "stage2-frozen-branches", "stage2-frozen-tower", "stage2-frozen-llm"],
)
def test_frozen_parts_stay_bit_identical_and_trained_parts_change(workspace, tmp_path, stage, switches, trained, frozen):
    output = tmp_path / "out"
    run_training(stage_options(workspace, stage, **switches), training_arguments(output))
    before, after = weights(workspace["init"]), weights(output)
    for name, tensor in before.items():
        part = parameter_part(name)
        if part in frozen:
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"
    changed, _ = changed_parts(before, after)
    assert changed == trained

    listed_trainable = set((output / "trainable_parameters.txt").read_text().split())
    listed_frozen = set((output / "frozen_parameters.txt").read_text().split())
    assert listed_trainable | listed_frozen == set(dict(PIIPLlavaForConditionalGeneration.from_pretrained(
        workspace["init"]).named_parameters()))
    assert {parameter_part(name) for name in listed_frozen} == frozen


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(workspace, tmp_path, caplog):
    class StopAfter(TrainerCallback):
        """Simulates an interruption right after the checkpoint at `step` is written."""

        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    options = stage_options(workspace, "finetune")
    arguments = {"max_steps": 6, "learning_rate": 1e-3, "save_steps": 3, "lr_scheduler_type": "cosine"}
    run_training(options, training_arguments(tmp_path / "straight", **arguments))
    interrupted = tmp_path / "interrupted"
    run_training(options, training_arguments(interrupted, **arguments), callbacks=[StopAfter(3)])
    assert json.loads((interrupted / "trainer_state.json").read_text())["global_step"] == 3
    # A later checkpoint a kill cut short (weights half-written, no trainer_state.json) is passed over, saying so.
    half_written = interrupted / "checkpoint-5"
    half_written.mkdir()
    weights_bytes = (interrupted / "checkpoint-3" / "model.safetensors").read_bytes()
    (half_written / "model.safetensors").write_bytes(weights_bytes[: len(weights_bytes) // 2])
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            assert resolve_resume_checkpoint("auto", interrupted) == str(interrupted / "checkpoint-3")
            trainer = run_training(options, training_arguments(interrupted, **arguments), resume="auto")
    finally:
        hf_logging.disable_propagation()
    assert f"{half_written} is incomplete (no trainer_state.json)" in caplog.text
    assert trainer.state.global_step == 6
    # The trainer's batches come padded to the shared multiple (fewer shapes for bf16 kernels and tensor cores).
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % TRAINING_PAD_MULTIPLE == 0

    straight, resumed = weights(tmp_path / "straight"), weights(interrupted)
    assert not torch.equal(straight["lm_head.weight"], weights(interrupted / "checkpoint-3")["lm_head.weight"])
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_a_checkpoint_starts_fresh_and_a_wrong_path_is_an_error(tmp_path):
    assert resolve_resume_checkpoint("auto", tmp_path) is None
    assert resolve_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)


def write_checkpoint(directory, state="{}", weights=None):
    """A checkpoint-N directory as the Trainer leaves it: model weights, then trainer_state.json last."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({"weight": torch.zeros(64)}, directory / "model.safetensors")
    if weights is not None:
        (directory / "model.safetensors").write_bytes(weights((directory / "model.safetensors").read_bytes()))
    if state is not None:
        (directory / "trainer_state.json").write_text(state)
    return directory


def test_resume_passes_over_half_written_checkpoints_to_the_newest_complete_one(tmp_path):
    complete = write_checkpoint(tmp_path / "checkpoint-2")
    write_checkpoint(tmp_path / "checkpoint-4", weights=lambda data: data[:-40])
    write_checkpoint(tmp_path / "checkpoint-6", state='{"global_step": 6, "log_hi')
    write_checkpoint(tmp_path / "checkpoint-8", state=None)
    (tmp_path / "checkpoint-10").mkdir()
    assert resolve_resume_checkpoint("auto", tmp_path) == str(complete)
    full = (complete / "model.safetensors").stat().st_size
    assert checkpoint_problem(tmp_path / "checkpoint-4") == f"model.safetensors is truncated ({full - 40} of {full} bytes)"
    assert checkpoint_problem(tmp_path / "checkpoint-6") == "trainer_state.json is not valid JSON"
    assert checkpoint_problem(tmp_path / "checkpoint-10") == "no trainer_state.json"
    with pytest.raises(ValueError, match="checkpoint-8 is incomplete \\(no trainer_state.json\\); resume from an earlier"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").unlink(missing_ok=True)
    assert resolve_resume_checkpoint("auto", tmp_path) is None


def test_lora_run_merges_into_a_plain_checkpoint_with_the_peft_models_logits(workspace, tmp_path):
    from peft import PeftModel

    adapter_dir = tmp_path / "lora"
    trainer = run_training(stage_options(workspace, "finetune", lora_rank=4, lora_alpha=8, lora_dropout=0.0),
                           training_arguments(adapter_dir, max_steps=4, learning_rate=5e-2))
    trainable = (adapter_dir / "trainable_parameters.txt").read_text().split()
    assert any("lora_A" in name for name in trainable)
    assert not any(parameter_part(name) == LANGUAGE_MODEL for name in trainable)
    assert not any("lm_head" in name or "vision_tower.modules_to_save" not in name and "vision_tower" in name
                   for name in trainable)
    assert (adapter_dir / "adapter_config.json").is_file()
    del trainer

    merged_dir = tmp_path / "merged"
    cli_main(["train", "merge-lora", "--adapter", str(adapter_dir), "--out", str(merged_dir)])
    merged = PIIPLlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = PIIPLlavaForConditionalGeneration.from_pretrained(workspace["init"])
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()

    config = merged.config
    input_ids = torch.tensor([[1] + [config.image_token_index] * config.num_image_tokens + [20, 21, 22]])
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids, pixel_values=pixel_values).logits
        peft_logits = peft_model(input_ids=input_ids, pixel_values=pixel_values).logits
        base_logits = PIIPLlavaForConditionalGeneration.from_pretrained(workspace["init"]).eval()(
            input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3), "the LoRA run changed nothing"
    assert (merged_dir / "processor_config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()


def test_bad_samples_are_skipped_with_a_warning_and_counted_at_the_end(workspace, tmp_path, caplog):
    output = tmp_path / "out"
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            trainer = run_training(stage_options(workspace, "pretrain"), training_arguments(output, max_steps=10))
    finally:
        hf_logging.disable_propagation()
    assert trainer.state.global_step == 10
    messages = [record.getMessage() for record in caplog.records]
    assert any("Skipping training sample" in message and "bad-missing" in message for message in messages)
    assert any(message.startswith("Skipped 3 of 19 training records") for message in messages)
    summary = json.loads((output / "skipped_samples.json").read_text())
    assert summary["skipped"] == 3 and summary["total_records"] == 19
    assert {sample["id"] for sample in summary["samples"]} == {"bad-missing", "bad-corrupt", "bad-empty"}


def test_projector_gets_its_own_learning_rate(workspace, tmp_path):
    trainer = run_training(stage_options(workspace, "finetune"),
                           training_arguments(tmp_path / "out", max_steps=1, learning_rate=1e-4, projector_lr=3e-3,
                                              weight_decay=0.1))
    projector_ids = {id(parameter) for name, parameter in trainer.model.named_parameters()
                     if parameter_part(name) == PROJECTOR}
    for group in trainer.optimizer.param_groups:
        ids = {id(parameter) for parameter in group["params"]}
        assert ids <= projector_ids or not ids & projector_ids, "a group mixes projector and other parameters"
        assert group["initial_lr"] == (3e-3 if ids <= projector_ids else 1e-4)
    grouped = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    assert grouped == {id(parameter) for parameter in trainer.model.parameters() if parameter.requires_grad}


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"stage": "pretrain", "freeze_llm": True}, "stage-2 \\(finetune\\) options"),
        ({"stage": "finetune", "freeze_llm": True, "lora_rank": 8}, "cannot be combined with --freeze-llm"),
        ({"stage": "middle"}, "stage must be one of"),
    ],
)
def test_contradictory_switches_are_rejected_before_loading_anything(switches, message):
    with pytest.raises(ValueError, match=message):
        StageOptions(model_dir="unused", data_path="unused", **switches)


def test_cli_reports_missing_options_and_a_wrong_global_batch(tmp_path):
    with pytest.raises(SystemExit, match="needs --model, --data, --output-dir"):
        cli_main(["train", "--stage", "pretrain"])
    with pytest.raises(SystemExit, match="not a multiple"):
        cli_main(["train", "--stage", "pretrain", "--model", "m", "--data", "d", "--output-dir", str(tmp_path),
                  "--per-device-batch-size", "3", "--global-batch-size", "8"])
    with pytest.raises(SystemExit, match=r"--warmup-ratio must be in \[0, 1\), got 3.0"):
        cli_main(["train", "--stage", "pretrain", "--model", "m", "--data", "d", "--output-dir", str(tmp_path),
                  "--warmup-ratio", "3"])


@pytest.mark.parametrize(("content", "message"), [("[]", "holds no training records"), ("", "is empty"),
                                                  ('[{"id": "a", "conv', "is not valid JSON \\(.* line 1, column 14\\)")])
def test_train_cli_refuses_a_data_file_without_records_and_writes_no_model(workspace, tmp_path, content, message):
    data = tmp_path / "records.json"
    data.write_text(content)
    with pytest.raises(SystemExit, match=f"error: Training data file {data} {message}"):
        cli_main(["train", "--stage", "pretrain", "--model", str(workspace["init"]), "--data", str(data),
                  "--output-dir", str(tmp_path / "out"), "--use-cpu"])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_init_cli_assembles_a_model_that_keeps_the_llm_weights(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "init"
    cli_main(["train", "init", "--llm", str(workspace["root"] / "llm"), "--vision-config",
              str(workspace["root"] / "vision.json"), "--out", str(out), "--projector-groups", "8"])
    model = PIIPLlavaForConditionalGeneration.from_pretrained(out)
    llm = AutoModelForCausalLM.from_pretrained(workspace["root"] / "llm")
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["num_image_tokens"] == model.config.num_image_tokens == 16
    assert model.config.projector_antialias is False


def test_init_cli_builds_an_antialiased_projector_on_a_fixed_grid(workspace, tmp_path):
    out = tmp_path / "init"
    cli_main(["train", "init", "--llm", str(workspace["root"] / "llm"), "--vision-config",
              str(workspace["root"] / "vision.json"), "--out", str(out), "--projector-groups", "8",
              "--projector-grid", "2", "--projector-antialias"])
    model = PIIPLlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.projector_antialias is True and model.model.multi_modal_projector.antialias is True
    assert model.config.num_image_tokens == 4


def test_bf16_mixed_precision_with_gradient_checkpointing_trains(workspace, tmp_path, monkeypatch, caplog):
    # Seen as a CPU without hardware bfloat16, the run still trains in bf16 and says it is emulated.
    avx2_only = tmp_path / "cpuinfo"
    avx2_only.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    monkeypatch.setattr(precision, "CPU_INFO", avx2_only)
    output = tmp_path / "bf16"
    with caplog.at_level(logging.WARNING):
        trainer = run_training(
            stage_options(workspace, "finetune"),
            training_arguments(output, max_steps=2, bf16=True, gradient_checkpointing=True),
        )
    assert "without hardware bfloat16" in caplog.text
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed, _ = changed_parts(weights(workspace["init"]), weights(output))
    assert changed == {PROJECTOR, VISION_BRANCHES, VISION_INTERACTIONS, LANGUAGE_MODEL}


def test_the_train_command_tears_the_process_group_down_after_saving(workspace, tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        cli_main(["train", "--stage", "pretrain", "--model", str(workspace["init"]), "--data",
                  str(workspace["captions"]), "--image-folder", str(workspace["images"]), "--output-dir",
                  str(tmp_path / "stage1"), "--max-steps", "1", "--use-cpu", "--per-device-batch-size", "2"])
        assert (tmp_path / "stage1" / "model.safetensors").is_file()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
