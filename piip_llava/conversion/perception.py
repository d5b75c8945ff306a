"""Convert an official PIIP perception model (classifier, or mmdet / mmseg backbone) into our directory.

`convert_perception_checkpoint(src, dst)` reads `src/config.py` as data (its `model = dict(
backbone=...)`), builds a `PIIPPerceptionConfig`, renames the official weights (`model.safetensors`,
or a `.pth`: classification saves `{"model": state_dict}`, mmdet / mmseg `{"state_dict": ...}` with a
`backbone.` prefix; read with `weights_only=True`), loads them strictly and saves a directory that
`AutoModelForImageClassification` or `AutoBackbone` loads. A classifier also gets the image
processor of the official evaluation transform (shorter side to size / 0.875, bicubic, centre
crop, ImageNet mean and std).

Official -> ours, per branch `branch{i}` -> `piip.branches.{i-1}`:

| official                                   | ours (DeiT: `Dinov2Layer`, InternViT: `InternVLVisionLayer`)        |
|--------------------------------------------|---------------------------------------------------------------------|
| `patch_embed.proj`, `pos_embed`, `cls_token` | `patch_embedding`, `position_embedding`, `cls_token`              |
| `blocks.J.norm1` / `norm2`                 | `layers.J.norm1` / `norm2` (DeiT), `layernorm_before` / `layernorm_after` |
| `blocks.J.attn.qkv` (fused)                | `layers.J.attention.{q_proj,k_proj,v_proj}` (split in three)        |
| `blocks.J.attn.proj`                       | `attention.o_proj` (DeiT), `attention.projection_layer` (InternViT) |
| `blocks.J.attn.{q_norm,k_norm}`            | `attention.{q_norm,k_norm}`                                         |
| `blocks.J.gamma_1/2`, `blocks.J.ls1/2.gamma` | `layer_scale1/2.lambda1` (DeiT), `lambda_1/2` (InternViT); ones when the official block has none |
| `blocks.J.mlp.fc1/fc2`                     | `layers.J.mlp.fc1/fc2`                                              |
| BEiT: `attn.q_bias` / `attn.v_bias`        | `attention.q_proj.bias` / `v_proj.bias` (`BeitLayer`; k has none)   |
| BEiT: `attn.relative_position_bias_table`  | `relative_position_biases.J.relative_position_bias_table`           |
| Uni-Perceiver: `visual_embed.*`, `layers.J.{self_attn.in_proj,self_attn.out_proj,linear1,linear2,gamma_1/2}` | `patch_embedding`, `position_embedding`, `temporal_position`, `embedding_norm`; `Dinov2Layer` parts as DeiT's |
| `norm`, `head` (separate heads)            | `branch_norms.{i-1}`, `branch_classifiers.{i-1}`                    |
| `convnext_model.embeddings.*` (ConvNeXt)   | `embeddings.*` (the LLaVA encoder's `ConvNextBranch`)               |
| `convnext_model.encoder.stages.*`          | `stages.*`; `convnext_model.layernorm` (unused by PIIP) is dropped  |

Interactions as in the LLaVA mapping (`interaction_units_PQ` -> `units.{P-1}`, `ca_gamma` /
`cffn_gamma` -> `attn_gate` / `ffn_gate`); heads: `w1..wN` -> `merge_weights.weights`, shared
classification `merge_branch1` -> `branch_merges.0`, `merge_branch{i}.{0,2,4}` ->
`branch_merges.{i-1}.{norm_in,proj,norm_out}`, `cls_norm` / `cls_head` -> `merged_norm` /
`classifier`; dense `merge_branch{i}.*` -> `branch_merges.{i-1}.*`, `fpn1.*` -> `upsample_4x.*`,
`fpn2.0` -> `upsample_2x`; `with_simple_fpn=False`: `intermediate_merging_{k}_branch{i}.*` /
`intermediate_merging_{k}_w{i}` -> `intermediate_merges.{level}.branch_merges.{i-1}.*` /
`.merge_weights.weights`, with `level` the position of `k` in `out_interaction_indexes`.

A ConvNeXt branch's architecture is what the official `ConvNextModel.from_pretrained(pretrained)`
reads: for the released `facebook/convnext-{tiny,small,base,large,xlarge}-*` names, the published
shapes (`CONVNEXT_ARCHITECTURES`); otherwise `pretrained` must be a local directory (relative to the
config's directory) holding its `config.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, ConvNextConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from piip_llava.models.piip.configuration_piip_perception import PerceptionBranchConfig, PIIPPerceptionConfig
from piip_llava.models.piip.modeling_piip_perception import PIIPBackbone, PIIPForImageClassification

from .converter import check_destination, move_into_place, staging_directory
from .python_config import parse_python_config

DENSE_TYPES = {"PIIPTwoBranch": 2, "PIIPThreeBranch": 3, "PIIPFourBranch": 4}
CODEBASES = ("classification", "mmdet", "mmseg")
EVAL_CROP_RATIO = 0.875  # classification/main.py --eval-crop-ratio default

INTERACTION_KEYS = {
    "n_points", "deform_num_heads", "cffn_ratio", "deform_ratio", "with_cffn", "interact_attn_type",
    "interaction_drop_path_rate", "interaction_proj", "norm_layer",
}  # fmt: skip
TOP_LEVEL_KEYS = {
    "classification": INTERACTION_KEYS | {"separate_head", "num_classes", "use_cls_head"},
    "mmdet": INTERACTION_KEYS | {"type", "_delete_", "pretrained", "is_dino", "with_simple_fpn", "out_interaction_indexes", "cal_flops"},
    "mmseg": INTERACTION_KEYS | {"type", "_delete_", "pretrained"},
}  # fmt: skip
# Options only the official BEiT wrapper (det/beit.py) takes.
BEIT_KEYS = {"use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias"}
# Branch keys this port reads, and keys that change nothing in evaluation (training options,
# checkpoint paths, kernels); anything else is refused so that no official option is silently lost.
BRANCH_KEYS = {
    "img_size", "real_size", "patch_size", "pretrain_img_size", "pretrain_patch_size", "depth", "embed_dim",
    "num_heads", "mlp_ratio", "qkv_bias", "init_scale", "init_values", "qk_normalization", "norm_layer_type",
    "mlp_type", "use_cls_token", "window_attn", "window_size", "use_flash_attn", "interaction_indexes",
    "model_type", "num_classes", "pretrained", "drop_path_rate", "Mlp_block", *BEIT_KEYS,
}  # fmt: skip
INERT_BRANCH_KEYS = {
    "drop_rate", "attn_drop_rate", "with_cp", "with_fpn", "layerscale_force_fp32", "output_dtype", "out_indices",
    "use_simple_fpn", "cal_flops", "branch1_w_cls_token", "branch2_w_cls_token", "branch3_w_cls_token",
    "branch4_w_cls_token",
}  # fmt: skip
CONVNEXT_BRANCH_KEYS = {"real_size", "interaction_indexes", "downsample_ratios", "pretrained", "drop_path_rate"}
INERT_CONVNEXT_KEYS = {"single_branch", "with_simple_fpn", "cal_flops"}
# The published shapes of the ConvNeXt checkpoints the released configs name (facebook/convnext-*-224 config.json).
CONVNEXT_ARCHITECTURES = {
    "tiny": {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    "small": {"depths": [3, 3, 27, 3], "hidden_sizes": [96, 192, 384, 768]},
    "base": {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]},
    "large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]},
    "xlarge": {"depths": [3, 3, 27, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}
# ConvNextConfig keys that shape the computation; the rest of a checkpoint's config.json (labels, image size) does not.
CONVNEXT_ARCHITECTURE_KEYS = ("depths", "hidden_sizes", "num_channels", "patch_size", "hidden_act", "layer_scale_init_value")


class PerceptionConversionError(ValueError):
    """The official model cannot be converted as given; the message says what is wrong."""


@dataclass
class PerceptionConversionReport:
    source: str
    destination: str
    codebase: str
    task: str
    architecture: str
    renamed: int = 0
    filled_with_ones: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "conversion_report.json"), "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)


# ----- config ----------------------------------------------------------------------------------------
def read_official_config(path: str) -> dict:
    """Every plain-data top-level assignment of an official config file (never executed)."""
    with open(path, encoding="utf-8") as handle:
        names = parse_python_config(handle.read(), source_name=str(path), skip_non_data=True)
    model = names.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict):
        raise PerceptionConversionError(f"{path} does not define `model = dict(backbone=dict(...))` as plain data.")
    return names


def detect_codebase(model: dict) -> str:
    """classification (no registry `type`), mmseg (a UperNet `decode_head`) or mmdet."""
    backbone = model["backbone"]
    if "type" not in backbone:
        return "classification"
    if backbone["type"] not in DENSE_TYPES:
        raise PerceptionConversionError(
            f"backbone type {backbone['type']!r} is not a PIIP backbone; expected one of {sorted(DENSE_TYPES)} "
            "(the single-branch baselines are plain ViTs)."
        )
    return "mmseg" if "decode_head" in model else "mmdet"


def _branch_dicts(backbone: dict, codebase: str) -> list[dict]:
    names = sorted(key for key in backbone if re.fullmatch(r"branch\d", key))
    expected = DENSE_TYPES.get(backbone.get("type"), len(names))
    if names != [f"branch{index}" for index in range(1, expected + 1)]:
        raise PerceptionConversionError(f"expected branch1..branch{expected} in the backbone, found {names}.")
    branches = [dict(backbone[name]) for name in names]
    if codebase == "mmdet" and len(branches) == 4:
        # Official quirk (det/piip_4branch.py:77): branch 4 is built from branch 3's dict; only its
        # image size and interaction indexes come from its own.
        branches[3] = {**branches[2], "real_size": branches[3]["real_size"], "interaction_indexes": branches[3]["interaction_indexes"]}
    return branches


def _branch_type(branch: dict, codebase: str, index: int) -> str:
    """deit, internvit or convnext, chosen as the official code chooses (by the `pretrained` path in mmdet / mmseg)."""
    if codebase == "classification":
        model_type = branch.get("model_type", "deit")
        if model_type not in ("deit", "augreg"):
            raise PerceptionConversionError(f"branch{index}: unknown model_type {model_type!r} (deit or augreg).")
        return "deit" if model_type == "deit" else "internvit"
    pretrained = branch.get("pretrained")
    if not isinstance(pretrained, str):
        raise PerceptionConversionError(
            f"branch{index}: the official dense code picks the branch type from the `pretrained` path, which is {pretrained!r}."
        )
    if "deit" in pretrained:
        return "deit"
    if "perceiver" in pretrained:
        if codebase != "mmdet":
            raise PerceptionConversionError(
                f"branch{index}: pretrained={pretrained!r} names a Uni-Perceiver; this port follows the official mmdetection "
                "wrapper only (no released segmentation config has one)."
            )
        return "uniperceiver"
    if "beit" in pretrained:
        if codebase != "mmdet":
            raise PerceptionConversionError(
                f"branch{index}: pretrained={pretrained!r} names a BEiT; this port follows the official mmdetection BEiT "
                "wrapper only (no released segmentation config has one)."
            )
        return "beit"
    if "convnext" in pretrained:
        if codebase != "mmdet":
            raise PerceptionConversionError(
                f"branch{index}: pretrained={pretrained!r} names a ConvNeXt, which only the official mmdetection code builds."
            )
        return "convnext"
    return "internvit"


def _per_layer(value, depth: int, name: str, index: int) -> list:
    values = value if isinstance(value, list) else [value] * depth
    if len(values) != depth:
        raise PerceptionConversionError(f"branch{index}: {name} has {len(values)} entries for depth {depth}.")
    return values


def convnext_architecture(pretrained: str, base_dir: str | None, index: int) -> dict:
    """The ConvNextConfig keys of the checkpoint `pretrained` names (see the module docstring)."""
    size = re.search(r"convnext-(tiny|small|base|large|xlarge)-", os.path.basename(pretrained.rstrip("/")))
    if pretrained.startswith("facebook/") and size:
        return dict(CONVNEXT_ARCHITECTURES[size.group(1)])
    directory = os.path.join(base_dir or ".", pretrained)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise PerceptionConversionError(
            f"branch{index}: pretrained={pretrained!r} is not a released facebook/convnext-* name, and {config_path} "
            "does not exist: put the ConvNeXt's config.json there (the official code reads it from that path)."
        )
    config = ConvNextConfig.from_json_file(config_path)
    defaults = ConvNextConfig()
    return {
        key: getattr(config, key)
        for key in CONVNEXT_ARCHITECTURE_KEYS
        if key in ("depths", "hidden_sizes") or getattr(config, key) != getattr(defaults, key)
    }


def _convnext_branch_config(branch: dict, index: int, base_dir: str | None) -> dict:
    unknown = sorted(set(branch) - CONVNEXT_BRANCH_KEYS - INERT_CONVNEXT_KEYS)
    if unknown:
        raise PerceptionConversionError(
            f"branch{index}: unknown keys {unknown} for a ConvNeXt branch; this port reads {sorted(CONVNEXT_BRANCH_KEYS)}."
        )
    if "real_size" not in branch:
        raise PerceptionConversionError(f"branch{index}: missing 'real_size', the branch's image size.")
    convnext_config = convnext_architecture(branch["pretrained"], base_dir, index)
    if "drop_path_rate" in branch:
        convnext_config["drop_path_rate"] = float(branch["drop_path_rate"])
    config = {
        "branch_type": "convnext",
        "image_size": branch["real_size"],
        "convnext_config": convnext_config,
        "interaction_groups": branch["interaction_indexes"],
    }
    try:
        described = PerceptionBranchConfig(**config)
    except (TypeError, ValueError) as error:
        raise PerceptionConversionError(f"branch{index}: {error}") from error
    strides = [described.stride_after_block(block) for block in range(described.num_hidden_layers)]
    if "downsample_ratios" in branch and list(branch["downsample_ratios"]) != strides:
        raise PerceptionConversionError(
            f"branch{index}: downsample_ratios {branch['downsample_ratios']} do not match the {described.num_hidden_layers} "
            f"blocks of {branch['pretrained']!r}, whose strides are {strides}."
        )
    return config


def _branch_config(branch: dict, codebase: str, index: int, base_dir: str | None = None) -> dict:
    if codebase != "classification" and "convnext" in str(branch.get("pretrained")) and "deit" not in str(branch.get("pretrained")):
        _branch_type(branch, codebase, index)  # refuses a ConvNeXt outside mmdetection
        return _convnext_branch_config(branch, index, base_dir)
    unknown = sorted(set(branch) - BRANCH_KEYS - INERT_BRANCH_KEYS)
    if unknown:
        raise PerceptionConversionError(f"branch{index}: unknown keys {unknown}; this port reads {sorted(BRANCH_KEYS)}.")
    if branch.get("Mlp_block", "fused_mlp") != "fused_mlp":
        raise PerceptionConversionError(f"branch{index}: Mlp_block={branch['Mlp_block']!r} is not understood ('fused_mlp').")
    branch_type = _branch_type(branch, codebase, index)
    dense_internvit = branch_type == "internvit" and codebase != "classification"
    depth = branch.get("depth", 48 if branch_type == "internvit" else 12)
    patch_size = branch.get("patch_size", 14 if dense_internvit else 16)
    size_key = "img_size" if codebase == "classification" else "real_size"
    if size_key not in branch:
        raise PerceptionConversionError(f"branch{index}: missing {size_key!r}, the branch's image size.")
    if codebase == "classification" or (codebase == "mmseg" and branch_type == "internvit"):
        grid_size = branch.get("img_size", 224)
    else:
        grid_size = branch.get("pretrain_img_size", 512 if branch_type == "beit" else 224)
    misplaced = sorted(BEIT_KEYS & set(branch)) if branch_type != "beit" else []
    if misplaced:
        raise PerceptionConversionError(f"branch{index}: {misplaced} are options of the official BEiT wrapper, not of a {branch_type} branch.")
    if branch_type == "uniperceiver":
        if patch_size != 16:
            raise PerceptionConversionError(f"branch{index}: the official Uni-Perceiver embedding works on 16-pixel patches only.")
        # det/uniperceiver.py: BertLayer has q/k/v biases, layer scales initialised to zero, and pads normed tokens.
        options = {"qkv_bias": True, "layer_scale_init": 0.0, "window_padding": "tokens"}
    elif branch_type == "beit":
        options = _beit_options(branch, index)
        if not branch.get("use_abs_pos_emb", False):
            grid_size = None  # det/beit.py: no absolute positions (pos_embed None), only relative ones
    elif branch_type == "deit":
        options = {
            "layer_scale_init": float(branch.get("init_scale", 1e-4)),
            "window_padding": "tokens" if branch.get("use_flash_attn") else "qkv",
            # The InternViT-LH6B configs give their DeiT-L branch flash_attn's fused MLP (tanh GELU).
            "hidden_act": "gelu_pytorch_tanh" if branch.get("Mlp_block") == "fused_mlp" else "gelu",
        }
    else:
        init_values = branch.get("init_values", 0.1 if dense_internvit else None)
        options = {
            "layer_scale_init": 1.0 if init_values is None else float(init_values),
            "qk_norm": bool(branch.get("qk_normalization", dense_internvit)),
            "norm_type": "rms_norm" if branch.get("norm_layer_type", "RMSNorm" if dense_internvit else "ln") == "RMSNorm" else "layer_norm",
            "hidden_act": "gelu_pytorch_tanh" if branch.get("mlp_type", "regular") == "fused_mlp" else "gelu",
        }
    window_flags = _per_layer(branch.get("window_attn") or False, depth, "window_attn", index)
    window_sizes = _per_layer(branch.get("window_size") or 14, depth, "window_size", index)
    default_cls = codebase == "classification"
    return {
        "branch_type": branch_type,
        "image_size": branch[size_key],
        "hidden_size": branch.get("embed_dim", 768),
        "num_hidden_layers": depth,
        "num_attention_heads": branch.get("num_heads", 12),
        "mlp_ratio": float(branch.get("mlp_ratio", 4.0)),
        "qkv_bias": bool(branch.get("qkv_bias", False)),  # Uni-Perceiver's options override it
        "patch_size": patch_size,
        "position_grid": None if grid_size is None else grid_size // patch_size,
        "position_class_slot": branch_type == "internvit",
        "use_cls_token": codebase == "classification" and bool(branch.get("use_cls_token", default_cls)),
        "window_sizes": [size if flag else None for flag, size in zip(window_flags, window_sizes)],
        "interaction_groups": branch["interaction_indexes"],
        "drop_path_rate": float(branch.get("drop_path_rate", 0.0)),
        **options,
    }


def _beit_options(branch: dict, index: int) -> dict:
    """The official BEiT block (det/beit.py): q / v biases, layer scale `init_values`, per-layer window biases."""
    if branch.get("use_shared_rel_pos_bias", False):
        raise PerceptionConversionError(
            f"branch{index}: use_shared_rel_pos_bias=True: the official PIIP forward never passes the shared bias to the "
            "blocks; no released config sets it, and this port refuses it rather than guess."
        )
    if not branch.get("qkv_bias", False):
        raise PerceptionConversionError(f"branch{index}: a BEiT branch without q / v biases (qkv_bias=False) is not supported.")
    init_values = branch.get("init_values")
    return {"layer_scale_init": 1.0 if init_values is None else float(init_values)}


def perception_config_from_official(
    names: dict, codebase: str | None = None, base_dir: str | None = None
) -> tuple[PIIPPerceptionConfig, str]:
    """(our config, codebase) for an official config file's assignments; `base_dir` is the file's directory
    (ConvNeXt branches may name their checkpoint directory relative to it)."""
    model = names["model"]
    backbone = model["backbone"]
    codebase = codebase or detect_codebase(model)
    if codebase not in CODEBASES:
        raise PerceptionConversionError(f"codebase must be one of {CODEBASES}, got {codebase!r}.")
    unknown = sorted(key for key in backbone if not re.fullmatch(r"branch\d", key) and key not in TOP_LEVEL_KEYS[codebase])
    if unknown:
        raise PerceptionConversionError(f"backbone: unknown keys {unknown} for a {codebase} PIIP model.")
    with_simple_fpn = bool(backbone.get("with_simple_fpn", True))
    if not with_simple_fpn and (backbone.get("type") != "PIIPThreeBranch" or backbone.get("is_dino")):
        raise PerceptionConversionError(
            "with_simple_fpn=False (intermediate merges) is built by the official 3-branch mmdetection backbone only, "
            "and not with is_dino."
        )
    norm_layer = backbone.get("norm_layer", "layer_norm")
    if norm_layer not in ("none", "layer_norm"):
        raise PerceptionConversionError(f"backbone: norm_layer={norm_layer!r} is not understood ('none' or absent).")
    branches = [
        _branch_config(branch, codebase, index, base_dir) for index, branch in enumerate(_branch_dicts(backbone, codebase), 1)
    ]
    options = {
        "branches": branches,
        "interaction_attention": backbone.get("interact_attn_type", "normal"),
        "deform_num_heads": backbone.get("deform_num_heads", 6),
        "deform_num_points": backbone.get("n_points", 4),
        "deform_ratio": float(backbone.get("deform_ratio", 1.0)),
        "with_cffn": bool(backbone.get("with_cffn", False)),
        "cffn_ratio": float(backbone.get("cffn_ratio", 0.25)),
        "interaction_proj": bool(backbone.get("interaction_proj", True)),
        "interaction_norm": norm_layer != "none",
        "interaction_drop_path_rate": float(backbone.get("interaction_drop_path_rate", 0.3)),
        "resize_position_embeddings": codebase == "mmdet",
    }
    if codebase == "classification":
        separate = bool(backbone.get("separate_head", False))
        if separate:
            widths = {branch.get("num_classes", 1000) for branch in _branch_dicts(backbone, codebase)}
            if len(widths) != 1:
                raise PerceptionConversionError(f"separate heads of different widths {sorted(widths)} cannot be averaged.")
            num_labels = widths.pop()
        else:
            num_labels = names.get("num_classes", backbone.get("num_classes", 1000))
        options.update(classification_head="separate" if separate else "shared", num_labels=num_labels)
    else:
        is_dino = bool(backbone.get("is_dino", False))
        options["build_fpn1"] = not is_dino or len(branches) == 3  # only the 3-branch file builds an unused fpn1
        options["out_features"] = ["fpn2", "fpn3", "fpn4"] if is_dino else ["fpn1", "fpn2", "fpn3", "fpn4"]
        if not with_simple_fpn:
            options.update(with_simple_fpn=False, out_interaction_indexes=list(backbone.get("out_interaction_indexes", [])))
        if codebase == "mmseg" and len(branches) == 3:
            options["input_branch"] = 1  # seg/piip_3branch.py: the input is branch 2's image
    try:
        return PIIPPerceptionConfig(**options), codebase
    except ValueError as error:
        raise PerceptionConversionError(f"the official config does not form a valid PIIP model: {error}") from error


# ----- weights -----------------------------------------------------------------------------------------
def read_official_state_dict(src: str) -> dict[str, torch.Tensor]:
    """`model.safetensors`, or the one `.pth` of the directory (`{"model": ...}` / `{"state_dict": ...}`)."""
    safetensors_path = os.path.join(src, "model.safetensors")
    if os.path.isfile(safetensors_path):
        return load_file(safetensors_path)
    candidates = sorted(name for name in os.listdir(src) if name.endswith((".pth", ".pt", ".bin")))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{src} needs model.safetensors or exactly one .pth checkpoint; found {candidates or 'none'}."
        )
    path = os.path.join(src, candidates[0])
    try:
        # classification/main.py saves its argparse.Namespace beside the weights ('args'): allowed as data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise PerceptionConversionError(f"{path} cannot be read safely (weights_only=True): {error}") from error
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise PerceptionConversionError(f"{path} holds no state dict of tensors (under 'model', 'state_dict' or at the top).")
    return checkpoint


INTERACTION_RENAMES = {
    "branch1to2_proj": "proj_a_to_b",
    "branch2to1_proj": "proj_b_to_a",
    "branch2to1_injector": "injector_into_a",
    "branch1to2_injector": "injector_into_b",
    "ca_gamma": "attn_gate",
    "cffn_gamma": "ffn_gate",
}
LAYER_PARTS = {
    "beit": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "attn.q_bias": "attention.q_proj.bias", "attn.v_bias": "attention.v_proj.bias",
             "gamma_1": "lambda_1", "gamma_2": "lambda_2"},
    "deit": {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "gamma_1": "layer_scale1.lambda1",
             "gamma_2": "layer_scale2.lambda1"},
    "internvit": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "projection_layer_of_attention",
                  "ls1.gamma": "lambda_1", "ls2.gamma": "lambda_2"},
}  # fmt: skip


def _map_layer_part(part: str, branch_type: str) -> str | None:
    """`norm1.weight`, `attn.proj.bias`, `gamma_1`, ... of one block -> our name inside `layers.J`."""
    for official, ours in LAYER_PARTS[branch_type].items():
        if part == official or part.startswith(official + "."):
            ours = "attention.projection_layer" if ours == "projection_layer_of_attention" else ours
            return ours + part[len(official) :]
    if re.fullmatch(r"mlp\.fc[12]\.(weight|bias)", part):
        return part
    if re.fullmatch(r"attn\.[qk]_norm\.(weight|bias)", part):
        return "attention." + part[len("attn.") :]
    return None


def map_official_state_dict(state: dict, config: PIIPPerceptionConfig, codebase: str) -> tuple[dict, list]:
    """(our state dict, dropped official names). Unknown names are dropped only when they belong to
    a detector's neck / heads; any other unknown name is an error."""
    branch_types = [branch.branch_type for branch in config.branch_configs]
    ours: dict[str, torch.Tensor] = {}
    dropped = []
    merge_weights: dict[str, dict[int, torch.Tensor]] = {}  # our name -> branch number -> official scalar
    dense = codebase != "classification"
    full_detector = dense and any(name.startswith("backbone.") for name in state)
    for name, tensor in state.items():
        if full_detector:
            if not name.startswith("backbone."):
                dropped.append(name)  # the neck and heads of a detector / segmenter checkpoint
                continue
            name = name[len("backbone.") :]
        mapped = _map_one(name, tensor, branch_types, config, not dense, merge_weights, ours)
        if mapped is None:
            dropped.append(name)
    for target, weights in merge_weights.items():
        missing = [index for index in range(1, config.num_branches + 1) if index not in weights]
        if missing:
            raise PerceptionConversionError(f"the checkpoint has no merge weight w{missing[0]} for {target}.")
        ours[target] = torch.stack([weights[index].reshape(()) for index in sorted(weights)])
    return ours, dropped


