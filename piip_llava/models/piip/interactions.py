"""Cross-branch interaction units of PIIP.

Two branches of a pyramid see the same image at different resolutions and widths. After each
group of their blocks, a bidirectional unit lets each branch read the other's tokens through an
injector: a zero-gated cross attention (deformable or plain) followed by a zero-gated ConvFFN.
With the gates at zero, an injector is the identity, so a pyramid assembled from pretrained
backbones starts out computing exactly what the backbones compute alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_piip import PIIPVisionConfig

Grid = tuple[int, int]


def cell_centre_reference_points(grid: Grid, device: torch.device) -> torch.Tensor:
    """(H*W, 2) normalised (x, y) centres of the cells of an H x W grid, row-major."""
    height, width = grid
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), dim=-1)


def build_sampling_constants(query_grid: Grid, feat_grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference points of the query grid and the (W_feat, H_feat) normaliser of the sampling offsets."""
    feat_height, feat_width = feat_grid
    normaliser = torch.tensor([feat_width, feat_height], device=device, dtype=torch.float32)
    return cell_centre_reference_points(query_grid, device), normaliser


class DeformableCrossAttention(nn.Module):
    """Single-level multi-scale deformable attention (Deformable DETR), in plain PyTorch.

    Each query looks at `num_points` bilinear samples per head of the value map, around the
    centre of its own cell projected onto the value grid; learned offsets move the samples and a
    softmax over the points weights them. Sampling runs in fp32 whatever the model dtype, as the
    compiled kernels of the reference implementation do.
    """

    def __init__(self, config: PIIPVisionConfig, query_dim: int, feat_dim: int):
        super().__init__()
        # The config checked that the value width splits evenly into heads.
        num_heads, num_points = config.deform_num_heads, config.deform_num_points
        value_dim = int(query_dim * config.deform_ratio)
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = value_dim // num_heads
        self.sampling_offsets = nn.Linear(query_dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(query_dim, num_heads * num_points)
        self.value_proj = nn.Linear(feat_dim, value_dim)
        self.output_proj = nn.Linear(value_dim, query_dim)
        # (query grid, feat grid, device) -> (reference points, offset normaliser); both depend on shapes only.
        self._constants_by_shape: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def sampling_constants(self, query_grid: Grid, feat_grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, 2) reference points and the (2,) (W_feat, H_feat) offset normaliser.

        Both depend on the grids only, so they are built once per shape and device and reused (a
        compiled graph folds them into constants instead).
        """
        if torch.compiler.is_compiling():
            return build_sampling_constants(query_grid, feat_grid, device)
        key = (tuple(query_grid), tuple(feat_grid), device)
        if key not in self._constants_by_shape:
            self._constants_by_shape[key] = build_sampling_constants(query_grid, feat_grid, device)
        return self._constants_by_shape[key]

    def clear_sampling_cache(self) -> None:
        """Forget the sampling constants built so far; the next call of each shape builds them afresh."""
        self._constants_by_shape.clear()

    def initial_offset_bias(self) -> torch.Tensor:
        """Head h starts looking along direction 2*pi*h/heads, point p at distance p+1 (in cells)."""
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        return (directions[:, None, :] * distances[None, :, None]).reshape(-1)  # (heads * points * 2,)

    def forward(self, query: torch.Tensor, query_grid: Grid, feat: torch.Tensor, feat_grid: Grid) -> torch.Tensor:
        batch, num_queries, _ = query.shape
        feat_height, feat_width = feat_grid
        value = self.value_proj(feat)  # (batch, feat_tokens, heads * head_dim)
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.num_heads, self.num_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.num_heads, self.num_points)
        weights = weights.float().softmax(dim=-1)

        reference, normaliser = self.sampling_constants(query_grid, feat_grid, query.device)  # (queries, 2) as (x, y)
        locations = reference[None, :, None, None, :] + offsets.float() / normaliser  # (batch, queries, heads, points, 2)
        sampling_grid = 2.0 * locations - 1.0  # grid_sample coordinates, align_corners=False

        # (batch * heads, head_dim, H_feat, W_feat)
        value_map = (
            value.float()
            .view(batch, feat_height * feat_width, self.num_heads, self.head_dim)
            .permute(0, 2, 3, 1)
            .reshape(batch * self.num_heads, self.head_dim, feat_height, feat_width)
        )
        # (batch * heads, queries, points, 2)
        sampling_grid = sampling_grid.permute(0, 2, 1, 3, 4).reshape(batch * self.num_heads, num_queries, self.num_points, 2)
        sampled = F.grid_sample(value_map, sampling_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: (batch * heads, head_dim, queries, points); weights -> (batch * heads, 1, queries, points)
        weights = weights.permute(0, 2, 1, 3).reshape(batch * self.num_heads, 1, num_queries, self.num_points)
        attended = (sampled * weights).sum(dim=-1)  # (batch * heads, head_dim, queries)
        # (batch, queries, heads * head_dim), contiguous for the Linear
        attended = attended.view(batch, self.num_heads * self.head_dim, num_queries).transpose(1, 2).contiguous()
        return self.output_proj(attended.to(query.dtype))


class PlainCrossAttention(nn.Module):
    """Standard multi-head cross attention from the query tokens to all feature tokens."""

    def __init__(self, config: PIIPVisionConfig, query_dim: int, feat_dim: int):
        super().__init__()
        # The config checked that the query width splits evenly into heads.
        self.num_heads = config.deform_num_heads
        self.wq = nn.Linear(query_dim, query_dim, bias=False)
        self.wk = nn.Linear(feat_dim, query_dim, bias=False)
        self.wv = nn.Linear(feat_dim, query_dim, bias=False)
        self.proj = nn.Linear(query_dim, query_dim)

    def forward(self, query: torch.Tensor, query_grid: Grid, feat: torch.Tensor, feat_grid: Grid) -> torch.Tensor:
        batch, num_queries, width = query.shape
        head_dim = width // self.num_heads
        # (batch, heads, tokens, head_dim)
        q = self.wq(query).view(batch, num_queries, self.num_heads, head_dim).transpose(1, 2)
        k = self.wk(feat).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        v = self.wv(feat).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, num_queries, width))


class DepthwiseConvOverGrid(nn.Module):
    """3x3 depthwise convolution over tokens laid out on their H x W grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim, bias=True)

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        batch, _, dim = tokens.shape
        feature_map = tokens.transpose(1, 2).reshape(batch, dim, *grid)
        return self.dwconv(feature_map).flatten(2).transpose(1, 2).contiguous()  # (batch, H*W, dim)


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv on the token grid -> GELU -> Linear: an MLP that also mixes neighbours."""

    def __init__(self, config: PIIPVisionConfig, dim: int):
        super().__init__()
        hidden_dim = int(dim * config.cffn_ratio)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConvOverGrid(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(config.interaction_dropout)

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        hidden = self.act(self.dwconv(self.fc1(tokens), grid))
        return self.drop(self.fc2(self.drop(hidden)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob`."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden
        keep_prob = 1.0 - self.drop_prob
        mask = hidden.new_empty((hidden.shape[0],) + (1,) * (hidden.ndim - 1)).bernoulli_(keep_prob)
        return hidden * mask / keep_prob


def interaction_norm(config, dim: int) -> nn.Module:
    """The injectors' LayerNorm, or the identity for configs with `interaction_norm` false (the
    official perception configs' `norm_layer='none'`)."""
    if getattr(config, "interaction_norm", True):
        return nn.LayerNorm(dim, eps=config.interaction_norm_eps)
    return nn.Identity()


