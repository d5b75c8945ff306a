"""Two-stage PIIP-LLaVA training on transformers' Trainer (with or without DeepSpeed ZeRO).

`run_training` is the whole run: load the starting model and its processor, choose what trains,
build the dataset, train (resuming if asked), save a `from_pretrained` directory with the
processor beside it, and record what was trained and which samples were skipped. The Trainer
subclass adds what LLaVA adds to the stock one (a separate projector learning rate and batches
grouped by modality and length) and makes sure a resumed run's samplers shuffle for the right epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import AutoTokenizer, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_NAME, logging

from ..models.piip.image_processing_piip import PIIPImageProcessor
from ..models.piip_llava import PIIPLlavaForConditionalGeneration
from ..models.piip_llava.processing_piip_llava import PIIPLlavaProcessor
from .arguments import PIIPLlavaTrainingArguments, StageOptions
from .data import TRAINING_PAD_MULTIPLE, LlavaDataCollator, LlavaSupervisedDataset
from .freezing import PROJECTOR as PROJECTOR_PART
from .freezing import apply_lora, merge_lora, parameter_part, set_trainable_parts, write_parameter_report
from .precision import warn_if_cpu_bf16_is_emulated
from .sampler import ModalityLengthGroupedSampler

logger = logging.get_logger(__name__)

SKIPPED_SAMPLES_FILE = "skipped_samples.json"


class SamplerEpochCallback(TrainerCallback):
    """Tells every sampler under the training data loader which epoch begins, so it shuffles for that epoch.

    The Trainer relies on accelerate to pass the epoch down, and accelerate loses the way when a
    resumed run skips the epoch's first batches on several processes: the skipping wrapper hides the
    per-process shard, so a sampler that shuffles by epoch (`ModalityLengthGroupedSampler`) keeps
    epoch 0 and the rest of the resumed epoch replays epoch 0's order (some samples twice, others
    never). The skipping loader reuses the samplers of the loader the callback is handed, so setting
    their epoch here reaches the ones that are iterated.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # Whole epochs done so far: a resumed state holds e.g. 1.375, a finished epoch exactly 1.0.
        epoch = int(state.epoch or 0)
        for sampler in samplers_under(train_dataloader):
            sampler.set_epoch(epoch)


def samplers_under(loader) -> list[Sampler]:
    """The samplers with a `set_epoch` reachable from a data loader through its (batch) sampler wrappers."""
    found, pending, seen = [], [loader], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Sampler) and callable(getattr(current, "set_epoch", None)):
            found.append(current)
        pending += [getattr(current, name, None) for name in ("sampler", "batch_sampler")]
    return found


class PIIPLlavaTrainer(Trainer):
    """The HF Trainer with LLaVA's additions, `projector_lr` and modality/length-grouped batches, and
    a resumed run that sees the samples of an uninterrupted one whatever the sampler (`SamplerEpochCallback`)."""

    args: PIIPLlavaTrainingArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(SamplerEpochCallback)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The default optimizer, with the projector's parameters in groups of their own at `projector_lr`.

        Four groups (projector or not, weight decay or not) keep the Trainer's rule of no decay on
        biases and norms. Without `projector_lr` this is exactly the stock optimizer.
        """
        projector_lr = getattr(self.args, "projector_lr", None)
        offloads = self.offloads_optimizer()
        if self.optimizer is not None or (projector_lr is None and not offloads):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups = {
            (is_projector, decays): {"params": [], "weight_decay": self.args.weight_decay if decays else 0.0}
            for is_projector in (False, True)
            for decays in (True, False)
        }
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                is_projector = parameter_part(name) == PROJECTOR_PART
                groups[(is_projector, name in decay_names)]["params"].append(parameter)
        for (is_projector, _), group in groups.items():
            if is_projector and projector_lr is not None:
                group["lr"] = projector_lr
        param_groups = [group for group in groups.values() if group["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if offloads:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # ZeRO-Offload steps the optimizer on the CPU and refuses torch's AdamW there.
            optimizer_cls = DeepSpeedCPUAdam
            optimizer_kwargs = {key: optimizer_kwargs[key] for key in ("lr", "betas", "eps") if key in optimizer_kwargs}
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        if projector_lr is not None:
            logger.info(f"Projector parameters train at lr {projector_lr}, the rest at {self.args.learning_rate}.")
        return self.optimizer

    def offloads_optimizer(self) -> bool:
        """Whether the DeepSpeed config offloads the optimizer state to the CPU (scripts/zero3_offload.json)."""
        if not self.is_deepspeed_enabled:
            return False
        zero = self.args.hf_deepspeed_config.config.get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)

    def _get_train_sampler(self, train_dataset=None):
        """LLaVA's modality/length-grouped order when asked for, else the Trainer's own sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(
            dataset.lengths,
            dataset.has_image,
            batch_size=self.args.train_batch_size,
            # One optimizer step consumes this many per-device batches.
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )


def load_processor(
    model_dir: str | Path, num_image_tokens: int, conversation_format: str, pad_to_square: bool | None = None
) -> PIIPLlavaProcessor:
    """The processor saved beside a model, with the chat template of `conversation_format`.

    Built from its parts rather than through `AutoProcessor`, so the stage's conversation format
    (and, when given, its image preprocessing) is the one saved with the output whatever the
    starting directory had: inference then prepares prompts and images as the last stage trained.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = PIIPImageProcessor.from_pretrained(model_dir)
    if pad_to_square is not None:
        image_processor.pad_to_square = pad_to_square
    return PIIPLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        conversation_format=conversation_format,
    )


def load_model(options: StageOptions, args: PIIPLlavaTrainingArguments) -> torch.nn.Module:
    """The starting model with the stage's parts trainable; wrapped by PEFT when LoRA is on.

    `args` must exist before this is called: under ZeRO-3 it is what makes `from_pretrained`
    load the weights already partitioned across processes.
    """
    if not (Path(options.model_dir) / "config.json").is_file():
        raise ValueError(
            f"{options.model_dir} is not a model directory (no config.json); stage 1 starts from "
            f"`piip-llava train init`'s output and stage 2 from stage 1's output."
        )
    refresh_deepspeed_config(args)
    model = PIIPLlavaForConditionalGeneration.from_pretrained(options.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if options.lora_rank > 0:
        return apply_lora(model, options.trainable_parts, options.lora_rank, options.lora_alpha, options.lora_dropout)
    set_trainable_parts(model, options.trainable_parts)
    return model


def refresh_deepspeed_config(args: PIIPLlavaTrainingArguments) -> None:
    """Fill the DeepSpeed config's "auto" batch sizes again, now with the real number of processes.

    `TrainingArguments` fills them when it is created, before the process group exists, so with
    world size 1; ZeRO-3's partitioned `from_pretrained` reads that config and rejects the batch
    sizes. Asking for `args.device` sets the process group up; a fresh config made afterwards
    (it registers itself as the one `from_pretrained` sees) has the right sizes. On the CPU
    (`use_cpu`) accelerate starts a plain gloo group, which DeepSpeed's own communication layer
    (read by ZeRO-3's partitioned loading) is then told to use.
    """
    logger.info(f"Process {args.process_index} of {args.world_size} on {args.device}.")
    if not args.deepspeed:
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)


def build_dataset(options: StageOptions, model_config, processor: PIIPLlavaProcessor) -> LlavaSupervisedDataset:
    dataset = LlavaSupervisedDataset(
        options.data_path,
        processor.tokenizer,
        processor.image_processor,
        num_image_tokens=model_config.num_image_tokens,
        image_folder=options.image_folder,
        conversation_format=options.conversation_format,
        image_token_id=model_config.image_token_index,
        max_length=options.max_length,
        image_aspect_ratio=options.image_aspect_ratio,
    )
    if options.scan_data:
        dataset.scan()
    return dataset


def warn_if_workers_hide_skips(options: StageOptions, args: PIIPLlavaTrainingArguments) -> None:
    """DataLoader workers skip bad records in their own copies of the dataset, out of the summary's sight."""
    if args.dataloader_num_workers > 0 and not options.scan_data:
        logger.warning(
            f"With {args.dataloader_num_workers} data loader workers, records skipped inside the workers are logged "
            f"but not counted in skipped_samples.json; pass --scan-data to check every record up front."
        )


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: `resume` itself if it is a path, the newest complete checkpoint-* if True.

    `--resume` with nothing found starts a fresh run (with a warning), so the same command works
    for the first launch and every relaunch after an interruption. A checkpoint a kill left
    half-written (see `checkpoint_problem`) is passed over for the one before it, with a warning.
    """
    if not resume:
        return None
    if isinstance(resume, str) and resume != "auto":
        if not Path(resume).is_dir():
            raise ValueError(f"Checkpoint to resume from {resume} does not exist.")
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ValueError(f"Checkpoint {resume} is incomplete ({problem}); resume from an earlier one, "
                             f"or pass --resume alone to take the newest complete one.")
        return resume
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=checkpoint_step, reverse=True)
    for checkpoint in checkpoints:
        if checkpoint_step(checkpoint) < 0 or not checkpoint.is_dir():
            continue
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            logger.info(f"Resuming from {checkpoint}.")
            return str(checkpoint)
        logger.warning(f"--resume: {checkpoint} is incomplete ({problem}), probably written when the run was "
                       f"stopped; passing over it for the checkpoint before it.")
    logger.warning(f"--resume: no complete checkpoint-* in {output_dir}; starting from the beginning.")
    return None


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint-N directory; -1 for anything else."""
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What makes a Trainer checkpoint unusable for resuming, or None when it is complete.

    The Trainer writes the weights, then the optimizer, scheduler and RNG states, and
    `trainer_state.json` last: without a readable state file the save did not finish. Weight files
    are also checked against the sizes their safetensors headers promise, so a truncated one is
    caught here rather than halfway through loading.
    """
    checkpoint = Path(checkpoint)
    state_file = checkpoint / TRAINER_STATE_NAME
    if not state_file.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is not valid JSON"
    weight_files = weight_files_of(checkpoint)
    if not weight_files:
        return "no model weights"
    for weight_file in weight_files:
        if not weight_file.is_file():
            return f"{weight_file.name} is missing"
        problem = safetensors_size_problem(weight_file)
        if problem is not None:
            return problem
    return None


def weight_files_of(checkpoint: Path) -> list[Path]:
    """The weight files a checkpoint holds or, through a safetensors index, promises."""
    index = checkpoint / f"{SAFE_WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError):
            return [index]
        return [checkpoint / shard for shard in sorted(shards)]
    return [checkpoint / name for name in (SAFE_WEIGHTS_NAME, "adapter_model.safetensors", "pytorch_model.bin")
            if (checkpoint / name).is_file()]


def safetensors_size_problem(path: Path) -> str | None:
    """Whether a .safetensors file is shorter than its header says (a write cut short), or unreadable."""
    if path.suffix != ".safetensors":
        return None if path.stat().st_size > 0 else f"{path.name} is empty"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        header_length = int.from_bytes(prefix, "little")
        if 8 + header_length > size:
            return f"{path.name} is truncated ({size} bytes, header of {header_length})"
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has an unreadable header"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def gather_skipped(dataset: LlavaSupervisedDataset) -> dict[int, tuple[str, str]]:
    """Every process's skipped records, merged: each rank only meets its own share of the data."""
    skipped = dict(dataset.skipped)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, skipped)
        for rank_skipped in gathered:
            skipped.update(rank_skipped)
    return skipped