def _intermediate_level(config: PIIPPerceptionConfig, interaction: str) -> int | None:
    """Position of an official `intermediate_merging_{k}` among `out_interaction_indexes` (None: not built here)."""
    indexes = [] if config.with_simple_fpn else config.out_interaction_indexes
    return indexes.index(int(interaction)) if int(interaction) in indexes else None


def _map_one(name, tensor, branch_types, config, classification, merge_weights, ours) -> bool | None:
    match = re.fullmatch(r"branch(\d)\.(.+)", name)
    if match:
        index, rest = int(match.group(1)) - 1, match.group(2)
        if index >= len(branch_types):
            return None
        prefix = f"piip.branches.{index}."
        if branch_types[index] == "convnext":
            return _map_convnext(rest, tensor, prefix, ours)
        if branch_types[index] == "uniperceiver":
            return _map_uniperceiver(rest, tensor, prefix, ours)
        simple = {"patch_embed.proj.weight": "patch_embedding.weight", "patch_embed.proj.bias": "patch_embedding.bias",
                  "pos_embed": "position_embedding", "cls_token": "cls_token"}  # fmt: skip
        if rest in simple:
            if rest == "cls_token" and not config.branch_configs[index].use_cls_token:
                return None
            ours[prefix + simple[rest]] = tensor
            return True
        head = re.fullmatch(r"(norm|head)\.(weight|bias)", rest)
        if head:
            if not classification or config.classification_head != "separate":
                return None
            module = "branch_norms" if head.group(1) == "norm" else "branch_classifiers"
            ours[f"{module}.{index}.{head.group(2)}"] = tensor
            return True
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
        if not block:
            return None
        layer = f"{prefix}layers.{block.group(1)}."
        part = block.group(2)
        qkv = re.fullmatch(r"attn\.qkv\.(weight|bias)", part)
        if qkv:
            for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                ours[f"{layer}attention.{projection}.{qkv.group(1)}"] = chunk.clone()
            return True
        if part == "attn.relative_position_bias_table" and branch_types[index] == "beit":
            ours[f"{prefix}relative_position_biases.{block.group(1)}.relative_position_bias_table"] = tensor
            return True
        mapped = _map_layer_part(part, branch_types[index])
        if mapped is None:
            return None
        ours[layer + mapped] = tensor
        return True
    match = re.fullmatch(r"interactions\.(\d+)\.interaction_units_(\d)(\d)\.(.+)", name)
    if match:
        rest = match.group(4)
        for official, renamed in INTERACTION_RENAMES.items():
            rest = re.sub(rf"(^|\.){official}(\.|$)", rf"\g<1>{renamed}\g<2>", rest)
        ours[f"piip.interactions.{match.group(1)}.units.{int(match.group(2)) - 1}.{rest}"] = tensor
        return True
    match = re.fullmatch(r"w(\d)", name)
    if match:
        merge_weights.setdefault("merge_weights.weights", {})[int(match.group(1))] = tensor
        return True
    match = re.fullmatch(r"intermediate_merging_(\d+)_(?:w(\d)|branch(\d)\.(\d)\.(weight|bias))", name)
    if match:
        level = _intermediate_level(config, match.group(1))
        if level is None:
            return None
        if match.group(2):
            merge_weights.setdefault(f"intermediate_merges.{level}.merge_weights.weights", {})[int(match.group(2))] = tensor
        else:
            branch, layer, kind = int(match.group(3)) - 1, match.group(4), match.group(5)
            ours[f"intermediate_merges.{level}.branch_merges.{branch}.{layer}.{kind}"] = tensor
        return True
    return _map_head(name, tensor, classification, ours)


