"""Where each branch's architecture comes from when converting a released checkpoint.

A released Python config names each branch's pretrained model (`pretrained=...`). The
architecture is taken, in this order, from:

1. a local copy of that pretrained model's config (the name as a path, relative to the checkpoint
   directory or absolute: a directory holding `config.json`, or the json file itself);
2. the built-in table of the official names below;
3. the checkpoint's tensor shapes (widths, depths, layer counts, patch size, position grid).
   Attention heads cannot be read from shapes: the CLIP convention of 64-wide heads is assumed
   and reported, and a branch override (`num_attention_heads=...`) sets the real value.

Whatever the source, the result is checked against the tensor shapes, so a wrong local config or a
wrong override fails loudly instead of producing a silently broken model.
"""

from __future__ import annotations

import json
import os
import re

CLIP_ARCHITECTURE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
)


def _clip(hidden, intermediate, layers, heads, image_size, patch_size) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _convnext(depths, hidden_sizes) -> dict:
    return {
        "model_type": "convnext",
        "depths": list(depths),
        "hidden_sizes": list(hidden_sizes),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layer_scale_init_value": 1e-6,
        "drop_path_rate": 0.0,
    }


# The pretrained names the official configs use. The OpenGVLab CLIP-L "patch14to16" models are
# OpenAI's CLIP-L/14 with the patch kernel already resampled to 16, stored with 224/16 = 14 or
# 336/16 = 21 position grids.
KNOWN_CLIP_BACKBONES = {
    "OpenGVLab/clip-vit-large-patch14to16-224": _clip(1024, 4096, 24, 16, 224, 16),
    "OpenGVLab/clip-vit-large-patch14to16-336": _clip(1024, 4096, 24, 16, 336, 16),
    "openai/clip-vit-large-patch14": _clip(1024, 4096, 24, 16, 224, 14),
    "openai/clip-vit-large-patch14-336": _clip(1024, 4096, 24, 16, 336, 14),
    "openai/clip-vit-base-patch16": _clip(768, 3072, 12, 12, 224, 16),
    "openai/clip-vit-base-patch32": _clip(768, 3072, 12, 12, 224, 32),
}

