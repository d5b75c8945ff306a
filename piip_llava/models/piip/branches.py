"""Branch adapters: a pretrained transformers backbone seen as an embedding step plus a list of blocks.

Every branch maps an image to a `BranchState` (tokens on a grid, plus an optional class token)
and runs any contiguous range of its blocks on that state. The pyramid model only ever talks to
branches through this interface, so ViT-style and convolutional (ConvNeXt, ResNet) backbones mix
freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.models.convnext.modeling_convnext import ConvNextEmbeddings, ConvNextStage
from transformers.models.resnet.modeling_resnet import ResNetEmbeddings, ResNetEncoder
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from .configuration_piip import BranchSpec


@dataclass
class BranchState:
    """A branch's activations between blocks: tokens (batch, H*W, C) on an H x W grid."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    class_token: torch.Tensor | None = None  # (batch, 1, C), carried beside the grid tokens

    def feature_map(self) -> torch.Tensor:
        """The tokens as a (batch, C, H, W) map."""
        batch, _, channels = self.tokens.shape
        return self.tokens.transpose(1, 2).reshape(batch, channels, *self.grid)


@dataclass(frozen=True)
class ViTFamily:
    """What differs between ViT families that share the adapter."""

    embeddings_class: type
    layer_class: type
    has_class_token: bool
    has_pre_layernorm: bool


VIT_FAMILIES = {
    "clip_vision_model": ViTFamily(CLIPVisionEmbeddings, CLIPEncoderLayer, has_class_token=True, has_pre_layernorm=True),
    "siglip_vision_model": ViTFamily(
        SiglipVisionEmbeddings, SiglipEncoderLayer, has_class_token=False, has_pre_layernorm=False
    ),
}


