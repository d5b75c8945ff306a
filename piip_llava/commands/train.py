"""`piip-llava train`: the two PIIP-LLaVA training stages, plus `train init` and `train merge-lora`.

    piip-llava train init --llm DIR (--vision-model DIR | --vision-config FILE) --out DIR
    piip-llava train --stage pretrain --model INIT_DIR --data captions.json --image-folder IMGS --output-dir OUT1
    piip-llava train --stage finetune --model OUT1 --data mix665k.json --image-folder IMGS --output-dir OUT2
    piip-llava train merge-lora --adapter OUT2 --out MERGED

Launch on several GPUs or nodes through the DeepSpeed launcher (see scripts/pretrain.sh and
docs/training.md): `deepspeed --no_local_rank --module piip_llava train ... --deepspeed scripts/zero2.json`.
"""

from __future__ import annotations

from transformers.utils import logging

from ..dtypes import DTYPES

logger = logging.get_logger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train PIIP-LLaVA (stage 1 pretrain, stage 2 finetune), assemble a start model, merge LoRA",
        description="Train one PIIP-LLaVA stage with the HF Trainer (optionally under DeepSpeed ZeRO). "
        "Subcommands: `init` assembles the stage-1 starting model, `merge-lora` folds a LoRA run into a plain one. "
        "Each option is a field of StageOptions or TrainRunArguments (piip_llava.training.arguments), written "
        "with dashes or underscores.",
        parents=[stage_arguments_parser()],
        # `train init --out` must not read as an abbreviation of --output_dir / --output-dir.
        allow_abbrev=False,
    )
    parser.set_defaults(handler=run_train)
    commands = parser.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    add_init_parser(commands)
    add_merge_parser(commands)


def stage_arguments_parser():
    """transformers' `HfArgumentParser` over the run's two dataclasses: a flag per field, named as the field."""
    from transformers import HfArgumentParser

    from ..training.arguments import StageOptions, TrainRunArguments

    return HfArgumentParser((StageOptions, TrainRunArguments), add_help=False)


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


def stage_arguments(args):
    """The parsed `train` options as (`StageOptions`, `TrainRunArguments`); a ValueError naming missing flags."""
    missing = [flag for flag, value in (("--stage", args.stage), ("--model", args.model_dir), ("--data", args.data_path),
                                        ("--output-dir", args.output_dir)) if value is None]
    if missing:
        raise ValueError(f"piip-llava train needs {', '.join(missing)}.")
    return stage_arguments_parser().parse_dict(vars(args), allow_extra_keys=True)


def run_train(args) -> int:
    from ..training.trainer import run_training

    try:
        options, run_arguments = stage_arguments(args)
        training_arguments = run_arguments.training_arguments(options.recipe)
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
