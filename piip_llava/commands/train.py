"""`piip-llava train`: the two PIIP-LLaVA training stages, plus `train init` and `train merge-lora`.

    piip-llava train init --llm DIR (--vision-model DIR | --vision-config FILE) --out DIR
    piip-llava train --stage pretrain --model INIT_DIR --data captions.json --image-folder IMGS --output-dir OUT1
    piip-llava train --stage finetune --model OUT1 --data mix665k.json --image-folder IMGS --output-dir OUT2
    piip-llava train merge-lora --adapter OUT2 --out MERGED

Launch on several GPUs or nodes through the DeepSpeed launcher (see scripts/pretrain.sh and
docs/training.md): `deepspeed --no_local_rank --module piip_llava train ... --deepspeed scripts/zero2.json`.
"""

from __future__ import annotations

import argparse
import os

from transformers.utils import logging

from ..dtypes import DTYPES

logger = logging.get_logger(__name__)



def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train PIIP-LLaVA (stage 1 pretrain, stage 2 finetune), assemble a start model, merge LoRA",
        description="Train one PIIP-LLaVA stage with the HF Trainer (optionally under DeepSpeed ZeRO). "
        "Subcommands: `init` assembles the stage-1 starting model, `merge-lora` folds a LoRA run into a plain one.",
    )
    add_stage_arguments(parser)
    parser.set_defaults(handler=run_train)
    commands = parser.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    add_init_parser(commands)
    add_merge_parser(commands)


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--stage", choices=("pretrain", "finetune"), help="pretrain: stage 1; finetune: stage 2")
    run.add_argument("--model", help="starting model directory (`train init` output, or stage 1's output)")
    run.add_argument("--data", help="LLaVA-format .json/.jsonl records")
    run.add_argument("--image-folder", help="folder the records' image paths are relative to")
    run.add_argument("--output-dir", help="where checkpoints and the final model go")
    run.add_argument("--deepspeed", help="DeepSpeed config JSON (scripts/zero2.json, zero3.json, zero3_offload.json)")
    run.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                     help="resume from CHECKPOINT, or with no value from the newest checkpoint-* in --output-dir")
    run.add_argument("--seed", type=int, default=42,
                     help="seed of the weight initialisation, dropout and the sample order (default: 42)")
    run.add_argument("--use-cpu", action="store_true", help="train on the CPU even if a GPU is present")
    run.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (default: none)")
    # The DeepSpeed launcher passes --local_rank unless started with --no_local_rank; LOCAL_RANK is used instead.
    run.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)

    optim = parser.add_argument_group("optimisation (defaults: the stage's LLaVA-1.5 recipe)")
    optim.add_argument("--learning-rate", type=float, help="1e-3 for pretrain, 2e-5 for finetune")
    optim.add_argument("--projector-lr", type=float, help="a separate learning rate for the projector")
    optim.add_argument("--weight-decay", type=float, default=0.0,
                       help="AdamW weight decay; biases and norms never decay (default: 0)")
    optim.add_argument("--warmup-ratio", type=float, default=0.03,
                       help="fraction of the optimizer steps spent warming the learning rate up, in [0, 1) "
                       "(default: 0.03)")
    optim.add_argument("--lr-scheduler", default="cosine",
                       help="learning-rate schedule after warm-up: a transformers SchedulerType such as cosine, "
                       "linear, constant (default: cosine)")
    optim.add_argument("--epochs", type=float, default=1.0,
                       help="passes over the data; fractions allowed; --max-steps overrides it (default: 1)")
    optim.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    optim.add_argument("--per-device-batch-size", type=int, default=4,
                       help="samples per forward pass on each process (default: 4)")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=None,
                       help="forward passes per optimizer step (default: 1, or what --global-batch-size implies)")
    optim.add_argument("--global-batch-size", type=int,
                       help="samples per optimizer step over all processes; sets the accumulation steps")
    optim.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    optim.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, one more forward pass of compute")

    data = parser.add_argument_group("data")
    data.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens, image tokens included")
    data.add_argument("--conversation-format", choices=("plain", "vicuna_v1"), help="default: the stage's")
    data.add_argument("--image-aspect-ratio", choices=("pad", "crop"), help="default: crop for pretrain, pad for finetune")
    data.add_argument("--group-by-modality-length", action=argparse.BooleanOptionalAction, default=None,
                      help="batch image and text-only samples apart, sorted by length (default: on for finetune)")
    data.add_argument("--dataloader-workers", type=int, default=0,
                      help="processes that load and tokenize samples beside training (default: 0, in the main "
                      "process)")
    data.add_argument("--scan-data", action="store_true",
                      help="check every record before training so skipped_samples.json covers all of them")

    saving = parser.add_argument_group("checkpoints and logging")
    saving.add_argument("--save-steps", type=int, default=500, help="save a checkpoint-N every this many steps")
    saving.add_argument("--save-total-limit", type=int, default=2, help="keep at most this many checkpoints")
    saving.add_argument("--logging-steps", type=int, default=1,
                        help="log the loss and learning rate every this many steps (default: 1)")

    parts = parser.add_argument_group("what trains (stage 2)")
    parts.add_argument("--freeze-vision-branches", action="store_true",
                       help="keep the pretrained vision branches fixed; the interactions still train")
    parts.add_argument("--freeze-vision-tower", action="store_true",
                       help="keep the whole vision encoder fixed, interactions included (as LLaVA-1.5 does)")
    parts.add_argument("--freeze-llm", action="store_true", help="keep the language model fixed")
    parts.add_argument("--lora-rank", type=int, default=0, help="LoRA on the LLM's linear layers (LLaVA: 128)")
    parts.add_argument("--lora-alpha", type=int, default=256, help="LoRA scaling numerator (LLaVA: 256)")
    parts.add_argument("--lora-dropout", type=float, default=0.05,
                       help="dropout on the LoRA branch's input (LLaVA: 0.05)")


