"""Translate a released checkpoint's configs (LLaVA `config.json` + the Python vision config) into a PIIPLlavaConfig.

Official names -> ours:

| official (`model.backbone`)                   | ours (`PIIPVisionConfig`)                      |
|-----------------------------------------------|------------------------------------------------|
| `n_points`, `deform_num_heads`, `deform_ratio`| `deform_num_points`, `deform_num_heads`, same  |
| `with_cffn`, `cffn_ratio`, `interaction_proj` | same                                           |
| `interact_attn_type` (`deform` / `normal`)    | `interaction_attention`                        |
| `interaction_drop_path_rate`                  | same (training only)                           |
| `branchN.img_size`                            | `branches[N-1].image_size`                     |
| `branchN.interaction_indexes`                 | `branches[N-1].interaction_groups`             |
| `branchN.patch_size`                          | `branches[N-1].patch_size` (the stored kernel) |
| `pretrain_size / pretrain_patch_size`         | `branches[N-1].pretrain_grid_size`             |
| `pretrain_patch_size` when it differs from `patch_size` | `branches[N-1].patch_stride` (the official convolution kept it) |
| `branchN.use_cls_token` (default False)       | `branches[N-1].use_cls_token`                  |

Absent backbone keys take the official config class's defaults (`OFFICIAL_BACKBONE_DEFAULTS`).
The projector (`model.projector`, type `separate_2branch_v1`) maps `norm` gn/ln to
`projector_norm` group_norm/layer_norm and `out_shape` to `projector_output_grid_size`.
"""

from __future__ import annotations

from piip_llava.models.piip.configuration_piip import PIIPVisionConfig
from piip_llava.models.piip_llava import PIIPLlavaConfig

from .backbones import (
    check_clip_against_shapes,
    check_convnext_against_shapes,
    resolve_clip_backbone,
    resolve_convnext_backbone,
)

# Defaults of the official `PIIPTwoBranchConfig` for keys a config file may leave out.
OFFICIAL_BACKBONE_DEFAULTS = {
    "n_points": 4,
    "deform_num_heads": 6,
    "with_cffn": False,
    "cffn_ratio": 0.25,
    "deform_ratio": 1.0,
    "interact_attn_type": "normal",
    "interaction_drop_path_rate": 0.3,
    "norm_layer": "ln",
    "interaction_proj": True,
}
# Keys that only steer the official training or loading code.
IGNORED_BACKBONE_KEYS = {"model_cls", "unfreeze", "use_branch_merging", "gradient_checkpointing"}
IGNORED_BRANCH_KEYS = {"pretrained", "load_timm_weights", "gradient_checkpointing", "model_type"}
KNOWN_CLIP_BRANCH_KEYS = {"img_size", "patch_size", "pretrain_patch_size", "interaction_indexes", "use_cls_token"}
KNOWN_CONVNEXT_BRANCH_KEYS = {"img_size", "interaction_indexes", "downsample_ratios"}
PROJECTOR_NORMS = {"gn": "group_norm", "ln": "layer_norm"}
OFFICIAL_PROJECTOR_GROUPS = 32

# LLaMA config keys carried from the LLaVA config.json into our text_config.
TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "attention_bias",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)

