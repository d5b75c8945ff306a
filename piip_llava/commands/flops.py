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
        "(e.g. piip_vision_clip-bl_512-256); for a UperNet or RT-DETR folder (or config) with a PIIP backbone, "
        "the backbone's share of the task model's cost",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(handler=run_flops)


def run_flops(args) -> int:
    # Imported here so that `piip-llava --help` does not pay for importing torch and transformers models.
    from ..flops import count_encoder_cost, format_cost_table, load_vision_config, resolve_config_path

    try:
        config_path = resolve_config_path(args.config)
        if is_task_model_config(config_path):
            return run_task_model_flops(config_path, args)
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


def is_task_model_config(config_path) -> bool:
    """Whether the JSON is a UperNet / RT-DETR config (whose backbone may be a PIIP one)."""
    from ..perception_tasks.cost import TASK_MODEL_TYPES

    try:
        return json.loads(config_path.read_text(encoding="utf-8")).get("model_type") in TASK_MODEL_TYPES
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error


def run_task_model_flops(config_path, args) -> int:
    """Parameters and GFLOPs of a task model with a PIIP backbone, and the backbone's share of them."""
    import piip_llava  # noqa: F401  (registers the PIIP backbone config for AutoConfig)

    from ..models.piip import PIIPPerceptionConfig
    from ..perception_tasks.cost import format_task_cost, load_task_config, task_model_cost

    config = load_task_config(config_path)
    if not isinstance(config.backbone_config, PIIPPerceptionConfig):
        print(f"error: {config_path} has a {type(config.backbone_config).__name__} backbone, not a PIIP one.", file=sys.stderr)
        return 2
    cost = task_model_cost(config)
    if args.json:
        print(json.dumps({"config": str(config_path), **cost}, indent=2))
    else:
        print(format_task_cost(cost, title=f"{config_path.parent.name} ({config_path})"))
    return 0