UNIPERCEIVER_PARTS = {
    "visual_embed.patch_embed.proj.": "patch_embedding.", "visual_embed.embeddings_norm.": "embedding_norm.",
    "self_attn.out_proj.": "attention.o_proj.", "norm1.": "norm1.", "norm2.": "norm2.",
    "linear1.": "mlp.fc1.", "linear2.": "mlp.fc2.", "gamma_1": "layer_scale1.lambda1", "gamma_2": "layer_scale2.lambda1",
}  # fmt: skip


def _map_uniperceiver(rest: str, tensor: torch.Tensor, prefix: str, ours: dict) -> bool | None:
    """The official `UnifiedBertEncoder` (`visual_embed.*`, `layers.J.*`) -> our branch and its `Dinov2Layer`s.

    The position table (an `nn.Embedding`) gains the batch axis of ours; of the 8 temporal positions only
    the first is ever added (an image is one frame), and only it is kept."""
    if rest == "visual_embed.patch_embed.spatial_pos_embed.weight":
        ours[prefix + "position_embedding"] = tensor[None]
        return True
    if rest == "visual_embed.patch_embed.temporal_pos_embed.weight":
        ours[prefix + "temporal_position"] = tensor[:1].clone()
        return True
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    owner, part = (f"{prefix}layers.{layer.group(1)}.", layer.group(2)) if layer else (prefix, rest)
    qkv = re.fullmatch(r"self_attn\.in_proj\.(weight|bias)", part)
    if layer and qkv:
        for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            ours[f"{owner}attention.{projection}.{qkv.group(1)}"] = chunk.clone()
        return True
    for official, renamed in UNIPERCEIVER_PARTS.items():
        if part.startswith(official) and (layer is not None) != official.startswith("visual_embed."):
            ours[owner + renamed + part[len(official) :]] = tensor
            return True
    return None