def interpolate_position_grid(grid_embedding: torch.Tensor, target_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (G*G, C) position table to the target grid, bicubically in fp32; returns (H*W, C)."""
    num_positions, channels = grid_embedding.shape
    side = round(num_positions**0.5)
    if side * side != num_positions:
        raise ValueError(f"Position embedding with {num_positions} entries is not a square grid.")
    if (side, side) == tuple(target_grid):
        return grid_embedding
    table = grid_embedding.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=target_grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(-1, channels).to(grid_embedding.dtype)


class ViTBranch(nn.Module):
    """CLIP or SigLIP vision transformer as a PIIP branch (no post-LayerNorm, no pooling head)."""

    def __init__(self, spec: BranchSpec, attn_implementation: str | None = None):
        super().__init__()
        if spec.backbone_type not in VIT_FAMILIES:
            raise ValueError(f"No ViT adapter for backbone type {spec.backbone_type!r}.")
        family = VIT_FAMILIES[spec.backbone_type]
        backbone_config = spec.build_backbone_config()
        if attn_implementation is not None:
            backbone_config._attn_implementation = attn_implementation
        self.backbone_config = backbone_config
        self.image_size = spec.image_size
        self.patch_size = spec.patch_size
        self.has_class_token = family.has_class_token
        self.use_cls_token = spec.use_cls_token and family.has_class_token
        self.embeddings = family.embeddings_class(backbone_config)
        self.pre_layernorm = (
            nn.LayerNorm(backbone_config.hidden_size, eps=backbone_config.layer_norm_eps)
            if family.has_pre_layernorm
            else nn.Identity()
        )
        self.layers = nn.ModuleList(
            [family.layer_class(backbone_config) for _ in range(backbone_config.num_hidden_layers)]
        )
        # grid -> (cache key, interpolated table); see `patch_position_embeddings`.
        self._position_cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def position_embeddings(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H*W, C) patch position embeddings for `grid` and the class position (C,) if any."""
        table = self.embeddings.position_embedding.weight
        class_position = table[0] if self.has_class_token else None
        return self.patch_position_embeddings(table, grid), class_position

    def patch_position_embeddings(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The pretrained patch positions interpolated to `grid`, reused while the table cannot have changed.

        The interpolation depends on the weights, so a cached result is used only in eval mode
        without autograd on the table, and only while the table is the same tensor (`data_ptr`)
        at the same version (`_version` counts in-place writes: `load_state_dict`, optimizer
        steps, `copy_`). Writes through `.data` bypass the version counter; call
        `clear_position_cache()` after those.
        """
        patch_table = table[1:] if self.has_class_token else table
        needs_graph = torch.is_grad_enabled() and table.requires_grad
        if self.training or needs_graph or torch.compiler.is_compiling():
            return interpolate_position_grid(patch_table, grid)
        key = (table.data_ptr(), table._version, table.dtype, table.device, torch.is_inference_mode_enabled())
        cached = self._position_cache.get(grid)
        if cached is not None and cached[0] == key:
            return cached[1]
        positions = interpolate_position_grid(patch_table, grid)
        self._position_cache[grid] = (key, positions)
        return positions

    def clear_position_cache(self) -> None:
        self._position_cache.clear()

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        patch_embedding = self.embeddings.patch_embedding
        patches = patch_embedding(pixel_values.to(patch_embedding.weight.dtype))  # (batch, C, H, W)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)  # (batch, H*W, C)
        patch_positions, class_position = self.position_embeddings(grid)
        tokens = tokens + patch_positions.to(tokens.dtype)
        if not self.has_class_token:
            return BranchState(tokens=self.pre_layernorm(tokens), grid=grid)
        class_token = (self.embeddings.class_embedding + class_position).to(tokens.dtype)
        class_token = class_token.expand(tokens.shape[0], 1, -1)
        sequence = self.pre_layernorm(torch.cat([class_token, tokens], dim=1))
        class_token = sequence[:, :1] if self.use_cls_token else None
        return BranchState(tokens=sequence[:, 1:], grid=grid, class_token=class_token)

    def run_blocks(self, state: BranchState, first: int, last: int) -> BranchState:
        has_class = state.class_token is not None
        hidden = torch.cat([state.class_token, state.tokens], dim=1) if has_class else state.tokens
        for layer in self.layers[first : last + 1]:
            hidden = layer(hidden, None)
        if has_class:
            return BranchState(tokens=hidden[:, 1:], grid=state.grid, class_token=hidden[:, :1])
        return BranchState(tokens=hidden, grid=state.grid)


class ConvolutionalBranch(nn.Module):
    """What every convolutional branch shares: its blocks map a (batch, C, H, W) map to another, which
    may change the grid and the width, so the state is rebuilt from the feature map after each range.

    Subclasses build `self.blocks` (a plain list, so parameters stay registered under their own
    names) and `embed`.
    """

    gradient_checkpointing = False
    blocks: list[nn.Module]

    def __init__(self, spec: BranchSpec):
        super().__init__()
        self.backbone_config = spec.build_backbone_config()
        self.image_size = spec.image_size

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _run_block(self, block: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
        return block(feature_map)

    def run_blocks(self, state: BranchState, first: int, last: int) -> BranchState:
        feature_map = state.feature_map()
        for block in self.blocks[first : last + 1]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                feature_map = self._gradient_checkpointing_func(self._run_block, block, feature_map)
            else:
                feature_map = self._run_block(block, feature_map)
        return _state_from_map(feature_map)


class ConvNextBranch(ConvolutionalBranch):
    """transformers' ConvNext as a PIIP branch.

    Its blocks are, stage by stage, the stage's downsampling layer (stages 2-4) followed by the
    stage's ConvNeXt layers.
    """

    def __init__(self, spec: BranchSpec):
        super().__init__(spec)
        config = self.backbone_config
        self.embeddings = ConvNextEmbeddings(config)
        layer_rates = linear_rates(config.drop_path_rate, sum(config.depths))
        stage_starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.stages = nn.ModuleList()
        in_channels = config.hidden_sizes[0]
        for stage_index, (depth, out_channels) in enumerate(zip(config.depths, config.hidden_sizes)):
            self.stages.append(
                ConvNextStage(
                    config,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    stride=2 if stage_index > 0 else 1,
                    depth=depth,
                    drop_path_rates=layer_rates[stage_starts[stage_index] : stage_starts[stage_index] + depth],
                )
            )
            in_channels = out_channels
        self.blocks = self._flat_blocks()

    def _flat_blocks(self) -> list[nn.Module]:
        blocks = []
        for stage in self.stages:
            if len(stage.downsampling_layer):
                blocks.append(stage.downsampling_layer)
            blocks.extend(stage.layers)
        return blocks

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        weight = self.embeddings.patch_embeddings.weight
        return _state_from_map(self.embeddings(pixel_values.to(weight.dtype)))

    def _run_block(self, block: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.ModuleList):  # a downsampling layer: LayerNorm then strided conv
            for layer in block:
                feature_map = layer(feature_map)
            return feature_map
        return block(feature_map)


class ResNetBranch(ConvolutionalBranch):
    """transformers' ResNet (basic or bottleneck layers, batch norm) as a PIIP branch.

    Its blocks are the residual layers, stage by stage; the first layer of stages 2-4 downsamples.
    Batch norm and full 3x3 convolutions make it learn far faster from random weights than a
    ConvNeXt or a ViT of the same cost, which is what a model trained from nothing on a CPU needs.
    Parameter names are `ResNetModel`'s, with `encoder.` dropped.
    """

    def __init__(self, spec: BranchSpec):
        super().__init__(spec)
        self.embedder = ResNetEmbeddings(self.backbone_config)
        self.stages = ResNetEncoder(self.backbone_config).stages
        self.blocks = [layer for stage in self.stages for layer in stage.layers]

    def embed(self, pixel_values: torch.Tensor) -> BranchState:
        weight = self.embedder.embedder.convolution.weight
        return _state_from_map(self.embedder(pixel_values.to(weight.dtype)))


def _state_from_map(feature_map: torch.Tensor) -> BranchState:
    return BranchState(tokens=feature_map.flatten(2).transpose(1, 2), grid=tuple(feature_map.shape[-2:]))


def linear_rates(last: float, count: int) -> list[float]:
    """`count` rates rising linearly from 0 to `last` (stochastic depth schedules), in plain Python so
    that models can be built on the meta device."""
    if count <= 1:
        return [0.0] * count
    return [last * index / (count - 1) for index in range(count)]


def build_branch(spec: BranchSpec, attn_implementation: str | None = None) -> nn.Module:
    if spec.is_convnext:
        return ConvNextBranch(spec)
    if spec.is_resnet:
        return ResNetBranch(spec)
    return ViTBranch(spec, attn_implementation=attn_implementation)
