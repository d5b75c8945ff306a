"""`piip-llava flops CONFIG`: parameters and GFLOPs of a PIIP vision encoder, per branch and in total."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="parameters and GFLOPs of a PIIP vision encoder",
        description="Count the parameters and GFLOPs (multiply-adds, the papers' convention) of a PIIP vision "
        "encoder for one image, per branch and for the interactions. Nothing is downloaded and no weights are "
        "allocated: the encoder is built on the meta device. Element-wise work (norms, activations, resizing, "
        "the deformable attention's bilinear sampling) is not counted.",
    )
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="a PIIP vision config JSON, a model folder, or the name of a bundled config "
        "(e.g. piip_vision_clip-bl_512-256)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(handler=run_flops)


def run_flops(args) -> int:
    # Imported here so that `piip-llava --help` does not pay for importing torch and transformers models.
    from ..flops import count_encoder_cost, format_cost_table, load_vision_config, resolve_config_path

    try:
        config_path = resolve_config_path(args.config)
        config = load_vision_config(config_path)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cost = count_encoder_cost(config)
    if args.json:
        print(json.dumps({"config": str(config_path), **cost.to_dict()}, indent=2))
    else:
        print(format_cost_table(cost, title=f"{config_path.stem} ({config_path})"))
    return 0