class Injector(nn.Module):
    """Updates one branch's tokens with what it reads from another branch, through zero-initialised gates."""

    def __init__(self, config: PIIPVisionConfig, query_dim: int, feat_dim: int, drop_path: float):
        super().__init__()
        self.query_norm = interaction_norm(config, query_dim)
        self.feat_norm = interaction_norm(config, feat_dim)
        if config.interaction_attention == "deform":
            self.attn = DeformableCrossAttention(config, query_dim, feat_dim)
        else:
            self.attn = PlainCrossAttention(config, query_dim, feat_dim)
        self.attn_gate = nn.Parameter(torch.zeros(query_dim))
        self.with_cffn = config.with_cffn
        if self.with_cffn:
            self.ffn_norm = interaction_norm(config, query_dim)
            self.ffn = ConvFFN(config, query_dim)
            self.ffn_gate = nn.Parameter(torch.zeros(query_dim))
            self.drop_path = DropPath(drop_path)

    def forward(self, query: torch.Tensor, query_grid: Grid, feat: torch.Tensor, feat_grid: Grid) -> torch.Tensor:
        attended = self.attn(self.query_norm(query), query_grid, self.feat_norm(feat), feat_grid)
        query = query + self.attn_gate * attended
        if self.with_cffn:
            query = query + self.ffn_gate * self.drop_path(self.ffn(self.ffn_norm(query), query_grid))
        return query


class BidirectionalInteractionUnit(GradientCheckpointingLayer):
    """Exchange between branch `a` (larger model, lower resolution) and branch `b` (the next one).

    Both directions read the tokens as they were before this unit, so the order of the two
    injections does not matter.
    """

    def __init__(self, config: PIIPVisionConfig, dim_a: int, dim_b: int, drop_path: float):
        super().__init__()
        self.use_projection = config.interaction_proj
        if self.use_projection:
            self.proj_a_to_b = nn.Linear(dim_a, dim_b)
            self.proj_b_to_a = nn.Linear(dim_b, dim_a)
        feat_dim_for_a = dim_a if self.use_projection else dim_b
        feat_dim_for_b = dim_b if self.use_projection else dim_a
        self.injector_into_a = Injector(config, dim_a, feat_dim_for_a, drop_path)
        self.injector_into_b = Injector(config, dim_b, feat_dim_for_b, drop_path)

    def forward(
        self, tokens_a: torch.Tensor, grid_a: Grid, tokens_b: torch.Tensor, grid_b: Grid
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A ViT branch's tokens are a slice beside its class token: contiguous copies for the Linears.
        feat_for_a = self.proj_b_to_a(tokens_b.contiguous()) if self.use_projection else tokens_b
        feat_for_b = self.proj_a_to_b(tokens_a.contiguous()) if self.use_projection else tokens_a
        new_a = self.injector_into_a(tokens_a, grid_a, feat_for_a, grid_b)
        new_b = self.injector_into_b(tokens_b, grid_b, feat_for_b, grid_a)
        return new_a, new_b