def _map_convnext(rest: str, tensor: torch.Tensor, prefix: str, ours: dict) -> bool | None:
    """`convnext_model.{embeddings,encoder.stages}.*` -> the ConvNeXt adapter's `embeddings.*` / `stages.*`
    (transformers' own names); the ConvNextModel's final `layernorm` is unused by PIIP and dropped."""
    for official, renamed in (("convnext_model.embeddings.", "embeddings."), ("convnext_model.encoder.stages.", "stages.")):
        if rest.startswith(official):
            ours[prefix + renamed + rest[len(official) :]] = tensor
            return True
    return None


def _map_head(name, tensor, classification, ours) -> bool | None:
    if classification:
        rules = [
            (r"merge_branch1\.(weight|bias)", r"branch_merges.0.\1"),
            (r"merge_branch(\d)\.0\.(weight|bias)", "branch_merges.{0}.norm_in.{1}"),
            (r"merge_branch(\d)\.2\.(weight|bias)", "branch_merges.{0}.proj.{1}"),
            (r"merge_branch(\d)\.4\.(weight|bias)", "branch_merges.{0}.norm_out.{1}"),
            (r"cls_norm\.(weight|bias)", r"merged_norm.\1"),
            (r"cls_head\.(weight|bias)", r"classifier.\1"),
        ]
    else:
        rules = [
            (r"merge_branch(\d)\.(\d)\.(weight|bias)", "branch_merges.{0}.{1}.{2}"),
            (r"fpn1\.(\d)\.(weight|bias)", r"upsample_4x.\1.\2"),
            (r"fpn2\.0\.(weight|bias)", r"upsample_2x.\1"),
        ]
    for pattern, target in rules:
        match = re.fullmatch(pattern, name)
        if not match:
            continue
        if "{" in target:
            groups = list(match.groups())
            groups[0] = str(int(groups[0]) - 1)
            ours[target.format(*groups)] = tensor
        else:
            ours[match.expand(target)] = tensor
        return True
    return None