def write_skipped_summary(dataset: LlavaSupervisedDataset, skipped: dict, output_dir: str | Path) -> dict:
    """Log how many records were skipped and why, and write them to `skipped_samples.json`."""
    by_reason: dict[str, int] = {}
    for reason, _ in skipped.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    summary = {
        "total_records": len(dataset),
        "skipped": len(skipped),
        "by_reason": dict(sorted(by_reason.items())),
        "samples": [
            {"index": index, "id": dataset.record_id(index), "reason": reason, "detail": detail}
            for index, (reason, detail) in sorted(skipped.items())
        ],
    }
    if skipped:
        counts = ", ".join(f"{reason}: {count}" for reason, count in summary["by_reason"].items())
        logger.warning(f"Skipped {len(skipped)} of {len(dataset)} training records ({counts}).")
    else:
        logger.info(f"All training records met during the run were usable ({len(dataset)} records).")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / SKIPPED_SAMPLES_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def run_training(
    options: StageOptions,
    args: PIIPLlavaTrainingArguments,
    resume: str | bool | None = None,
    callbacks: list | None = None,
) -> PIIPLlavaTrainer:
    """One training stage from `options.model_dir` to `args.output_dir`; returns the finished Trainer.

    The output directory ends up with the model (`from_pretrained`-loadable; the LoRA adapter
    and its trained full copies when LoRA is on, see `merge_lora_checkpoint`), the processor with
    the stage's chat template, `trainer_state.json`, the trainable/frozen parameter lists and
    `skipped_samples.json`.
    """
    model = load_model(options, args)
    config = model.config
    processor = load_processor(
        options.model_dir,
        config.num_image_tokens,
        options.conversation_format,
        pad_to_square=options.image_aspect_ratio == "pad",
    )
    dataset = build_dataset(options, config, processor)
    warn_if_workers_hide_skips(options, args)
    warn_if_cpu_bf16_is_emulated(args.bf16, args.use_cpu or not torch.cuda.is_available())
    if processor.tokenizer.pad_token_id is None:
        raise ValueError(f"The tokenizer in {options.model_dir} has no pad token; `piip-llava train init` adds one.")
    trainer = PIIPLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaDataCollator(pad_token_id=processor.tokenizer.pad_token_id,
                                        pad_to_multiple_of=TRAINING_PAD_MULTIPLE),
        processing_class=processor,
        callbacks=callbacks,
    )
    if args.should_save:
        write_parameter_report(model, args.output_dir)
    checkpoint = resolve_resume_checkpoint(resume, args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    skipped = gather_skipped(dataset)
    if args.should_save:
        write_skipped_summary(dataset, skipped, args.output_dir)
    return trainer


def merge_lora_checkpoint(adapter_dir: str | Path, output_dir: str | Path, base_model_dir: str | Path | None = None):
    """Fold a LoRA run's adapter into its base model and save a plain PIIP-LLaVA directory with the processor.

    The base is the directory the LoRA run started from (recorded in the adapter config) unless
    `base_model_dir` says otherwise.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json; give the output directory of a LoRA run.")
    base_model_dir = base_model_dir or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base_model_dir or not (Path(base_model_dir) / "config.json").is_file():
        raise ValueError(
            f"The adapter's base model {base_model_dir!r} is not a model directory; pass the directory the LoRA run "
            f"started from (--base)."
        )
    base = PIIPLlavaForConditionalGeneration.from_pretrained(base_model_dir, dtype=torch.float32)
    merged = merge_lora(PeftModel.from_pretrained(base, adapter_dir))
    merged.save_pretrained(output_dir)
    processor_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_model_dir)
    conversation_format = json_field(processor_source / "processor_config.json", "conversation_format")
    load_processor(processor_source, merged.config.num_image_tokens, conversation_format).save_pretrained(output_dir)
    logger.info(f"Merged the adapter in {adapter_dir} into {base_model_dir}; saved to {output_dir}.")
    return merged


def json_field(path: Path, key: str):
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(key)