# The LLM part of the released config.json files: Vicuna v1.5 (LLaMA-2) 7B and 13B.
VICUNA_V15_TEXT_CONFIGS = {
    size: {
        "model_type": "llava_llama",
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    for size, hidden, intermediate, layers, heads in (("7B", 4096, 11008, 32, 32), ("13B", 5120, 13824, 40, 40))
}


def branch_shapes(shapes: dict[str, tuple] | None, branch_number: int, kind: str) -> dict | None:
    """Shapes of one branch's tensors keyed by their names inside `clip_model` / `convnext_model`."""
    if shapes is None:
        return None
    prefix = f"model.vision_tower.vision_tower.branch{branch_number}.{kind}."
    return {name[len(prefix) :]: shape for name, shape in shapes.items() if name.startswith(prefix)}


def _branch_entry(number: int, official: dict, checkpoint_dir: str, shapes: dict | None, overrides: dict, notes: dict):
    kind = official.get("model_type", "clip_hf")
    label = f"branch{number}"
    if kind == "clip_hf":
        unknown = set(official) - KNOWN_CLIP_BRANCH_KEYS - IGNORED_BRANCH_KEYS
        local_shapes = branch_shapes(shapes, number, "clip_model")
        backbone, source = resolve_clip_backbone(official.get("pretrained"), checkpoint_dir, local_shapes)
        backbone.update(overrides)
        pretrain_patch = official.get("pretrain_patch_size", backbone["patch_size"])
        if pretrain_patch != backbone["patch_size"]:
            raise ValueError(
                f"{label}: pretrain_patch_size {pretrain_patch} differs from the pretrained model's patch size "
                f"{backbone['patch_size']} ({source}); the official code refuses this too."
            )
        entry = {
            "backbone_config": backbone,
            "image_size": official["img_size"],
            "interaction_groups": [list(group) for group in official["interaction_indexes"]],
            "patch_size": official.get("patch_size", pretrain_patch),
            "pretrain_grid_size": backbone["image_size"] // pretrain_patch,
            "use_cls_token": bool(official.get("use_cls_token", False)),
        }
        if entry["patch_size"] != pretrain_patch:
            # The official wrapper resamples the kernel into the pretrained convolution's weight, which keeps its
            # stride: such checkpoints ran (and were trained) with a patch_size kernel at stride pretrain_patch.
            entry["patch_stride"] = pretrain_patch
        problems = check_clip_against_shapes(entry, local_shapes) if local_shapes else []
    elif kind == "convnext_timm":
        unknown = set(official) - KNOWN_CONVNEXT_BRANCH_KEYS - IGNORED_BRANCH_KEYS
        local_shapes = branch_shapes(shapes, number, "convnext_model")
        backbone, source = resolve_convnext_backbone(official.get("pretrained"), checkpoint_dir, local_shapes)
        backbone.update(overrides)
        entry = {
            "backbone_config": backbone,
            "image_size": official["img_size"],
            "interaction_groups": [list(group) for group in official["interaction_indexes"]],
        }
        problems = check_convnext_against_shapes(entry, local_shapes) if local_shapes else []
        problems += _check_downsample_ratios(entry, official.get("downsample_ratios"))
    else:
        raise ValueError(f"{label}: unsupported branch model_type {kind!r} (supported: clip_hf, convnext_timm).")
    if problems:
        raise ValueError(
            f"{label} ({official.get('pretrained')!r}, architecture from {source}) does not match the checkpoint: "
            + "; ".join(problems)
            + ". Fix the local pretrained config or pass a branch override."
        )
    notes["architecture_sources"][label] = source
    if overrides:
        notes["branch_overrides"][label] = dict(overrides)
    if unknown:
        notes["ignored_config_keys"].extend(f"{label}.{key}" for key in sorted(unknown))
    return entry


def _check_downsample_ratios(entry: dict, ratios: list | None) -> list[str]:
    """The official file lists each ConvNeXt block's stride; it must be what the architecture gives."""
    if ratios is None:
        return []
    depths = entry["backbone_config"]["depths"]
    expected = []
    for stage, depth in enumerate(depths):
        expected.extend([4 * 2**stage] * (depth + (1 if stage else 0)))
    if list(ratios) != expected:
        return [f"downsample_ratios {list(ratios)} do not match the ConvNeXt blocks (expected {expected})"]
    return []


def vision_config_from_released(
    backbone: dict,
    checkpoint_dir: str = ".",
    shapes: dict[str, tuple] | None = None,
    branch_overrides: dict[int, dict] | None = None,
    notes: dict | None = None,
) -> PIIPVisionConfig:
    """Our PIIPVisionConfig for the official `model["backbone"]` dict."""
    notes = notes if notes is not None else new_notes()
    branch_overrides = branch_overrides or {}
    settings = {**OFFICIAL_BACKBONE_DEFAULTS, **backbone}
    if settings.get("use_branch_merging"):
        raise ValueError("use_branch_merging=True is not supported: no released PIIP-LLaVA checkpoint uses it.")
    if settings["norm_layer"] != "ln":
        raise ValueError(f"norm_layer={settings['norm_layer']!r} is not supported (the released models use 'ln').")
    numbers = sorted(int(key[len("branch") :]) for key in backbone if key.startswith("branch") and key[6:].isdigit())
    if numbers != list(range(1, len(numbers) + 1)) or not numbers:
        raise ValueError(f"the backbone config must define branch1..branchN, found {[f'branch{n}' for n in numbers]}.")
    unknown = set(backbone) - set(OFFICIAL_BACKBONE_DEFAULTS) - IGNORED_BACKBONE_KEYS - {f"branch{n}" for n in numbers}
    notes["ignored_config_keys"].extend(sorted(unknown))
    branches = [
        _branch_entry(n, backbone[f"branch{n}"], checkpoint_dir, shapes, branch_overrides.get(n, {}), notes)
        for n in numbers
    ]
    if settings["interact_attn_type"] not in ("deform", "normal"):
        raise ValueError(f"interact_attn_type={settings['interact_attn_type']!r} is not supported (deform, normal).")
    return PIIPVisionConfig(
        branches=branches,
        interaction_attention=settings["interact_attn_type"],
        deform_num_heads=settings["deform_num_heads"],
        deform_num_points=settings["n_points"],
        deform_ratio=settings["deform_ratio"],
        with_cffn=settings["with_cffn"],
        cffn_ratio=settings["cffn_ratio"],
        interaction_proj=settings["interaction_proj"],
        interaction_drop_path_rate=settings["interaction_drop_path_rate"],
    )


def projector_settings_from_released(projector: dict, vision_config: PIIPVisionConfig) -> dict:
    """PIIPLlavaConfig projector fields for the official `model["projector"]` dict."""
    if projector.get("type") != "separate_2branch_v1":
        raise ValueError(f"projector type {projector.get('type')!r} is not supported (separate_2branch_v1).")
    if projector.get("norm") not in PROJECTOR_NORMS:
        raise ValueError(f"projector norm {projector.get('norm')!r} is not supported (gn, ln).")
    widths = vision_config.branch_output_widths
    declared = [projector.get(f"dim{n}") for n in range(1, len(widths) + 1)]
    if declared != widths:
        raise ValueError(f"projector input widths {declared} do not match the branches' output widths {widths}.")
    return {
        "projector_norm": PROJECTOR_NORMS[projector["norm"]],
        "projector_num_groups": OFFICIAL_PROJECTOR_GROUPS,
        "projector_output_grid_size": projector.get("out_shape"),
    }


def text_config_from_llava(llava_config: dict, vocab_size: int | None = None) -> dict:
    """The LLaMA text_config of a LLaVA-style config.json, optionally with a grown vocabulary."""
    text = {"model_type": "llama"}
    text.update({key: llava_config[key] for key in TEXT_CONFIG_KEYS if llava_config.get(key) is not None})
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return text


def new_notes() -> dict:
    return {"architecture_sources": {}, "branch_overrides": {}, "ignored_config_keys": []}


def piip_llava_config_from_released(
    llava_config: dict,
    released_model: dict,
    checkpoint_dir: str = ".",
    shapes: dict[str, tuple] | None = None,
    branch_overrides: dict[int, dict] | None = None,
    image_token_index: int | None = None,
    notes: dict | None = None,
) -> PIIPLlavaConfig:
    """Our PIIPLlavaConfig for a released checkpoint.

    `image_token_index` defaults to the original vocabulary size, i.e. `<image>` is appended as one
    new token and the vocabulary grows by one (see `docs/released_checkpoints.md`).
    """
    if llava_config.get("model_type") not in ("llava_llama", "llava", "llama", None):
        raise ValueError(f"expected a LLaVA-LLaMA config.json, got model_type {llava_config.get('model_type')!r}.")
    vision_config = vision_config_from_released(
        released_model["backbone"], checkpoint_dir, shapes, branch_overrides, notes
    )
    projector = projector_settings_from_released(released_model.get("projector", {}), vision_config)
    original_vocab = llava_config["vocab_size"]
    if image_token_index is None:
        image_token_index = original_vocab
    text_config = text_config_from_llava(llava_config, vocab_size=max(original_vocab, image_token_index + 1))
    return PIIPLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_index=image_token_index,
        **projector,
    )


__all__ = [
    "OFFICIAL_BACKBONE_DEFAULTS",
    "VICUNA_V15_TEXT_CONFIGS",
    "piip_llava_config_from_released",
    "projector_settings_from_released",
    "text_config_from_llava",
    "vision_config_from_released",
]