# timm ConvNeXt architectures whose blocks use Linear MLPs (conv_mlp=False), i.e. the ones that
# transformers' ConvNext reproduces. Keyed by timm architecture name (the part before the ".tag").
KNOWN_CONVNEXT_ARCHITECTURES = {
    "convnext_tiny": _convnext((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": _convnext((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": _convnext((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": _convnext((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_large_mlp": _convnext((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": _convnext((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def _read_local_config(name: str, checkpoint_dir: str) -> tuple[dict, str] | None:
    """The json config a `pretrained` name points to on disk, if it does."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(checkpoint_dir, name)]
    for candidate in candidates:
        path = os.path.join(candidate, "config.json") if os.path.isdir(candidate) else candidate
        if os.path.isfile(path) and path.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle), path
    return None


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------
def clip_shapes(shapes: dict[str, tuple]) -> dict:
    """What a CLIP branch's tensors reveal; `shapes` has branch-relative official names."""
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", name))}
    kernel = shapes.get("embeddings.patch_embedding.weight")
    positions = shapes.get("embeddings.position_embedding.weight")
    fc1 = shapes.get("encoder.layers.0.mlp.fc1.weight")
    if kernel is None or positions is None or fc1 is None or not layers:
        raise ValueError("the checkpoint lacks the CLIP embedding or layer tensors needed to read the architecture")
    grid = round((positions[0] - 1) ** 0.5)
    return {
        "hidden_size": kernel[0],
        "intermediate_size": fc1[0],
        "num_hidden_layers": max(layers) + 1,
        "patch_size": kernel[-1],
        "position_grid": grid if grid * grid == positions[0] - 1 else None,
    }


def resolve_clip_backbone(pretrained: str | None, checkpoint_dir: str, shapes: dict | None) -> tuple[dict, str]:
    """(clip_vision_model config dict, where it came from)."""
    local = _read_local_config(pretrained, checkpoint_dir) if pretrained else None
    if local is not None:
        data, path = local
        if data.get("model_type") == "clip":
            data = {**data.get("vision_config", {}), "model_type": "clip_vision_model"}
        if data.get("model_type") != "clip_vision_model":
            raise ValueError(f"{path} is a {data.get('model_type')!r} config, not a CLIP vision config.")
        defaults = _clip(768, 3072, 12, 12, 224, 32)  # transformers' CLIPVisionConfig defaults
        backbone = {"model_type": "clip_vision_model"}
        backbone.update({key: data.get(key, defaults[key]) for key in CLIP_ARCHITECTURE_KEYS})
        return backbone, f"local config {path}"
    if pretrained in KNOWN_CLIP_BACKBONES:
        return dict(KNOWN_CLIP_BACKBONES[pretrained]), f"built-in table ({pretrained})"
    if shapes is None:
        raise ValueError(
            f"the CLIP branch names {pretrained!r}, which is neither a local path nor a known model, and no weights "
            f"were given to read its shapes from."
        )
    found = clip_shapes(shapes)
    hidden = found["hidden_size"]
    backbone = _clip(
        hidden,
        found["intermediate_size"],
        found["num_hidden_layers"],
        max(1, hidden // 64),
        (found["position_grid"] or 14) * found["patch_size"],
        found["patch_size"],
    )
    return backbone, "tensor shapes (attention heads assumed 64 wide; override num_attention_heads if not)"


def check_clip_against_shapes(branch: dict, shapes: dict) -> list[str]:
    """Disagreements between a CLIP branch entry and its tensors, as readable strings."""
    found = clip_shapes(shapes)
    backbone = branch["backbone_config"]
    problems = []
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if backbone[key] != found[key]:
            problems.append(f"{key} is {backbone[key]} in the config but {found[key]} in the weights")
    if branch["patch_size"] != found["patch_size"]:
        problems.append(
            f"patch size is {branch['patch_size']} in the config but the stored kernel is {found['patch_size']}"
        )
    if found["position_grid"] != branch["pretrain_grid_size"]:
        problems.append(
            f"the position grid is {branch['pretrain_grid_size']} per side in the config but "
            f"{found['position_grid']} in the weights"
        )
    if backbone["hidden_size"] % backbone["num_attention_heads"]:
        problems.append(
            f"hidden size {backbone['hidden_size']} is not divisible by {backbone['num_attention_heads']} heads"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# ConvNeXt
# ---------------------------------------------------------------------------------------------
def convnext_shapes(shapes: dict[str, tuple]) -> dict:
    """Depths, widths and layer-scale presence of a timm ConvNeXt from its (branch-relative) tensors."""
    depths, widths, layer_scale = {}, {}, False
    for name, shape in shapes.items():
        match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$", name)
        if not match:
            continue
        stage, block, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        depths[stage] = max(depths.get(stage, 0), block + 1)
        if rest == "conv_dw.weight":
            widths[stage] = shape[0]
        if rest in ("weight", "gamma"):
            layer_scale = True
        if rest == "mlp.fc1.weight" and len(shape) != 2:
            raise ValueError(
                "the ConvNeXt blocks use 1x1-conv MLPs (timm conv_mlp=True), which transformers' ConvNext does not "
                "implement"
            )
    if not depths or sorted(depths) != list(range(len(depths))) or sorted(widths) != sorted(depths):
        raise ValueError("the checkpoint lacks the ConvNeXt stage tensors needed to read the architecture")
    return {
        "depths": [depths[stage] for stage in range(len(depths))],
        "hidden_sizes": [widths[stage] for stage in range(len(depths))],
        "layer_scale": layer_scale,
    }


def resolve_convnext_backbone(pretrained: str | None, checkpoint_dir: str, shapes: dict | None) -> tuple[dict, str]:
    """(convnext config dict, where it came from)."""
    local = _read_local_config(pretrained, checkpoint_dir) if pretrained else None
    if local is not None:
        data, path = local
        if data.get("model_type") == "convnext":
            backbone = _convnext(data.get("depths", [3, 3, 9, 3]), data.get("hidden_sizes", [96, 192, 384, 768]))
            backbone["layer_scale_init_value"] = data.get("layer_scale_init_value", 1e-6)
            return backbone, f"local config {path}"
        architecture = str(data.get("architecture", "")).split(".")[0]
        if architecture in KNOWN_CONVNEXT_ARCHITECTURES:
            return dict(KNOWN_CONVNEXT_ARCHITECTURES[architecture]), f"local timm config {path} ({architecture})"
        raise ValueError(f"{path} names neither a transformers ConvNext config nor a known timm ConvNeXt architecture.")
    architecture = (pretrained or "").split(".")[0]
    if architecture in KNOWN_CONVNEXT_ARCHITECTURES:
        return dict(KNOWN_CONVNEXT_ARCHITECTURES[architecture]), f"built-in table ({pretrained})"
    if shapes is None:
        raise ValueError(
            f"the ConvNeXt branch names {pretrained!r}, which is neither a local path nor a known timm model, and no "
            f"weights were given to read its shapes from."
        )
    found = convnext_shapes(shapes)
    backbone = _convnext(found["depths"], found["hidden_sizes"])
    backbone["layer_scale_init_value"] = 1e-6 if found["layer_scale"] else 0.0
    return backbone, "tensor shapes"


def check_convnext_against_shapes(branch: dict, shapes: dict) -> list[str]:
    found = convnext_shapes(shapes)
    backbone = branch["backbone_config"]
    problems = []
    for key in ("depths", "hidden_sizes"):
        if list(backbone[key]) != found[key]:
            problems.append(f"{key} is {list(backbone[key])} in the config but {found[key]} in the weights")
    if (backbone.get("layer_scale_init_value", 1e-6) > 0) != found["layer_scale"]:
        problems.append("layer scale presence differs between the config and the weights")
    return problems


__all__ = [
    "KNOWN_CLIP_BACKBONES",
    "KNOWN_CONVNEXT_ARCHITECTURES",
    "check_clip_against_shapes",
    "check_convnext_against_shapes",
    "resolve_clip_backbone",
    "resolve_convnext_backbone",
]