def add_init_parser(commands) -> None:
    parser = commands.add_parser(
        "init",
        help="assemble the stage-1 starting model from a local LLM and a PIIP encoder",
        description="Build a PIIP-LLaVA from a local causal LM directory and a PIIP encoder (a saved "
        "PIIPVisionModel, e.g. from PIIPVisionModel.from_pretrained_branches, or a config for a fresh one), "
        "add <image> to the tokenizer and save model + processor.",
    )
    parser.add_argument("--llm", required=True, help="local causal LM directory with its tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vision-model", help="saved PIIPVisionModel directory")
    source.add_argument("--vision-config", help="PIIPVisionConfig JSON (randomly initialised encoder)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--projector-norm", default="group_norm", choices=("group_norm", "layer_norm"),
                        help="norm between the two linear layers of each branch's projector: group_norm (the released "
                        "checkpoints; --projector-groups groups) or layer_norm")
    parser.add_argument("--projector-groups", type=int, default=32, help="GroupNorm groups of the projector")
    parser.add_argument(
        "--projector-grid", type=int, help="resize every branch map to this grid (default: the last branch's grid)"
    )
    parser.add_argument("--projector-antialias", action="store_true",
                        help="average each grid cell of a map shrunk onto the grid instead of reading it at one point")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype the weights are saved in")
    parser.set_defaults(handler=run_init)


def add_merge_parser(commands) -> None:
    parser = commands.add_parser(
        "merge-lora",
        help="fold a LoRA run's adapter into its base model and save a plain checkpoint",
    )
    parser.add_argument("--adapter", required=True, help="output directory of a LoRA run")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    parser.set_defaults(handler=run_merge)


def gradient_accumulation_steps(args) -> int:
    """Steps to accumulate: given, or derived from --global-batch-size and the launched world size."""
    if args.global_batch_size is None:
        return args.gradient_accumulation_steps or 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.per_device_batch_size * world_size
    if args.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --per-device-batch-size "
            f"{args.per_device_batch_size} x {world_size} processes."
        )
    steps = args.global_batch_size // per_step
    if args.gradient_accumulation_steps not in (None, steps):
        raise ValueError(
            f"--gradient-accumulation-steps {args.gradient_accumulation_steps} contradicts --global-batch-size "
            f"{args.global_batch_size} ({steps} steps for {world_size} processes); give only one of them."
        )
    return steps


def build_options(args):
    from ..training.arguments import StageOptions

    missing = [flag for flag, value in (("--stage", args.stage), ("--model", args.model), ("--data", args.data),
                                        ("--output-dir", args.output_dir)) if value is None]
    if missing:
        raise ValueError(f"piip-llava train needs {', '.join(missing)}.")
    return StageOptions(
        stage=args.stage,
        model_dir=args.model,
        data_path=args.data,
        image_folder=args.image_folder,
        max_length=args.max_length,
        conversation_format=args.conversation_format,
        image_aspect_ratio=args.image_aspect_ratio,
        freeze_vision_branches=args.freeze_vision_branches,
        freeze_vision_tower=args.freeze_vision_tower,
        freeze_llm=args.freeze_llm,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        scan_data=args.scan_data,
    )


def build_training_arguments(args, options):
    from ..training.arguments import PIIPLlavaTrainingArguments

    recipe = options.recipe
    if not 0 <= args.warmup_ratio < 1:
        # transformers reads a warm-up of 1 or more as a number of steps, not a fraction.
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}.")
    group_by_modality = recipe.group_by_modality_length
    if args.group_by_modality_length is not None:
        group_by_modality = args.group_by_modality_length
    return PIIPLlavaTrainingArguments(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        seed=args.seed,
        use_cpu=args.use_cpu,
        report_to=args.report_to,
        learning_rate=args.learning_rate if args.learning_rate is not None else recipe.learning_rate,
        projector_lr=args.projector_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps(args),
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        group_by_modality_length=group_by_modality,
        dataloader_num_workers=args.dataloader_workers,
        remove_unused_columns=False,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        log_level="info",
        log_level_replica="warning",
    )


def run_train(args) -> int:
    from ..training.trainer import run_training

    try:
        options = build_options(args)
        training_arguments = build_training_arguments(args, options)
        # Bad data files, checkpoints or model directories are reported as ValueErrors the user can act on.
        trainer = run_training(options, training_arguments, resume=args.resume)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    logger.info(f"Finished {options.stage} after {trainer.state.global_step} steps; model in {args.output_dir}.")
    # Tear the process group down now, on every process: left to interpreter exit, gloo's threads were
    # sometimes still joinable when the C++ runtime shut down ("terminate called without an active
    # exception"), and a 2-process CPU run aborted after saving its model (1 run in 4).
    trainer.accelerator.end_training()
    return 0


def run_init(args) -> int:
    from ..training.assembly import assemble_piip_llava, load_vision_encoder, save_initial_model

    try:
        vision = load_vision_encoder(args.vision_model, args.vision_config)
        model, processor = assemble_piip_llava(
            args.llm,
            vision,
            projector_norm=args.projector_norm,
            projector_num_groups=args.projector_groups,
            projector_output_grid_size=args.projector_grid,
            projector_antialias=args.projector_antialias,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    save_initial_model(model, processor, args.out, dtype=args.dtype)
    logger.warning(f"Saved the stage-1 starting model to {args.out}.")
    return 0


def run_merge(args) -> int:
    from ..training.trainer import merge_lora_checkpoint

    try:
        merge_lora_checkpoint(args.adapter, args.out, base_model_dir=args.base)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return 0
