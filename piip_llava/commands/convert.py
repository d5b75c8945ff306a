"""`piip-llava convert`: a released PIIP-LLaVA or PIIP perception checkpoint directory -> our transformers directory."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..dtypes import DTYPES


def parse_branch_override(text: str) -> tuple[int, str, object]:
    """`BRANCH:KEY=VALUE` (e.g. `2:num_attention_heads=12`) -> (2, "num_attention_heads", 12)."""
    try:
        branch, assignment = text.split(":", 1)
        key, raw_value = assignment.split("=", 1)
        number = int(branch)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not BRANCH:KEY=VALUE (e.g. 2:num_attention_heads=12)") from error
    try:
        value = json.loads(raw_value)
    except json.JSONDecodeError:
        value = raw_value  # a bare string such as quick_gelu
    return number, key.strip(), value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert a released PIIP-LLaVA or PIIP perception checkpoint into a directory transformers loads.",
        description=(
            "Convert a released PIIP-LLaVA checkpoint (LLaVA-style config.json, the Python vision config it names, "
            "pytorch_model*.bin or model*.safetensors weights, tokenizer.model) into a directory that "
            "PIIPLlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained load; or an official "
            "PIIP perception model (config.py with model = dict(backbone=...), and model.safetensors or the official "
            ".pth) into a directory that AutoModelForImageClassification or PIIPBackbone loads. Nothing from the "
            "checkpoint is executed. A conversion_report.json lists every dropped or filled tensor."
        ),
    )
    parser.add_argument("--src", required=True, help="the released checkpoint directory")
    parser.add_argument(
        "--dst", required=True,
        help="the output directory: new or empty (see --overwrite), and neither the source nor inside or around it",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the contents of a non-empty --dst (its current files are deleted once the conversion succeeds)",
    )
    parser.add_argument(
        "--vision-config",
        help="the Python vision config file, when it is not where config.json's mm_vision_tower says",
    )
    parser.add_argument(
        "--branch-override",
        action="append",
        default=[],
        type=parse_branch_override,
        metavar="BRANCH:KEY=VALUE",
        help="set a branch backbone config value (1-based branch), e.g. 2:num_attention_heads=12; repeatable",
    )
    parser.add_argument("--allow-unused", action="store_true", help="drop checkpoint tensors that map to nothing")
    parser.add_argument(
        "--allow-missing", action="store_true", help="leave parameters without a checkpoint tensor at their init"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument(
        "--no-pad-to-square",
        action="store_true",
        help="centre-crop images instead of padding them to a square (the released models were evaluated padded)",
    )
    parser.add_argument(
        "--codebase",
        choices=["classification", "mmdet", "mmseg"],
        help="perception models: which official code base the config.py belongs to (default: from the config; "
        "a backbone without a decode_head is taken as mmdet)",
    )
    parser.set_defaults(handler=run)


def is_perception_checkpoint(src: str) -> bool:
    """An official perception directory has the Python config itself and no LLaVA config.json."""
    return os.path.isfile(os.path.join(src, "config.py")) and not os.path.isfile(os.path.join(src, "config.json"))


def run_perception(args: argparse.Namespace) -> int:
    from piip_llava.conversion.perception import convert_perception_checkpoint

    try:
        report = convert_perception_checkpoint(args.src, args.dst, codebase=args.codebase, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as error:
        print(f"piip-llava convert: {error}", file=sys.stderr)
        return 1
    print(
        f"Converted {args.src} -> {args.dst}: {report.architecture} ({report.codebase}), {report.renamed} tensors "
        f"renamed, {len(report.filled_with_ones)} layer scales filled with ones, {len(report.dropped)} dropped. "
        f"Details: {args.dst}/conversion_report.json"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if is_perception_checkpoint(args.src):
        return run_perception(args)
    from piip_llava.conversion import ConversionError, convert_released_checkpoint

    overrides: dict[int, dict] = {}
    for branch, key, value in args.branch_override:
        overrides.setdefault(branch, {})[key] = value
    try:
        report = convert_released_checkpoint(
            args.src,
            args.dst,
            vision_config_file=args.vision_config,
            branch_overrides=overrides,
            allow_unused=args.allow_unused,
            allow_missing=args.allow_missing,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            pad_to_square=not args.no_pad_to_square,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, ValueError) as error:
        print(f"piip-llava convert: {error}", file=sys.stderr)
        return 1
    print(
        f"Converted {args.src} -> {args.dst}: {report.renamed} tensors renamed, "
        f"{len(report.dropped_expected_unused)} expected-unused dropped, {len(report.unused)} unused dropped, "
        f"{len(report.missing)} missing, <image> = token {report.image_token_index}. "
        f"Details: {args.dst}/conversion_report.json"
    )
    return 0
