"""Parameter and compute cost of a PIIP vision encoder, per branch and for the interactions.

The encoder is built with its weights on the meta device (no memory, no initialisation cost) and
one forward pass runs on a meta tensor under `torch.utils.flop_counter.FlopCounterMode`, which
records every counted operation against the module that ran it.

Conventions, chosen to match the GFLOPs column of the PIIP papers:

- one multiply-add counts as one FLOP: reported numbers are GMACs, i.e. FlopCounterMode's count
  (which counts 2 per multiply-add) divided by two;
- counted: matrix products (linear layers, attention scores and attention-weighted values) and
  convolutions (patch embeddings, ConvNeXt convolutions, the ConvFFN's depthwise convolution);
- not counted: element-wise and normalisation work (LayerNorm, GELU, softmax, residual adds),
  resizing (`interpolate`) and the deformable attention's bilinear sampling (`grid_sample`),
  none of which FlopCounterMode (or the usual vision FLOP counters) records.

Costs are for one image at the encoder's input resolution.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers.utils import logging

from .models.piip import (
    PIIPBackbone,
    PIIPForImageClassification,
    PIIPPerceptionConfig,
    PIIPVisionConfig,
    PIIPVisionModel,
)

logger = logging.get_logger(__name__)

# The bundled configs live in the repository's top-level `configs/` folder; an installed package
# carries copies under `piip_llava/configs/` (see `package_data` in setup.py).
BUNDLED_CONFIG_DIRS = (
    Path(__file__).resolve().parent / "configs",
    Path(__file__).resolve().parent.parent / "configs",
    Path(__file__).resolve().parent / "configs" / "perception",
    Path(__file__).resolve().parent.parent / "configs" / "perception",
)


@dataclass
class ComponentCost:
    """Cost of one part of the encoder: a branch (its embeddings and blocks) or all interactions."""

    name: str
    parameters: int
    macs: int

    @property
    def gflops(self) -> float:
        """Multiply-adds in billions: the papers' "GFLOPs"."""
        return self.macs / 1e9


@dataclass
class EncoderCost:
    """Cost of a whole encoder for one image, split into components that add up to the total."""

    image_size: int
    components: list[ComponentCost] = field(default_factory=list)
    # Parts that run but that the published tables leave out of the total (listed after it).
    outside_total: list[ComponentCost] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(component.parameters for component in self.components)

    @property
    def macs(self) -> int:
        return sum(component.macs for component in self.components)

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "components": [dict(asdict(component), gflops=component.gflops) for component in self.components],
            "total": {"parameters": self.parameters, "macs": self.macs, "gflops": self.gflops},
            "outside_total": [dict(asdict(component), gflops=component.gflops) for component in self.outside_total],
        }


# ----- finding configs -------------------------------------------------------------------------
def bundled_config_names() -> list[str]:
    """Names (file stems) of the configs shipped with the project, e.g. `piip_vision_clip-bl_512-256`."""
    names = set()
    for directory in BUNDLED_CONFIG_DIRS:
        if directory.is_dir():
            names.update(path.stem for path in directory.glob("*.json"))
    return sorted(names)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file from a path, or from the name of a bundled config (with or without `.json`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    stem = path.name.removesuffix(".json")
    for directory in BUNDLED_CONFIG_DIRS:
        candidate = directory / f"{stem}.json"
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"No config file or bundled config named {str(name_or_path)!r}. "
        f"Bundled configs: {', '.join(bundled_config_names()) or 'none found'}."
    )


def load_vision_config(name_or_path: str | Path) -> PIIPVisionConfig | PIIPPerceptionConfig:
    """A `PIIPVisionConfig` (or a perception model's `PIIPPerceptionConfig`) from a JSON file, a model
    folder, or a bundled config name.

    A full PIIP-LLaVA config (which nests the encoder under `vision_config`) is accepted too, so
    the command works on a saved model folder.
    """
    path = resolve_config_path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if data.get("model_type") == PIIPPerceptionConfig.model_type:
        return PIIPPerceptionConfig.from_dict(data)
    if data.get("model_type") != PIIPVisionConfig.model_type and isinstance(data.get("vision_config"), dict):
        data = data["vision_config"]
    if "branches" not in data:
        raise ValueError(f"{path} is not a PIIP vision config: it has no 'branches' (nor a 'vision_config' with them).")
    return PIIPVisionConfig.from_dict(data)


