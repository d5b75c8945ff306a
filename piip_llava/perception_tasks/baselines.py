"""One branch of a PIIP backbone alone: the paper's single-branch baselines, for the comparison in miniature.

`PIIPSingleBranchConfig` is a PIIP backbone config plus `branch_index`; `PIIPSingleBranchBackbone`
runs that branch alone, on the image the pyramid would give it (resized from the input as the
pyramid resizes it), through the same dense head as `PIIPBackbone` (a conv merge, then 4x up,
2x up, 1x and 1/2 scales), at the branch's own width and grid. So the pyramid and its branches
differ only in what the pyramid adds: the other branch and the interactions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, AutoConfig
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from ..models.piip.configuration_piip_perception import PIIPPerceptionConfig
from ..models.piip.modeling_piip_perception import (
    GROUP_NORM_GROUPS,
    DenseBranchMerge,
    PerceptionViTBranch,
    PIIPPerceptionPreTrainedModel,
)


class PIIPSingleBranchConfig(PIIPPerceptionConfig):
    """A PIIP backbone config whose branch `branch_index` (0-based) runs alone."""

    model_type = "piip_single_branch"

    branch_index: int = 0

    def validate_layout(self) -> None:
        super().validate_layout()
        if not 0 <= self.branch_index < self.num_branches:
            raise ValueError(f"branch_index {self.branch_index} is not a branch index (0..{self.num_branches - 1}).")

    @property
    def branch(self):
        return self.branch_configs[self.branch_index]


class PIIPSingleBranchBackbone(BackboneMixin, PIIPPerceptionPreTrainedModel):
    """`PIIPBackbone`'s outputs computed from one branch alone (no other branch, no interactions)."""

    config: PIIPSingleBranchConfig
    config_class = PIIPSingleBranchConfig
    has_attentions = False

    def __init__(self, config: PIIPSingleBranchConfig):
        super().__init__(config)
        branch = config.branch
        width = branch.hidden_size
        self.vit = PerceptionViTBranch(branch, config)
        self.num_features = [width] * len(config.stage_names)
        self.merge = DenseBranchMerge(width, width)
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.GroupNorm(GROUP_NORM_GROUPS, width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> BackboneOutput:
        ratio = self.config.branch.image_size / self.config.image_size
        image = pixel_values if ratio == 1 else F.interpolate(pixel_values, scale_factor=ratio, mode="bilinear")
        state = self.vit.embed(image, self.config.branch_index + 1)
        state = self.vit.run_blocks(state, 0, self.config.branch.num_hidden_layers - 1)
        merged = self.merge(state.feature_map())  # (batch, width, H, W) at the branch's grid
        scales = {
            "fpn1": lambda: self.upsample_4x(merged),
            "fpn2": lambda: self.upsample_2x(merged),
            "fpn3": lambda: merged,
            "fpn4": lambda: self.downsample_2x(merged),
        }
        output = BackboneOutput(feature_maps=tuple(scales[name]().contiguous() for name in self.out_features))
        return output if return_dict is not False else output.to_tuple()


AutoConfig.register(PIIPSingleBranchConfig.model_type, PIIPSingleBranchConfig)
AutoBackbone.register(PIIPSingleBranchConfig, PIIPSingleBranchBackbone)


def single_branch_config(config: PIIPPerceptionConfig, branch_index: int) -> PIIPSingleBranchConfig:
    """The same branches and outputs as `config`, with branch `branch_index` to run alone."""
    generated = ("model_type", "transformers_version", "stage_names")
    data = {key: value for key, value in config.to_dict().items() if key not in generated}
    return PIIPSingleBranchConfig(**data, branch_index=branch_index)


__all__ = ["PIIPSingleBranchBackbone", "PIIPSingleBranchConfig", "single_branch_config"]
