"""The multi-branch projector that turns PIIP feature maps into LLM image tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .configuration_piip_llava import PIIPLlavaConfig


def resize_to_grid(feature_map: torch.Tensor, grid: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """A (batch, C, H, W) map resized to `grid` bilinearly, align_corners=False, in fp32; a map already on the
    grid is returned as is.

    Without `antialias` this is what the released projector does: each token is the map read at one point.
    With it, a shrunk map is filtered first, so each token averages its whole cell (PyTorch's antialiased
    bilinear: a triangle filter as wide as the scale factor; an enlarged map is interpolated as before).
    Point sampling an 8x8 map down to 3x3 reads one feature per cell and ignores the rest of the cell.
    """
    if tuple(feature_map.shape[-2:]) == tuple(grid):
        return feature_map
    resized = F.interpolate(feature_map.float(), size=grid, mode="bilinear", align_corners=False, antialias=antialias)
    return resized.to(feature_map.dtype)


class BranchProjector(nn.Module):
    """Linear -> norm over channels -> GELU -> Linear for one branch's tokens."""

    def __init__(self, config: PIIPLlavaConfig, in_dim: int):
        super().__init__()
        out_dim = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.norm_type = config.projector_norm
        if self.norm_type == "group_norm":  # the config checked that the groups divide the width
            self.norm = nn.GroupNorm(config.projector_num_groups, out_dim)
        else:
            self.norm = nn.LayerNorm(out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(tokens)  # (batch, tokens, out_dim)
        if self.norm_type == "group_norm":
            # GroupNorm normalises over channel groups and all positions: (batch, out_dim, tokens)
            hidden = self.norm(hidden.transpose(1, 2)).transpose(1, 2).contiguous()
        else:
            hidden = self.norm(hidden)
        return self.linear_2(self.act(hidden))


class PIIPMultiBranchProjector(nn.Module):
    """Brings every branch map to one grid, projects each with its own MLP and sums them.

    The grid is the last (highest-resolution) branch's final grid unless a fixed output grid is
    configured (`projector_output_grid_size`); the resizing is bilinear in fp32, as in the released
    models, antialiased on request (`projector_antialias`).
    """

    def __init__(self, config: PIIPLlavaConfig):
        super().__init__()
        self.output_grid_size = config.projector_output_grid_size
        self.antialias = config.projector_antialias
        self.branches = nn.ModuleList(
            [BranchProjector(config, width) for width in config.vision_config.branch_output_widths]
        )

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(batch, C_i, H_i, W_i) maps -> (batch, H*W, out_dim) image tokens, row-major."""
        if len(feature_maps) != len(self.branches):
            raise ValueError(f"Projector built for {len(self.branches)} branches got {len(feature_maps)} feature maps.")
        side = self.output_grid_size
        grid = (side, side) if side is not None else tuple(feature_maps[-1].shape[-2:])
        projected = None
        for feature_map, projector in zip(feature_maps, self.branches):
            resized = resize_to_grid(feature_map, grid, self.antialias)
            tokens = projector(resized.flatten(2).transpose(1, 2).contiguous())  # (batch, H*W, C_i)
            projected = tokens if projected is None else projected + tokens
        return projected