# ----- counting --------------------------------------------------------------------------------
def build_empty_model(config: PIIPVisionConfig) -> PIIPVisionModel:
    """The encoder with parameters on the meta device, and eager attention.

    Eager attention makes attention a pair of plain batched matrix products, which every version of
    FlopCounterMode counts (fused CPU attention kernels are not in its formula table). The model's
    constructor computes drop-path rates with `.tolist()`, which a global `torch.device("meta")`
    context breaks, so only parameters and buffers (e.g. batch-norm statistics) are put on the meta
    device (accelerate's context does that).
    """
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    with init_empty_weights(include_buffers=True):
        model = PIIPVisionModel(config)
    return model.eval()


def _sdpa_for_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FlopCounterMode formula for the fused CPU attention kernel, which it does not know by default."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    formulas = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        formulas[cpu_attention] = _sdpa_for_cpu_flops
    return formulas


def _flops_by_module(model: PIIPVisionModel, image_size: int) -> dict[str, int]:
    """FlopCounterMode's totals for every module that ran, keyed by its path inside `model`."""
    pixel_values = torch.empty(1, 3, image_size, image_size, device="meta")
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas())
    with counter, torch.no_grad():
        model(pixel_values)
    by_module = {"<total>": counter.get_total_flops()}
    for module_path, counts in counter.get_flop_counts().items():
        # Paths start with the root module's class name ("PIIPVisionModel.branches.0..."); drop it.
        # The root itself and the "Global" entry hold the total, already recorded above.
        if "." in module_path:
            by_module[module_path.split(".", 1)[1]] = sum(counts.values())
    return by_module


def _outermost_total(by_module: dict[str, int], prefix: str) -> int:
    """Sum of the flops of the outermost modules under `prefix`.

    A module's count already includes its children's, so only modules whose parent is not itself
    listed under the prefix are added. Branches are never called as modules (the pyramid calls
    their `embed` / `run_blocks`), which is why the prefix's own entry may be missing.
    """
    if prefix in by_module:
        return by_module[prefix]
    paths = [path for path in by_module if path.startswith(prefix + ".")]
    outermost = [path for path in paths if not any(path.startswith(other + ".") for other in paths)]
    return sum(by_module[path] for path in outermost)


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def branch_label(config: PIIPVisionConfig, branch_index: int) -> str:
    """A readable name for a branch, e.g. `branch 1 (clip_vision_model @ 336)`."""
    branch = config.branches[branch_index]
    return f"branch {branch_index + 1} ({branch.backbone_type} @ {branch.image_size})"


