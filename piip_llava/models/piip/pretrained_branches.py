"""Assemble a PIIP encoder from pretrained backbones saved in local directories.

A PIIP model is normally built from existing checkpoints (a `CLIPVisionModel`, a `ConvNextModel`,
...) with freshly initialised, zero-gated interactions, so it starts out computing exactly what
the backbones compute alone. The weight-loading quirks live here, one small function each:
renaming the backbone's parameters to the branch's, resampling a patch kernel of another size,
and keeping the checkpoint's own position grid (it is interpolated at run time).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.utils import logging

from .configuration_piip import BRANCH_FAMILIES, PIIPVisionConfig, backbone_config_dict

logger = logging.get_logger(__name__)

# Parameters of the backbone models that a PIIP branch does not use: pooling heads and final norms.
UNUSED_BACKBONE_PREFIXES = ("post_layernorm.", "head.", "layernorm.", "pooler.")


def resample_patch_kernel(kernel: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Resize a (out, in, k, k) patch-embedding kernel to patch_size x patch_size, bicubically."""
    if kernel.shape[-1] == patch_size and kernel.shape[-2] == patch_size:
        return kernel
    resized = F.interpolate(kernel.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
    return resized.to(kernel.dtype)


def branch_dict_from_pretrained(
    pretrained_dir: str | os.PathLike,
    image_size: int,
    interaction_groups: list[list[int]],
    patch_size: int | None = None,
    use_cls_token: bool | None = None,
) -> dict:
    """A branch entry for `PIIPVisionConfig.branches` whose architecture is the checkpoint's own."""
    backbone = backbone_config_dict(AutoConfig.from_pretrained(pretrained_dir))
    branch = {"backbone_config": backbone, "image_size": image_size, "interaction_groups": interaction_groups}
    if BRANCH_FAMILIES.get(backbone["model_type"]) == "vit":
        branch["patch_size"] = patch_size or backbone["patch_size"]
        branch["pretrain_grid_size"] = backbone["image_size"] // backbone["patch_size"]
        if use_cls_token is not None:
            branch["use_cls_token"] = use_cls_token
    return branch


def branch_state_dict(backbone_type: str, backbone_state: dict[str, torch.Tensor], patch_size: int | None) -> dict:
    """Rename a transformers backbone's parameters to the branch's names; drop heads and final norms."""
    renamed = {}
    for name, tensor in backbone_state.items():
        if name.startswith(UNUSED_BACKBONE_PREFIXES):
            continue
        if BRANCH_FAMILIES.get(backbone_type) != "vit":
            name = name.replace("encoder.stages.", "stages.")
        else:
            name = name.replace("pre_layrnorm.", "pre_layernorm.").replace("encoder.layers.", "layers.")
            if name == "embeddings.patch_embedding.weight":
                tensor = resample_patch_kernel(tensor, patch_size)
        renamed[name] = tensor
    return renamed


def build_from_pretrained_branches(
    model_class: type,
    branch_dirs: list[str | os.PathLike],
    image_sizes: list[int],
    interaction_groups: list[list[list[int]]],
    patch_sizes: list[int | None] | None = None,
    **config_kwargs,
):
    """A `model_class` (`PIIPVisionModel` or a subclass) whose branches carry the weights of the given checkpoints.

    Args:
        model_class: the encoder class to build.
        branch_dirs: one saved backbone directory per branch (largest model first).
        image_sizes: the resolution of each branch.
        interaction_groups: per branch, its `[first, last]` block ranges.
        patch_sizes: per ViT branch, the patch size to use (a different pretrained kernel is resampled).
        config_kwargs: other `PIIPVisionConfig` fields (attention type, heads, ...).
    """
    counts = {len(branch_dirs), len(image_sizes), len(interaction_groups)}
    if len(counts) != 1:
        raise ValueError("branch_dirs, image_sizes and interaction_groups need one entry per branch.")
    patch_sizes = patch_sizes or [None] * len(branch_dirs)
    branches = [
        branch_dict_from_pretrained(directory, size, groups, patch)
        for directory, size, groups, patch in zip(branch_dirs, image_sizes, interaction_groups, patch_sizes)
    ]
    config = PIIPVisionConfig(branches=branches, **config_kwargs)
    model = model_class(config)
    for index, (directory, branch, branch_config) in enumerate(zip(branch_dirs, model.branches, config.branches)):
        backbone = AutoModel.from_pretrained(directory)
        state = branch_state_dict(branch_config.backbone_type, backbone.state_dict(), branch_config.patch_size)
        result = branch.load_state_dict(state, strict=False)
        missing = [name for name in result.missing_keys if not name.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Branch {index + 1} ({directory}): weights do not fit the branch; missing {missing}, "
                f"unexpected {result.unexpected_keys}."
            )
        logger.info("Branch %d loaded from %s", index + 1, directory)
    return model