def load_converted_weights(model: torch.nn.Module, mapped: dict) -> list[str]:
    """Load strictly, after filling layer scales the official block does not have with ones.

    Returns the filled names. A missing tensor, a left-over tensor or a wrong shape is an error
    that names it.
    """
    expected = model.state_dict()
    filled = []
    for name in expected:
        if name not in mapped and re.search(r"(layer_scale[12]\.lambda1|lambda_[12])$", name):
            mapped[name] = torch.ones_like(expected[name])
            filled.append(name)
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing:
        raise PerceptionConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}."
        )
    if unexpected:
        raise PerceptionConversionError(f"the checkpoint has tensor(s) this configuration does not use: {unexpected[:5]}.")
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise PerceptionConversionError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but the config builds "
                f"{tuple(expected[name].shape)}."
            )
    model.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in mapped.items()}, strict=True)
    return filled


def classification_image_processor(image_size: int) -> CLIPImageProcessor:
    """The official evaluation transform (classification/my_datasets.py build_transform): resize the
    shorter side to int(size / 0.875) bicubically, centre-crop size x size, ImageNet mean and std."""
    return CLIPImageProcessor(
        size={"shortest_edge": int(image_size / EVAL_CROP_RATIO)},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def perception_config_from_file(path: str, codebase: str | None = None) -> tuple[PIIPPerceptionConfig, str]:
    """(config with `architectures` set, codebase) for an official config file."""
    config, codebase = perception_config_from_official(read_official_config(path), codebase, os.path.dirname(path))
    model_class = PIIPForImageClassification if codebase == "classification" else PIIPBackbone
    config.architectures = [model_class.__name__]
    return config, codebase


def config_json(config: PIIPPerceptionConfig) -> str:
    """The config as the bundled `configs/perception/*.json` hold it: what differs from the defaults."""
    data = config.to_diff_dict()
    data.pop("transformers_version", None)
    return json.dumps(data, indent=2) + "\n"


def official_table_figures(table_markdown: str) -> dict[str, tuple[float | None, float]]:
    """Config name -> (#Param in M or None, #FLOPs in G) from the official released-model tables
    (`released_models_tables.md`: one row per model, with a link to its config file)."""
    rows = {}
    for line in table_markdown.splitlines():
        config = re.search(r"\[(?:cfg|config)\]\([^)]*/([^/)]+)\.py\)", line)
        flops = re.search(r"\|\s*([\d.]+)G\s*\|", line)
        if not config or not flops:
            continue
        params = re.search(r"\|\s*([\d.]+)M\s*\|", line)
        rows[config.group(1)] = (float(params.group(1)) if params else None, float(flops.group(1)))
    return rows


def convert_perception_checkpoint(
    src: str, dst: str, codebase: str | None = None, overwrite: bool = False
) -> PerceptionConversionReport:
    """Convert `src` (official `config.py` and weights) into `dst`; see the module docstring.

    `dst` is guarded as for PIIP-LLaVA checkpoints: never the source or inside or around it, never a
    non-empty directory without `overwrite`; the output is written beside it and moved into place
    once complete, so a failed conversion leaves `dst` as it was.
    """
    check_destination(src, dst, overwrite)
    config_path = os.path.join(src, "config.py")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{src} has no config.py (the official perception config).")
    config, codebase = perception_config_from_file(config_path, codebase)
    task = "classification" if codebase == "classification" else "backbone"
    model_class = PIIPForImageClassification if task == "classification" else PIIPBackbone
    model = model_class(config).eval()
    mapped, dropped = map_official_state_dict(read_official_state_dict(src), config, codebase)
    unknown = [name for name in dropped if not name.startswith(("neck.", "rpn_head.", "roi_head.", "bbox_head.",
                                                                "decode_head.", "auxiliary_head.", "query_embedding"))]  # fmt: skip
    expected_drops = {f"branch{index}.{part}" for index in range(1, 5) for part in ("norm.weight", "norm.bias", "head.weight", "head.bias", "cls_token")}
    unknown = [
        name for name in unknown
        if name not in expected_drops and not name.startswith("fpn1.")
        and not re.fullmatch(r"branch\d\.convnext_model\.layernorm\..+", name)  # unused by PIIP
        and not re.fullmatch(r"branch\d\.blocks\.\d+\.attn\.relative_position_index", name)  # a buffer we rebuild
    ]  # fmt: skip
    if unknown:
        raise PerceptionConversionError(f"the checkpoint has tensor(s) no rule maps: {unknown[:5]}.")
    filled = load_converted_weights(model, mapped)
    report = PerceptionConversionReport(
        source=src, destination=dst, codebase=codebase, task=task, architecture=model_class.__name__,
        renamed=len(mapped) - len(filled), filled_with_ones=filled, dropped=dropped,
    )  # fmt: skip
    staging = staging_directory(dst)
    try:
        model.save_pretrained(staging)
        if task == "classification":
            classification_image_processor(config.image_size).save_pretrained(staging)
        report.save(staging)
        move_into_place(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


__all__ = [
    "PerceptionConversionError",
    "config_json",
    "convert_perception_checkpoint",
    "map_official_state_dict",
    "official_table_figures",
    "perception_config_from_file",
    "perception_config_from_official",
    "read_official_config",
]