def count_encoder_cost(config: PIIPVisionConfig | PIIPPerceptionConfig) -> EncoderCost:
    """Parameters and multiply-adds of each branch, of the interactions, and of anything else that computes."""
    if isinstance(config, PIIPPerceptionConfig):
        return count_perception_cost(config)
    model = build_empty_model(config)
    by_module = _flops_by_module(model, config.image_size)
    cost = EncoderCost(image_size=config.image_size)
    for index, branch in enumerate(model.branches):
        flops = _outermost_total(by_module, f"branches.{index}")
        cost.components.append(ComponentCost(branch_label(config, index), _parameter_count(branch), flops // 2))
    interaction_flops = _outermost_total(by_module, "interactions")
    cost.components.append(ComponentCost("interactions", _parameter_count(model.interactions), interaction_flops // 2))
    other_flops = by_module["<total>"] - sum(2 * component.macs for component in cost.components)
    if other_flops:
        logger.warning(f"{other_flops / 2e9:.3f} GMACs ran outside the branches and interactions; listed as 'other'.")
        cost.components.append(ComponentCost("other", 0, other_flops // 2))
    return cost


def perception_model_class(config: PIIPPerceptionConfig) -> type:
    """What a perception config describes: a classifier (its `architectures` says so) or a backbone."""
    if config.architectures and "PIIPForImageClassification" in config.architectures:
        return PIIPForImageClassification
    return PIIPBackbone


def count_perception_cost(config: PIIPPerceptionConfig) -> EncoderCost:
    """Parameters and multiply-adds of a perception model for one square image at its input size.

    The total is what the official tables report: for a classifier, the whole model (branches,
    interactions, heads); for a detection / segmentation backbone, the branches and interactions,
    and for the ConvNeXt detection backbones (`with_simple_fpn=False`) their merges too.
    A backbone's merges and output scales are listed after the total: the tables leave them out
    (their figures match the branches and interactions to 1-4%, and exceed them by far less
    than the merges' ~25M parameters and ~250 GFLOPs for PIIP-TSB 1568/1120/672).
    """
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    with init_empty_weights(include_buffers=True):
        model = perception_model_class(config)(config).eval()
    by_module = _flops_by_module(model, config.image_size)
    cost = EncoderCost(image_size=config.image_size)
    for index, (branch, branch_config) in enumerate(zip(model.piip.branches, config.branch_configs)):
        flops = _outermost_total(by_module, f"piip.branches.{index}")
        name = f"branch {index + 1} ({branch_config.branch_type}-{branch_config.hidden_size} @ {branch_config.image_size})"
        cost.components.append(ComponentCost(name, _parameter_count(branch), flops // 2))
    interaction_flops = _outermost_total(by_module, "piip.interactions")
    cost.components.append(ComponentCost("interactions", _parameter_count(model.piip.interactions), interaction_flops // 2))
    head_parameters = _parameter_count(model) - sum(component.parameters for component in cost.components)
    head_flops = by_module["<total>"] - sum(2 * component.macs for component in cost.components)
    if isinstance(model, PIIPForImageClassification):
        cost.components.append(ComponentCost("classification heads", head_parameters, head_flops // 2))
    elif not config.with_simple_fpn:
        # The ConvNeXt table counts the merges: the official `cal_flops` forward returns after the final
        # merge, before fpn1..fpn4 (det/piip_3branch.py). Its figures match ours with them, within 1%.
        merge_modules = [model.branch_merges, model.intermediate_merges, model.merge_weights]
        merge_parameters = sum(_parameter_count(module) for module in merge_modules)
        merge_flops = sum(_outermost_total(by_module, name) for name in ("branch_merges", "intermediate_merges", "merge_weights"))
        cost.components.append(ComponentCost("merges", merge_parameters, merge_flops // 2))
        if head_parameters > merge_parameters:  # a ConvNeXt last branch's merges are the outputs as they are
            cost.outside_total.append(
                ComponentCost("output scales", head_parameters - merge_parameters, (head_flops - merge_flops) // 2)
            )
    else:
        cost.outside_total.append(ComponentCost("merges and output scales", head_parameters, head_flops // 2))
    padding_macs = window_padding_macs(config)
    if padding_macs:
        # Counted above inside the branches; the official tables count windows on the unpadded grid.
        for index, macs in enumerate(padding_macs):
            cost.components[index].macs -= macs
        cost.outside_total.append(ComponentCost("padded window tokens", 0, sum(padding_macs)))
    return cost


def window_padding_macs(config: PIIPPerceptionConfig) -> list[int]:
    """Per branch, the multiply-adds spent on the zero tokens that pad grids to whole windows.

    Each windowed layer computes its attention products over whole windows (2 * padded tokens *
    window^2 * C instead of 2 * tokens * window^2 * C) and its output projection (and, when the
    tokens are padded before it, its q/k/v projection) on the padded tokens too.
    """
    per_branch = []
    for branch in config.branch_configs:
        grid = branch.image_size // branch.patch_size  # at the configured input size
        width = branch.hidden_size
        total = 0
        for window in branch.window_sizes:
            if window is None:
                continue
            padded = -(-grid // window) * window
            extra = padded * padded - grid * grid
            projections = 4 if branch.window_padding == "tokens" or branch.branch_type == "internvit" else 1
            total += extra * (2 * window * window * width + projections * width * width)
        per_branch.append(total)
    return per_branch if any(per_branch) else []


# ----- reporting -------------------------------------------------------------------------------
def format_cost_table(cost: EncoderCost, title: str | None = None) -> str:
    """A plain-text table: one row per component and a total row."""
    name_width = max(len("total"), *(len(component.name) for component in cost.components + cost.outside_total))
    header = f"{'component':<{name_width}}  {'params (M)':>11}  {'GFLOPs':>9}"
    rule = "-" * len(header)
    lines = [title] if title else []
    lines += [f"input {cost.image_size}x{cost.image_size}, 1 image; GFLOPs = multiply-adds / 1e9", header, rule]
    for component in cost.components:
        lines.append(f"{component.name:<{name_width}}  {component.parameters / 1e6:>11.2f}  {component.gflops:>9.2f}")
    lines.append(rule)
    lines.append(f"{'total':<{name_width}}  {cost.parameters / 1e6:>11.2f}  {cost.gflops:>9.2f}")
    if cost.outside_total:
        lines.append("not in the total (as in the official tables):")
        for component in cost.outside_total:
            lines.append(f"{component.name:<{name_width}}  {component.parameters / 1e6:>11.2f}  {component.gflops:>9.2f}")
    return "\n".join(lines)


__all__ = [
    "ComponentCost",
    "EncoderCost",
    "bundled_config_names",
    "count_encoder_cost",
    "count_perception_cost",
    "format_cost_table",
    "load_vision_config",
    "resolve_config_path",
]
